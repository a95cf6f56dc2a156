"""Proof that a checkpoint is base + adapters: tensor by tensor, and (optionally) logit by logit.

The weight check computes in float64 with torch, so it loads on first use: `verify --files` and a
CPU merge without `--verify` never import torch.
"""

__all__ = ["TensorCheck", "VerifyReport", "verify_weights"]


def __getattr__(name: str):
    if name in __all__:
        from loramerge.verify import weights

        return getattr(weights, name)
    raise AttributeError(f"module 'loramerge.verify' has no attribute {name!r}")
