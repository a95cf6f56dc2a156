"""Layer types the model fixtures lack, judged by PEFT on a small custom module: ConvNd 1x1 and
k x k LoRA, DoRA on embeddings and convolutions, and the refusal of grouped convolutions."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from reference import ulp_error
from safetensors.torch import load_file, save_file
from torch import nn

from loramerge.errors import LoramergeError
from loramerge.merge import MergeOptions, merge


class Net(nn.Module):
    """One of each layer type PEFT's LoRA can wrap."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 1)
        self.conv3 = nn.Conv2d(8, 6, 3, padding=1)
        self.conv1d = nn.Conv1d(6, 5, 3)
        self.grouped = nn.Conv2d(8, 8, 3, groups=2)
        self.emb = nn.Embedding(50, 16)
        self.lin = nn.Linear(16, 12)


def _write(tmp_path, target_modules, **config):
    """Save a base Net and a perturbed ("trained") PEFT adapter on it; return paths and PEFT."""
    torch.manual_seed(0)
    net = Net()
    base = tmp_path / "base"
    base.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, base / "model.safetensors")
    lora = LoraConfig(
        r=2, lora_alpha=6, target_modules=target_modules, init_lora_weights=False, **config
    )
    model = get_peft_model(net, lora)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(
                    0.3 * torch.randn_like(param) * (param.std() if param.numel() > 1 else 1)
                )
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    return base, adapter, model


def _peft_float64(model) -> dict[str, torch.Tensor]:
    merged = model.double().merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize(
    "targets, config",
    [
        (["conv1", "conv3", "conv1d"], {}),
        (["emb", "lin", "conv3"], {"use_dora": True}),
        (["emb", "lin"], {"use_rslora": True}),
    ],
    ids=["conv-lora", "dora-embedding-linear-conv", "rslora-embedding"],
)
def test_merge_matches_peft_float64(tmp_path, targets, config):
    base, adapter, model = _write(tmp_path, targets, **config)
    out = tmp_path / "out"
    merge(base, [adapter], out, MergeOptions(compute_dtype="float64"))
    ours = load_file(out / "model.safetensors")
    expected = _peft_float64(model)
    original = load_file(base / "model.safetensors")
    changed = 0
    for name, tensor in ours.items():
        err = ulp_error(tensor, expected[name])
        assert float(err.max()) <= 0.5 + 1e-6, f"{name}: {float(err.max()):.3f} ulp"
        changed += not torch.equal(tensor, original[name])
    assert changed >= len(targets)


def test_grouped_convolution_is_refused(tmp_path):
    base, adapter, _ = _write(tmp_path, ["grouped"])
    with pytest.raises(LoramergeError, match="grouped convolution"):
        merge(base, [adapter], tmp_path / "out")
    assert not (tmp_path / "out").exists()
