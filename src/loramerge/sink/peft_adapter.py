"""A PEFT adapter folder: adapter_config.json, adapter_model.safetensors, card, provenance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from loramerge import dtypes
from loramerge.sink.hf_folder import PROVENANCE, record_files, write_provenance
from loramerge.sink.safetensors_writer import Entry, SafetensorsWriter, aligned_order

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
_CARD = """---
base_model: {base_model}
library_name: peft
tags:
- lora
- loramerge
- {op}
---

# {title}

A LoRA adapter written by [loramerge](https://pypi.org/project/loramerge/) {version}
(`loramerge {op}`). It loads with `PeftModel.from_pretrained(model, "<this folder>")`.

{inputs}

LoRA modules: {modules}; ranks {ranks}; every module's scale is 1 (lora_alpha = r).{error}

The full provenance record is in `{provenance}`.
"""


def write_adapter(folder: Path, config: dict, tensors: dict[str, np.ndarray], record: dict):
    """Write the weights (header first, hashed while written), config, card and record."""
    folder = Path(folder)
    entries = aligned_order(
        [Entry(n, dtypes.from_numpy(t.dtype), tuple(t.shape)) for n, t in sorted(tensors.items())]
    )
    writer = SafetensorsWriter(folder / WEIGHTS, entries, {"format": "pt"})
    try:
        for entry in entries:
            writer.write(entry.name, np.ascontiguousarray(tensors[entry.name]).view(np.uint8))
        writer.finish()
    except BaseException:
        writer.close()
        raise
    (folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _write_card(folder, record)
    record_files(folder, record, known={WEIGHTS: writer.digest})
    write_provenance(folder, record)


def _write_card(folder: Path, record: dict) -> None:
    inputs = [
        f"| `{a['source']}` | {a['weight']:g} | {a['rank']} | `{a['sha256'][:12]}` |"
        for a in record["adapters"]
    ]
    table = "| input | weight | rank | sha256 |\n|---|---|---|---|\n" + "\n".join(inputs)
    if "extracted_from" in record:
        source = record["extracted_from"]
        table = f"Extracted from `{source['source']}` (sha256 `{source['sha256'][:12]}`) "
        table += f"minus its base `{record['base']['source']}`."
    ranks = sorted({m["rank"] for m in record["modules"].values()})
    error = record.get("max_relative_error")
    card = _CARD.format(
        base_model=json.dumps(record["base"]["source"]),
        title=f"LoRA adapter ({record['history'][-1]['op']})",
        op=record["history"][-1]["op"],
        version=record["tool"]["version"],
        inputs=table,
        modules=len(record["modules"]),
        ranks=", ".join(map(str, ranks)) or "none",
        error=f"\n\nLargest relative Frobenius error of a module: {error:.3g}." if error else "",
        provenance=PROVENANCE,
    )
    (folder / "README.md").write_text(card)
