"""BASE given as one .safetensors file: the output is a loadable folder when the file's folder
describes that model, and says plainly when it cannot be."""

from __future__ import annotations

import shutil

import torch
from conftest import ADAPTERS, GPT2, LLAMA
from peft_oracle import logits_of, logits_unmerged, probe_ids

from loramerge.source.model_folder import model_folder


def test_side_files_come_from_the_files_folder(tmp_path, cli):
    out = tmp_path / "out"
    run = cli(
        "merge", GPT2 / "model.safetensors", ADAPTERS / "gpt2-lora", "-o", out, "--dtype", "float32"
    )
    assert run.code == 0, run.err
    for name in (
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        assert (out / name).is_file(), name
    ids = probe_ids(GPT2)
    torch.testing.assert_close(
        logits_of(out, ids),
        logits_unmerged(GPT2, [ADAPTERS / "gpt2-lora"], [1.0], ids),
        rtol=1e-4,
        atol=1e-4,
    )


def test_a_file_without_config_warns_that_the_output_is_weights_only(tmp_path, cli):
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copyfile(GPT2 / "model.safetensors", lone / "model.safetensors")
    out = tmp_path / "out"
    run = cli("merge", lone / "model.safetensors", ADAPTERS / "gpt2-lora", "-o", out)
    assert run.code == 0, run.err
    assert "no config.json beside model.safetensors" in run.err
    assert not (out / "config.json").exists()


def test_one_shard_of_a_sharded_model_borrows_no_config():
    """The folder's config describes the whole model, not this shard."""
    folder, reason = model_folder(LLAMA / "model-00001-of-00003.safetensors")
    assert folder is None
    assert reason == "model-00001-of-00003.safetensors is one shard of the model " + (
        "model.safetensors.index.json describes"
    )
    assert model_folder(GPT2 / "model.safetensors") == (GPT2, None)
