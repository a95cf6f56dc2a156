"""`--qlora-base`: an adapter trained with PEFT on the NF4-quantized fixture base, merged into
dequant(NF4(W0)) and into W0; the first must be closer to the model it was trained as."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LLAMA

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

PROMPT = torch.tensor([[0, 5, 17, 42, 99, 200, 3, 7, 11, 250, 300, 1]])
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _train_qlora(folder, base=LLAMA, targets=TARGETS) -> torch.Tensor:
    """Train a LoRA for a few steps on the NF4 base (QLoRA, on the CPU); save it to `folder`;
    return the logits of the training-time model (NF4 base + adapter) on PROMPT."""
    torch.manual_seed(0)
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        base, quantization_config=config, device_map="cpu"
    )
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    data = torch.randint(0, 384, (4, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(8):
        model(input_ids=data, labels=data).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(folder)
    with torch.no_grad():
        return model(PROMPT).logits.float()


def _logits(folder) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    with torch.no_grad():
        return model(PROMPT).logits.float()


def test_qlora_base_is_closer_to_the_training_time_model(cli, tmp_path):
    adapter = tmp_path / "adapter"
    trained = _train_qlora(adapter)
    plain, qlora = tmp_path / "plain", tmp_path / "qlora"
    assert cli("merge", LLAMA, adapter, "-o", plain).code == 0
    result = cli("merge", LLAMA, adapter, "-o", qlora, "--qlora-base", "--json")
    assert result.code == 0, result.err
    assert any("--qlora-base" in note for note in json.loads(result.out)["notes"])
    record = json.loads((qlora / "loramerge.json").read_text())
    assert record["qlora_base"] == {"blocksize": 64, "double_quant": True}
    # a plain verify takes the recorded --qlora-base, and each merge fails the other's check
    check = cli("verify", qlora, "--base", LLAMA, "--adapter", adapter, "--json")
    assert check.code == 0 and any("--qlora-base" in n for n in json.loads(check.out)["notes"])
    assert cli("verify", plain, "--base", LLAMA, "--adapter", adapter).code == 0
    (qlora / "loramerge.json").write_text(json.dumps({**record, "qlora_base": None}))
    assert cli("verify", qlora, "--base", LLAMA, "--adapter", adapter).code != 0
    (qlora / "loramerge.json").write_text(json.dumps(record))
    plain_distance = (_logits(plain) - trained).abs().max().item()
    qlora_distance = (_logits(qlora) - trained).abs().max().item()
    print(
        f"\nmax |logits - training-time logits|: plain merge {plain_distance:.4g}, "
        f"--qlora-base merge {qlora_distance:.4g}"
    )
    assert qlora_distance < plain_distance


def test_qlora_base_refuses_an_nf4_base(cli, tmp_path):
    assert cli("quantize", LLAMA, "-o", tmp_path / "nf4", "--to", "nf4").code == 0
    result = cli(
        "merge", tmp_path / "nf4", LLAMA.parent / "adapters" / "llama-lora",
        "-o", tmp_path / "out", "--qlora-base",
    )  # fmt: skip
    assert result.code == 2 and "already NF4" in result.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("blocksize", [64, 128])
def test_rebase_from_the_base_reapplies_the_recorded_qlora_base(tmp_path, blocksize):
    """`rebase --base` rebuilds a `--qlora-base` merge as such: into dequant(NF4(W0)) with the
    recorded blocksize, byte for byte the direct `--qlora-base` merge of what remains."""
    from conftest import ADAPTERS

    from loramerge.merge import MergeOptions, merge
    from loramerge.sink.nf4_folder import NF4Options
    from loramerge.swap import rebase

    a, b = ADAPTERS / "llama-lora", ADAPTERS / "llama-lora-b"
    qlora = MergeOptions(qlora_base=True, quant=NF4Options(blocksize=blocksize))
    merge(LLAMA, [a], tmp_path / "a", qlora)
    merge(LLAMA, [b], tmp_path / "direct", qlora)
    merge(LLAMA, [b], tmp_path / "plain")
    result = rebase(tmp_path / "a", [a], [b], tmp_path / "swapped", base=LLAMA)
    record = json.loads((tmp_path / "swapped" / "loramerge.json").read_text())
    assert record["qlora_base"] == {"blocksize": blocksize, "double_quant": True}
    shards = sorted(p.name for p in (tmp_path / "direct").glob("*.safetensors"))
    assert shards and result.files == shards
    for shard in shards:
        swapped = (tmp_path / "swapped" / shard).read_bytes()
        assert swapped == (tmp_path / "direct" / shard).read_bytes()
        assert swapped != (tmp_path / "plain" / shard).read_bytes()
