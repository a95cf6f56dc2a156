"""The model card (README.md) of an output, rendered from its provenance record for the Hub.

Pure text: YAML front matter the Hub reads (base_model, base_model_relation, license, tags,
library_name), the adapters with links and hashes, the command that made it, the verify verdict,
and how to load it.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from loramerge.hub import is_commit, parse_ref

_HUB = "https://huggingface.co"
_PLAIN = re.compile(r"[A-Za-z][\w.-]*(/[\w.-]+)?")


def render_card(record: dict, model_id: str, *, for_hub: bool = False) -> str:
    """README.md for the output `record` describes; `model_id` is what users load it by.

    On the Hub, `base_model` must be a repo id: a local base is named only in the text there.
    """
    base = record["base"]
    base_ref = _hub_ref(base["source"])
    adapters = record["adapters"]
    quantized = record.get("output", {}).get("format", "safetensors") != "safetensors"
    meta: dict = {}
    if base_ref or not for_hub:
        meta["base_model"] = base_ref[0] if base_ref else base["source"]
        relation = "merge" if adapters else ("quantized" if quantized else None)
        meta["base_model_relation"] = relation if base_ref else None
    meta["library_name"] = "transformers"
    if base.get("license"):
        meta["license"] = base["license"]
    meta["tags"] = ["lora", "merge", "loramerge"] if adapters else ["loramerge"]
    if record.get("output", {}).get("format") == "nf4":
        meta["tags"] += ["nf4", "4-bit", "bitsandbytes"]
    rows = "\n".join(
        f"| {_link(a['source'])} | {a['weight']:g} | {a['rank']} | {a['scale']:g} "
        f"| `{a['sha256'][:12]}` |"
        for a in adapters
    )
    check = record.get("verification")
    sections = [
        _front_matter(meta),
        f"# {_title(base['source'], len(adapters))}",
        f"This model is {_link(base['source'])} with {len(adapters)} LoRA adapter(s) merged into "
        f"its weights by [loramerge](https://pypi.org/project/loramerge/) "
        f"{record['tool']['version']}, tensor by tensor in {record.get('compute_dtype', 'float32')}"
        " and rounded once.",
        "| adapter | weight | rank | scale | sha256 of its weights |\n|---|---|---|---|---|\n"
        + rows
        if adapters
        else "No adapters are inside.",
        f"Weights: {record['dtype']}. Tensors modified: {record['tensors']['modified']} of "
        f"{record['tensors']['total']}.",
    ]
    if check:
        sections.append(f"Verification (`loramerge verify`): {check['verdict']}")
    sections += [f"- {note}" for note in record.get("notes", [])]
    sections += [
        "## How it was made",
        "```bash\n" + "\n".join(_commands(record)) + "\n```",
        "The full provenance record is in `loramerge.json`; `loramerge verify . --files` checks "
        "every file against it.",
        "## Usage",
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"model = AutoModelForCausalLM.from_pretrained({json.dumps(model_id)})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(model_id)})\n```",
    ]
    return "\n\n".join(sections) + "\n"


def render_adapter_card(record: dict, model_id: str) -> str:
    """README.md for a PEFT adapter loramerge wrote (`combine`, `extract`), for the Hub."""
    base = record["base"]["source"]
    base_ref = _hub_ref(base)
    op = record["history"][-1]["op"]
    meta: dict = {}
    if base_ref:
        meta["base_model"] = base_ref[0]
        meta["base_model_relation"] = "adapter"
    meta["library_name"] = "peft"
    meta["tags"] = ["lora", "peft", "loramerge", op]
    if op == "extract":
        what = (
            f"extracted from {_link(record['extracted_from']['source'])} minus its base by a "
            f"truncated SVD per changed weight (largest relative error "
            f"{record.get('max_relative_error', 0.0):.3g})"
        )
    else:
        what = f"the weighted sum of {len(record['adapters'])} LoRA adapters, as one adapter"
    rows = "\n".join(
        f"| {_link(a['source'])} | {a['weight']:g} | {a['rank']} | `{a['sha256'][:12]}` |"
        for a in record["adapters"]
    )
    sections = [
        _front_matter(meta),
        f"# LoRA adapter for {base_ref[0] if base_ref else base}",
        f"A PEFT LoRA adapter for {_link(base)}: {what}, written by "
        f"[loramerge](https://pypi.org/project/loramerge/) {record['tool']['version']}.",
    ]
    if rows:
        sections.append("| adapter | weight | rank | sha256 |\n|---|---|---|---|\n" + rows)
    sections += [
        "The full provenance record is in `loramerge.json`.",
        "## Usage",
        "```python\nfrom peft import AutoPeftModelForCausalLM\n\n"
        f"model = AutoPeftModelForCausalLM.from_pretrained({json.dumps(model_id)})\n```",
    ]
    return "\n\n".join(sections) + "\n"


def render_gguf_card(file_name: str, repo_id: str) -> str:
    """README.md for a repo holding one GGUF file: how llama.cpp and Ollama run it."""
    meta = {"library_name": "gguf", "tags": ["gguf", "loramerge"]}
    return (
        "\n\n".join(
            [
                _front_matter(meta),
                f"# {file_name}",
                "A GGUF file written by [loramerge](https://pypi.org/project/loramerge/).",
                "## Usage",
                f"```bash\nllama-cli --hf-repo {repo_id} --hf-file {file_name} -p 'Hello'\n"
                f"ollama run hf.co/{repo_id}\n```",
            ]
        )
        + "\n"
    )


def read_license(folder: Path) -> str | None:
    """The license a model folder's own card declares, if it has one."""
    card = Path(folder) / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub.repocard import metadata_load

    try:
        value = (metadata_load(card) or {}).get("license")
    except Exception:  # noqa: BLE001 - a card whose YAML does not parse declares nothing
        return None
    return value if isinstance(value, str) else None


def _hub_ref(source: str) -> tuple[str, str] | None:
    """(repo id, commit) when a record names a Hub snapshot (`org/name@commit`), else None."""
    ref = parse_ref(source)
    if ref is None or not is_commit(ref.revision or ""):
        return None
    return ref.repo_id, ref.revision


def _link(source: str) -> str:
    ref = _hub_ref(source)
    if ref is None:
        return f"`{source}`"
    repo, commit = ref
    return f"[{repo}]({_HUB}/{repo}/tree/{commit}) (commit `{commit[:12]}`)"


def _title(base: str, count: int) -> str:
    ref = _hub_ref(base)
    name = ref[0] if ref else base
    return f"{name} + {count} LoRA adapter(s)"


def _front_matter(meta: dict) -> str:
    lines = ["---"]
    for key, value in meta.items():
        if value is None:
            continue
        if isinstance(value, list):
            lines += [f"{key}:"] + [f"- {_yaml(v)}" for v in value]
        else:
            lines.append(f"{key}: {_yaml(value)}")
    return "\n".join([*lines, "---"])


def _yaml(value: str) -> str:
    """A YAML scalar: plain when it is a simple word or repo id, else a JSON (YAML) string."""
    return value if _PLAIN.fullmatch(value) else json.dumps(value)


def _commands(record: dict) -> list[str]:
    """The loramerge command(s) that reproduce this output, from its record."""
    history = record.get("history", [])
    options = []
    if not str(record.get("dtype", "auto")).startswith("auto"):
        options += ["--dtype", record["dtype"]]
    if record.get("compute_dtype", "float32") != "float32":
        options += ["--compute-dtype", record["compute_dtype"]]
    if len(history) == 1 and history[0]["op"] == "merge":
        adapters = record["adapters"]
        weights = [x for a in adapters for x in ("-w", f"{a['weight']:g}")]
        argv = ["loramerge", "merge", record["base"]["source"], *(a["source"] for a in adapters)]
        return [shlex.join([*argv, *weights, *options, "-o", "OUTPUT"])]
    return [
        f"# loramerge {step['op']}: "
        + ", ".join(step["adapters"] + [f"removed {r}" for r in step.get("removed", [])])
        for step in history
    ]
