"""loramerge: stream LoRA adapters into Hugging Face checkpoints, tensor by tensor."""

__version__ = "0.1.0"

from loramerge.errors import LoramergeError  # noqa: E402

__all__ = ["LoramergeError", "__version__"]
