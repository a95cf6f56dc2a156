"""Proof that a checkpoint is base + adapters: tensor by tensor, and (optionally) logit by logit."""

from loramerge.verify.weights import TensorCheck, VerifyReport, verify_weights

__all__ = ["TensorCheck", "VerifyReport", "verify_weights"]
