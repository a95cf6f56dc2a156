"""The `loramerge` command line: parse, call the API, print. No merging logic lives here."""

from __future__ import annotations

import gc
import json
import logging
import re
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import click
from click.core import ParameterSource

from loramerge import __version__, hub
from loramerge.errors import LoramergeError
from loramerge.inspect import inspect_path
from loramerge.merge import MergeOptions, MergeResult, merge
from loramerge.push import PushResult, push
from loramerge.quantize import quantize
from loramerge.sink.formats import FORMATS, GGUF_TYPE_NAMES, OUTTYPES
from loramerge.sink.nf4_folder import NF4Options
from loramerge.swap import rebase, unmerge
from loramerge.verify.files import verify_files

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from loramerge.verify import VerifyReport

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500*2**20, '1024' -> 1024 (as transformers reads them)."""
    match = _SIZE.match(text)
    if not match:
        raise click.BadParameter(f"{text!r} is not a size like 5GB, 500MB or 1024")
    number, unit = match.groups()
    size = int(float(number) * _UNITS[(unit or "B").upper()])
    if size <= 0:
        raise click.BadParameter("size must be positive")
    return size


class _Size(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        return value if isinstance(value, int) else parse_size(value)


_OUTPUT = click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder (or .gguf file) to write; appears only when complete.",
)


def _merge_options(func):
    """Options shared by merge and its siblings (unmerge, rebase)."""
    options = [
        _OUTPUT,
        click.option(
            "-w",
            "--weight",
            "weights",
            multiple=True,
            type=float,
            help="Weight per adapter, in order (default 1.0; may be negative).",
        ),
        click.option(
            "--dtype",
            type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
            default="auto",
            show_default=True,
            help="Output dtype of float tensors; auto keeps each base tensor's own.",
        ),
        click.option(
            "--device",
            default="auto",
            show_default=True,
            help="Where the arithmetic runs: auto, cpu, cuda or cuda:N.",
        ),
        click.option(
            "--compute-dtype",
            type=click.Choice(["float32", "float64"]),
            default="float32",
            show_default=True,
            help="Precision of the arithmetic before the single rounding.",
        ),
        click.option(
            "--to",
            "to",
            type=click.Choice(list(FORMATS)),
            default=None,
            help="Output format (default: safetensors, or gguf for a .gguf base; nf4: "
            "bitsandbytes 4-bit, as transformers saves it; gguf: one llama.cpp file).",
        ),
        click.option(
            "--gguf-type",
            type=click.Choice(GGUF_TYPE_NAMES, case_sensitive=False),
            default=None,
            help="--to gguf: llama.cpp file type (q4_k_m, q5_k_m, q6_k: llama.cpp's mixtures; "
            "default f16, or each tensor's own type for a .gguf base).",
        ),
        click.option(
            "--qlora-base",
            is_flag=True,
            help="Merge into dequant(NF4(W0)), the base weights a QLoRA adapter was trained on.",
        ),
        click.option(
            "--max-shard-size",
            type=_Size(),
            default="5GB",
            show_default=True,
            help="Largest shard file (5GB = 5e9 bytes, 5GiB = 5*2**30).",
        ),
        click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists."),
        click.option(
            "--allow-pickle",
            is_flag=True,
            help="Load .bin pickle checkpoints (with torch.load(weights_only=True)).",
        ),
        click.option("--dry-run", is_flag=True, help="Print the plan and write nothing."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar, no summary."),
        click.option(
            "--allow-nonfinite",
            is_flag=True,
            help="Merge adapters holding NaN or Inf (refused by default).",
        ),
        click.option(
            "--verify",
            "verify",
            is_flag=True,
            help="Run the weight check on the output; record the verdict; exit 1 if off.",
        ),
        click.option(
            "--push-to",
            "push_to",
            default=None,
            metavar="REPO_ID",
            help="Then publish OUTPUT to this Hub repo (as `loramerge push` does).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _remember_debug(ctx: click.Context, _param: click.Parameter, debug: bool) -> None:
    """Record --debug in the context object main() reads, wherever on the line it stood."""
    state = ctx.ensure_object(dict)
    state["debug"] = state.get("debug", False) or debug


_debug_option = click.option(
    "--debug",
    is_flag=True,
    expose_value=False,
    callback=_remember_debug,
    help="Show tracebacks on errors.",
)


def _hush_notes(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    """--quiet: the library's notes (INFO records of the `loramerge` logger) are not printed."""
    if value:
        logging.getLogger("loramerge").setLevel(logging.WARNING)
    return value


class _Notes(logging.Handler):
    """The library's notes as `note: ...` lines on stderr (whatever stderr is at the time)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"note: {record.getMessage()}", err=True)


class _Group(click.Group):
    """A group whose every command accepts --debug, as the group itself does, and whose
    --quiet also silences the library's notes."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        for param in cmd.params:
            if param.name == "quiet":
                param.callback = _hush_notes
        super().add_command(_debug_option(cmd), name)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loramerge")
@_debug_option
def cli() -> None:
    """Merge LoRA adapters into Hugging Face checkpoints, tensor by tensor."""


@cli.command("merge")
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("adapters", nargs=-1, required=True, type=click.Path(path_type=Path))
@_merge_options
def merge_command(base, adapters, output, as_json, quiet, weights, push_to, **options):
    """Merge ADAPTERS into BASE: W = W0 + sum w * scale * B @ A, written to OUTPUT."""
    options = MergeOptions(weights=tuple(weights), **options)
    with _progress(_bar_wanted(quiet, as_json, options)) as advance:
        result = merge(base, list(adapters), output, options, progress=advance)
    _report(result, options, as_json, quiet, push_to)


def _swap_options(func):
    """What unmerge and rebase add to the merge options."""
    func = click.option(
        "--force",
        is_flag=True,
        help="Take adapters out even if the record says they are not inside.",
    )(func)
    return click.option(
        "--base",
        type=click.Path(path_type=Path),
        default=None,
        help="Rebuild from this base (exact) after checking MERGED against it.",
    )(func)


@cli.command("unmerge")
@click.argument("merged", type=click.Path(path_type=Path))
@click.argument("adapters", nargs=-1, required=True, type=click.Path(path_type=Path))
@_merge_options
@_swap_options
def unmerge_command(
    merged, adapters, output, as_json, quiet, weights, base, force, push_to, **options
):
    """Take ADAPTERS out of MERGED (each with its recorded weight, or -w), written to OUTPUT."""
    options = MergeOptions(weights=tuple(weights), **options)
    with _progress(_bar_wanted(quiet, as_json, options), "unmerging") as advance:
        result = unmerge(
            merged, list(adapters), output, options, base=base, force=force, progress=advance
        )
    _report(result, options, as_json, quiet, push_to)


@cli.command("rebase")
@click.argument("merged", type=click.Path(path_type=Path))
@click.option(
    "--remove",
    "remove",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="An adapter to take out (repeat).",
)
@click.option(
    "--add",
    "add",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="An adapter to put in (repeat); -w weights apply to these, in order.",
)
@_merge_options
@_swap_options
def rebase_command(
    merged, remove, add, output, as_json, quiet, weights, base, force, push_to, **options
):
    """Swap adapters in MERGED: take --remove out and put --add in, in one pass."""
    options = MergeOptions(weights=tuple(weights), **options)
    with _progress(_bar_wanted(quiet, as_json, options), "rebasing") as advance:
        result = rebase(
            merged,
            list(remove),
            list(add),
            output,
            options,
            base=base,
            force=force,
            progress=advance,
        )
    _report(result, options, as_json, quiet, push_to)


@cli.command("quantize")
@click.argument("model", type=click.Path(path_type=Path))
@_OUTPUT
@click.option(
    "--to",
    "to",
    required=True,
    type=click.Choice([f for f in FORMATS if f != "safetensors"]),
    help="Quantized format (nf4: bitsandbytes 4-bit, as transformers saves it; gguf: one "
    "llama.cpp file).",
)
@click.option(
    "--gguf-type",
    type=click.Choice(GGUF_TYPE_NAMES, case_sensitive=False),
    default="f16",
    show_default=True,
    help="--to gguf: llama.cpp file type (q4_k_m, q5_k_m, q6_k: llama.cpp's mixtures).",
)
@click.option(
    "--blocksize",
    type=int,
    default=64,
    show_default=True,
    help="NF4 elements per absmax block (64, 128, ..., 4096).",
)
@click.option("--no-double-quant", is_flag=True, help="Keep the block absmax in float32.")
@click.option(
    "--compute-dtype",
    type=click.Choice(["bfloat16", "float16", "float32"]),
    default="bfloat16",
    show_default=True,
    help="bnb_4bit_compute_dtype: what the loaded model's 4-bit matmuls run in.",
)
@click.option(
    "--skip-modules",
    multiple=True,
    help="A module to keep unquantized (repeat); given ones replace the default, lm_head.",
)
@click.option(
    "--max-shard-size",
    type=_Size(),
    default="5GB",
    show_default=True,
    help="Largest shard file.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Load .bin pickle checkpoints.")
@click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, no summary.")
@click.option(
    "--push-to",
    "push_to",
    default=None,
    metavar="REPO_ID",
    help="Then publish OUTPUT to this Hub repo (as `loramerge push` does).",
)
def quantize_command(
    model,
    output,
    to,
    blocksize,
    no_double_quant,
    compute_dtype,
    skip_modules,
    as_json,
    quiet,
    push_to,
    **options,
):
    """Write MODEL quantized to OUTPUT (NF4: Linear weights; embeddings, norms, lm_head kept)."""
    _only_for(to, {"gguf": ["gguf_type"], "nf4": [*NF4_ONLY]})
    if to != "gguf":
        options["gguf_type"] = None  # (its default, f16, is for --to gguf)
    quant = NF4Options(blocksize, not no_double_quant, compute_dtype, tuple(skip_modules) or None)
    options = MergeOptions(to=to, quant=quant, **options)
    with _progress(_bar_wanted(quiet, as_json, options), "quantizing") as advance:
        result = quantize(model, output, options, progress=advance)
    _report(result, options, as_json, quiet, push_to)


NF4_ONLY = ("blocksize", "no_double_quant", "compute_dtype", "skip_modules")


def _only_for(to: str, owned: dict[str, list[str]]) -> None:
    """Refuse an option given on the command line that only another `--to` format reads."""
    ctx = click.get_current_context()
    for fmt, names in owned.items():
        given = [n for n in names if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE]
        if fmt != to and given:
            flag = "--" + given[0].replace("_", "-")
            raise LoramergeError(f"{flag} applies to --to {fmt} only, not --to {to}")


@cli.command("export-adapter")
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option(
    "--base",
    required=True,
    type=click.Path(path_type=Path),
    help="The base model (folder, .safetensors or .gguf): names and shapes are checked.",
)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="OUT.gguf")
@click.option(
    "--outtype",
    type=click.Choice(OUTTYPES),
    default="f32",
    show_default=True,
    help="Type of the LoRA tensors (as convert_lora_to_gguf.py's --outtype).",
)
@click.option("-w", "--weight", type=float, default=1.0, show_default=True, help="Adapter weight.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Load a .bin pickle adapter.")
@click.option("--dry-run", is_flag=True, help="Check everything, list the tensors, write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="No summary.")
def export_adapter_command(adapter, base, output, as_json, quiet, **options):
    """Write ADAPTER as a GGUF LoRA adapter for llama.cpp (--lora), every scale folded in."""
    from loramerge.export_adapter import ExportOptions, export_adapter

    result = export_adapter(adapter, base, output, ExportOptions(**options))
    summary = result.summary()
    if as_json:
        click.echo(json.dumps(summary))
    elif result.dry_run:
        _print_export_plan(summary)
    elif not quiet:
        scales = ", ".join(f"{s:g}" for s in summary["scales"])
        click.echo(
            f"Exported {summary['lora_pairs']} LoRA pairs ({summary['outtype']}, scales {scales} "
            f"folded into lora_b) in {summary['seconds']:.2f} s -> {result.output}"
        )


def _print_export_plan(summary: dict) -> None:
    scales = ", ".join(f"{s:g}" for s in summary["scales"])
    click.echo(
        f"export-adapter would write {summary['lora_pairs']} LoRA pairs ({summary['outtype']}, "
        f"scales {scales} folded into lora_b; {summary['tensor_bytes']:,} bytes of tensors) to "
        f"{summary['output']} (dry run, nothing written)"
    )
    table = _table()
    for column in ("tensor", "type", "shape", "bytes"):
        table.add_column(column, overflow="fold")
    for t in summary["tensors"]:
        table.add_row(t["name"], t["type"], str(t["shape"]), str(t["bytes"]))
    _console().print(table)


def _bar_wanted(quiet: bool, as_json: bool, options: MergeOptions) -> bool:
    return not (quiet or as_json or options.dry_run) and sys.stderr.isatty()


def _report(
    result: MergeResult, options: MergeOptions, as_json: bool, quiet: bool, push_to: str | None
) -> None:
    """Print what a merge, unmerge or rebase did, exit 1 if its --verify failed, else push."""
    for warning in result.warnings:
        click.echo(f"Warning: {warning}", err=True)
    if as_json:
        click.echo(json.dumps(_with_plan(result) if options.dry_run else result.summary()))
    elif options.dry_run:
        _print_plan(result)
    elif not quiet:
        _print_summary(result)
        if result.drift:
            _print_drift(result.drift)
    if result.verification and not result.verification["passed"]:
        sys.exit(1)
    if push_to and not options.dry_run:
        _print_push(push(result.output, push_to), as_json)


def _print_drift(drift: dict) -> None:
    if not drift["measured"]:
        click.echo(f"drift: not measured ({drift['reason']}); bound: {drift['bound']}")
        return
    bound = drift.get("max_bound_ratio")
    worst = f"{bound:.3g}x its type's bound" if bound is not None else f"{drift['max_ulp']:.3g} ulp"
    click.echo(
        f"drift against the exact result: max {worst}, "
        f"{drift['exact_share']:.4%} of elements bit-exact"
    )
    table = _table(title="tensors that differ from the exact result (worst first)")
    for column in ("tensor", "max ulp", "bit-exact"):
        table.add_column(column, overflow="fold")
    for t in drift["tensors"][:10]:
        table.add_row(t["name"], f"{t['max_ulp']:.3g}", f"{t['exact_share']:.4%}")
    _console().print(table)


@cli.command("verify")
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option(
    "--base",
    type=click.Path(path_type=Path),
    default=None,
    help="The base checkpoint the candidate claims to start from.",
)
@click.option(
    "--files",
    "files",
    is_flag=True,
    help="Re-hash every file against its hash in the candidate's record.",
)
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    type=click.Path(path_type=Path),
    help="An adapter the candidate claims to contain (repeat, in order).",
)
@click.option(
    "-w",
    "--weight",
    "weights",
    multiple=True,
    type=float,
    help="Weight per --adapter, in order: none (all 1.0) or one each.",
)
@click.option(
    "--tolerance",
    type=float,
    default=None,
    help="Largest error allowed in merged tensors, in ulps of the candidate dtype at "
    "max(|W0|, |expected|, |models it was computed from|). Default 1, plus 0.5 for each "
    "further subtraction its record lists.",
)
@click.option(
    "--forward",
    is_flag=True,
    help="Also compare logits with transformers + PEFT (needs loramerge[verify]).",
)
@click.option("--allow-pickle", is_flag=True, help="Load .bin pickle checkpoints.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="Only the verdict line.")
def verify_command(
    candidate, base, files, adapters, weights, tolerance, forward, allow_pickle, as_json, quiet
):
    """Prove CANDIDATE is BASE + ADAPTERS: exit 0 within tolerance, 1 if not, 2 on bad input."""
    if base is None and not files:
        raise LoramergeError("verify needs --base BASE (the weight check) or --files (integrity)")
    if weights and len(weights) != len(adapters):
        raise LoramergeError(f"got {len(weights)} weights for {len(adapters)} adapters")
    candidate = hub.resolve(candidate, allow_pickle=allow_pickle)
    base = base and hub.resolve(base, allow_pickle=allow_pickle)
    adapters = [hub.resolve(a, allow_pickle=allow_pickle) for a in adapters]
    integrity = verify_files(candidate) if files else None
    report = None
    if base is not None:
        weights = list(weights) or [1.0] * len(adapters)
        show_bar = not (quiet or as_json) and sys.stderr.isatty()
        from loramerge.verify import verify_weights  # torch, loaded only for this command

        with _progress(show_bar, "verifying") as advance:
            report = verify_weights(
                candidate,
                base,
                list(adapters),
                weights,
                tolerance_ulp=tolerance,
                allow_pickle=allow_pickle,
                progress=advance,
            )
        if forward:
            from loramerge.verify.forward import verify_forward

            report.forward = verify_forward(candidate, base, list(adapters), weights)
    passed = (report is None or report.passed) and (integrity is None or integrity["passed"])
    if as_json:
        summary = report.summary() if report else {"command": "verify"}
        summary.update(passed=passed, files=integrity)
        click.echo(json.dumps(summary))
    else:
        if report and not quiet:
            _print_verify_table(report)
        if integrity:
            click.echo(("PASS: " if integrity["passed"] else "FAIL: ") + integrity["summary"])
        if report:
            click.echo(report.verdict())
    sys.exit(0 if passed else 1)


def _print_verify_table(report: VerifyReport) -> None:
    console = _console()
    worst = sorted(report.tensors, key=lambda t: (t.passed, -t.max_ulp))[:10]
    table = _table(title=f"worst tensors of {len(report.tensors)}")
    for column in ("tensor", "kind", "dtype", "max ulp", "max abs", "correctly rounded", "ok"):
        table.add_column(column, overflow="fold")
    for t in worst:
        table.add_row(
            t.name,
            t.kind,
            t.dtype,
            f"{t.max_ulp:.3g}",
            f"{t.max_abs:.3g}",
            f"{t.exact_share:.4%}",
            "yes" if t.passed else f"NO: {t.note}",
        )
    console.print(table)
    if report.forward:
        console.print(f"forward: {report.forward['summary']}")


@cli.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--allow-pickle", is_flag=True, help="Load .bin pickle checkpoints.")
def inspect_command(path, as_json, allow_pickle):
    """Describe PATH: a base checkpoint, an adapter, a merged folder or a GGUF file."""
    report = inspect_path(path, allow_pickle=allow_pickle)
    if as_json:
        click.echo(json.dumps(report))
        return
    console = _console()
    table = _table(title=f"{report['kind']}: {report['path']}", show_header=False)
    for key, value in report.items():
        if key in ("kind", "path", "provenance", "tensor_list"):
            continue
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    console.print(table)
    provenance = report.get("provenance")
    if provenance:
        inside = _table(title="adapters inside (provenance)")
        for column in ("source", "weight", "rank", "scale", "sha256"):
            inside.add_column(column, overflow="fold")
        for a in provenance["adapters"]:
            inside.add_row(
                a["source"], f"{a['weight']:g}", str(a["rank"]), f"{a['scale']:g}", a["sha256"][:16]
            )
        console.print(inside)
        for step in provenance.get("history", []):
            console.print(f"  {step['at']}  {step['op']}: {', '.join(step['adapters'])}")


@cli.command("push")
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (if it is new).")
@click.option("--revision", default=None, help="Branch to commit to (created from main).")
@click.option("--message", "-m", default=None, help="Commit message.")
@click.option("--dry-run", is_flag=True, help="List the files, sizes and card; send nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def push_command(path, repo_id, private, revision, message, dry_run, as_json):
    """Publish PATH (an output folder, checked against its record, or one file) to REPO_ID."""
    result = push(
        path, repo_id, private=private, revision=revision, message=message, dry_run=dry_run
    )
    _print_push(result, as_json)


def _print_push(result: PushResult, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result.summary()))
        return
    for note in result.notes:
        click.echo(f"note: {note}")
    total = sum(f.size for f in result.files)
    if not result.dry_run:
        click.echo(
            f"Pushed {len(result.files)} files ({total / 1e6:.1f} MB) to {result.repo_id}: "
            f"{result.url}"
        )
        return
    table = _table(title=f"would push to {result.repo_id} (dry run, nothing sent)")
    table.add_column("file", overflow="fold")
    table.add_column("bytes", justify="right")
    for f in result.files:
        table.add_row(f.path_in_repo, str(f.size))
    table.add_row("total", str(total))
    _console().print(table)
    if result.card:
        click.echo(result.card)


def _table(**options) -> Table:
    """A rich table (rich is imported only by commands that print one)."""
    from rich.table import Table

    return Table(**options)


def _console(**options) -> Console:
    """A rich console (rich is imported only by commands that print through one)."""
    from rich.console import Console

    return Console(**options)


class _progress:
    """A rich byte progress bar on stderr, or a no-op."""

    def __init__(self, enabled: bool, label: str = "merging") -> None:
        self._bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                TextColumn(f"[bold]{label}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=_console(stderr=True),
                transient=True,
            )

    def __enter__(self):
        if self._bar is None:
            return None
        self._bar.start()
        task = self._bar.add_task("merge", total=None)
        self._task = task
        return self._advance

    def _advance(self, nbytes: int, total: int) -> None:
        self._bar.update(self._task, advance=nbytes, total=total)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.stop()


def _with_plan(result: MergeResult) -> dict:
    summary = result.summary()
    summary["plan"] = [
        {
            "tensor": t.name,
            "dtype": t.dtype,
            "shape": list(t.shape),
            "action": _action(t),
            "adapters": [
                {
                    "adapter": x.adapter,
                    "rank": x.module.rank,
                    "scale": x.module.scale,
                    "weight": x.weight,
                }
                for x in t.lora
            ],
        }
        for t in result.plan.tensors
        if t.modified
    ]
    return summary


def _action(tensor) -> str:
    parts = []
    if tensor.replace:
        parts.append("replace")
    if tensor.rows:
        parts.append("rows")
    if tensor.lora:
        parts.append("dora" if any(x.module.magnitude_key for x in tensor.lora) else "lora")
    if tensor.bias:
        parts.append("bias")
    return "+".join(parts) or "copy"


def _print_plan(result: MergeResult) -> None:
    console = _console()
    table = _table(
        title=f"plan: {len(result.plan.modified)} of {len(result.plan.tensors)} "
        f"tensors change (dry run, nothing written)"
    )
    for column in ("tensor", "action", "adapters (index: rank, scale, weight)", "dtype", "shape"):
        table.add_column(column, overflow="fold")
    for t in result.plan.modified:
        adapters = "; ".join(
            f"{x.adapter}: r={x.module.rank}, s={x.module.scale:g}, w={x.weight:g}" for x in t.lora
        )
        table.add_row(t.name, _action(t), adapters, t.dtype, str(list(t.shape)))
    console.print(table)
    for note in result.plan.notes:
        console.print(f"note: {note}")


def _print_summary(result: MergeResult) -> None:
    summary = result.summary()
    output = (result.record or {}).get("output", {})
    if result.command == "quantize":
        click.echo(
            f"Quantized {output['quantized_tensors']} of {summary['tensors_total']} tensors to "
            f"{output['format']} in {summary['seconds']:.1f} s -> {result.output}"
        )
        return
    verb = {"merge": "Merged", "unmerge": "Unmerged", "rebase": "Rebased"}[result.command]
    click.echo(
        f"{verb} {len(result.adapters)} adapter(s): {summary['tensors_modified']} of "
        f"{summary['tensors_total']} tensors changed, {summary['bytes_written'] / 1e6:.1f} MB "
        f"in {summary['seconds']:.1f} s -> {result.output}"
    )
    for note in result.plan.notes:
        click.echo(f"note: {note}")


def main() -> None:
    """Entry point: run the CLI, turning our errors into one `Error:` line and exit 2."""
    state = {"debug": False}  # the context object; --debug sets it wherever it stands
    notes = logging.getLogger("loramerge")
    notes.setLevel(logging.INFO)  # until a command's --quiet says otherwise
    notes.propagate = False
    if not any(isinstance(h, _Notes) for h in notes.handlers):
        notes.addHandler(_Notes())
    # A file-size limit (ulimit -f) must surface as an EFBIG error, not kill the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:  # (a host program's own handler stays)
        signal.signal(signal.SIGTERM, terminate)
    try:
        sys.exit(cli.main(standalone_mode=False, obj=state) or 0)
    except click.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        hint = f" (see: loramerge {ctx.command.name} --help)" if ctx else ""
        message = " ".join(exc.format_message().split())  # one line (click lists choices)
        click.echo(f"Error: {message}{hint}", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):
        _interrupted()
    except LoramergeError as exc:
        _fail(str(exc), state["debug"])
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        _fail(f"{exc.strerror or exc}{where}", state["debug"])
    except Exception as exc:  # noqa: BLE001 - last resort: one line, not a traceback
        message = f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for details)"
        _fail(message, state["debug"])


def run() -> None:
    """The process's entry point: `main`, then exit without a last collector pass over every
    object the command left (the process ends; the OS takes its memory back)."""
    try:
        main()
    finally:
        gc.freeze()


_terminated = threading.Event()


def terminate(signum: int, frame) -> None:
    """SIGTERM (a scheduler, `timeout`) ends a command as Ctrl-C does: the output's temporary
    files are removed on the way out, and the exit status is 143."""
    _terminated.set()
    raise KeyboardInterrupt


def _interrupted() -> None:
    """Ctrl-C (exit 130) or SIGTERM (exit 143), once the command has cleaned up."""
    if _terminated.is_set():
        click.echo("Error: terminated", err=True)
        sys.exit(128 + signal.SIGTERM)
    click.echo("Error: interrupted", err=True)
    sys.exit(130)


def _fail(message: str, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    click.echo(f"Error: {message}", err=True)
    sys.exit(2)


@cli.command("combine")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path))
@click.option("-w", "--weight", "weights", multiple=True, type=float, help="Weight per adapter.")
@click.option("--rank", type=click.IntRange(min=1), help="Compress every module to this rank.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Load .bin pickle adapters.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def combine_command(adapters, output, weights, rank, overwrite, allow_pickle, as_json):
    """One adapter equal to the weighted sum of ADAPTERS (exact, or compressed to --rank)."""
    from loramerge.combine import combine

    result = combine(
        list(adapters),
        output,
        list(weights),
        rank=rank,
        overwrite=overwrite,
        allow_pickle=allow_pickle,
    )
    _report_adapter(result.summary(), as_json, f"Combined {len(adapters)} adapter(s)")


def _report_adapter(summary: dict, as_json: bool, verb: str) -> None:
    """Print an adapter-writing command's result: JSON, or one line plus the error if any."""
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(
        f"{verb}: {summary['lora_modules']} LoRA modules, ranks {summary['ranks']}, "
        f"largest relative error {summary['max_relative_error']:.3g}, "
        f"{summary['seconds']:.1f} s -> {summary['output']}"
    )


@cli.command("extract")
@click.argument("finetuned", type=click.Path(path_type=Path))
@click.option("--base", required=True, type=click.Path(path_type=Path), help="The base model.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path))
@click.option("--rank", type=click.IntRange(min=1), help="Rank of every module.")
@click.option("--energy", type=float, help="Per module, the smallest rank keeping this share.")
@click.option("--max-rank", type=click.IntRange(min=1), help="Cap on any module's rank.")
@click.option("--targets", multiple=True, help="Only these layer names (e.g. q_proj) get LoRA.")
@click.option("--skip-nonlinear", is_flag=True, help="Leave out changed non-linear tensors.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Load .bin pickle checkpoints.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def extract_command(finetuned, base, output, rank, energy, max_rank, targets, as_json, **options):
    """A LoRA adapter of FINETUNED - BASE, by a truncated SVD of every changed linear weight."""
    from loramerge.extract import RankChoice, extract

    choice = RankChoice(rank=rank, energy=energy, max_rank=max_rank)
    result = extract(finetuned, base, output, choice, targets=tuple(targets), **options)
    summary = result.summary()
    _report_adapter(summary, as_json, f"Extracted from {finetuned}")
    if not as_json and summary["modules_to_save"] + summary["skipped_nonlinear"]:
        click.echo(f"modules_to_save: {summary['modules_to_save']}")
        click.echo(f"left out (--skip-nonlinear): {summary['skipped_nonlinear']}")
