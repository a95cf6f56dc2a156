"""loramerge: stream LoRA adapters into Hugging Face checkpoints, tensor by tensor.

The Python API mirrors the commands: `merge`, `unmerge`, `rebase`, `verify_weights`,
`inspect_path`, `push`, all configured with `MergeOptions` where they write. Paths may be Hub
repo ids (`org/name[@revision]`).
"""

__version__ = "0.1.0"

from loramerge.errors import LoramergeError  # noqa: E402
from loramerge.inspect import inspect_path  # noqa: E402
from loramerge.merge import MergeOptions, MergeResult, merge  # noqa: E402
from loramerge.push import push  # noqa: E402
from loramerge.swap import rebase, unmerge  # noqa: E402


def __getattr__(name: str):
    """The verify API imports torch, so it loads on first use (a CPU merge never needs torch)."""
    if name in ("VerifyReport", "verify_weights"):
        from loramerge import verify

        return getattr(verify, name)
    raise AttributeError(f"module 'loramerge' has no attribute {name!r}")


__all__ = [
    "LoramergeError",
    "MergeOptions",
    "MergeResult",
    "VerifyReport",
    "__version__",
    "inspect_path",
    "merge",
    "push",
    "rebase",
    "unmerge",
    "verify_weights",
]
