"""`quantize`: write a model in another format (NF4, GGUF), every tensor streamed through its
sink."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from loramerge import hub
from loramerge.errors import LoramergeError
from loramerge.execute import Progress
from loramerge.merge import Job, MergeOptions, MergeResult, run
from loramerge.sink.hf_folder import read_provenance


def quantize(
    model: Path, output: Path, options: MergeOptions, progress: Progress | None = None
) -> MergeResult:
    """Write `model` to `output` in format `options.to`; a merged model keeps its record."""
    if options.to == "safetensors":
        raise LoramergeError("quantize writes a quantized format: pass --to nf4 or --to gguf")
    model = hub.resolve(Path(model), allow_pickle=options.allow_pickle)
    job = Job("quantize", model, [], [], [], Path(output))
    job.record = read_provenance(model) if model.is_dir() else None
    return run(job, replace(options, weights=()), progress)
