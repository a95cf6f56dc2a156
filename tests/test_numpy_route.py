"""The torch-free CPU route (`blocked`): when it is taken, and that it computes what torch does.

Plain LoRA on bf16/f32 matrices merges with numpy alone, so `loramerge merge` does not pay the
second torch takes to import. Its rounding is judged against torch's own float32 -> bfloat16
conversion on every kind of float32 value, and its arithmetic (like the torch route's) against a
float64 reference with the float32 error bound.
"""

from __future__ import annotations

import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import ADAPTERS, GPT2, LLAMA, ROOT
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import Expected, float32_bound, ulp_error

from loramerge import blocked, dtypes, kernels
from loramerge.adapter import load_adapter
from loramerge.delta import Term, merge_weight
from loramerge.execute import Route, worker_count
from loramerge.plan import build_plan
from loramerge.source.checkpoint import open_weights
from loramerge.source.model_folder import read_config

IMPORTS_TORCH = """
import sys
from loramerge.cli import cli
try:
    cli(sys.argv[1:])
except SystemExit as exit:
    assert exit.code == 0, exit.code
print("torch" in sys.modules)
"""


IMPORTS_GGUF = """
import sys
from loramerge.cli import cli
for command in sys.argv[1:]:
    try:
        cli(command.split("|"))
    except SystemExit as exit:
        assert exit.code == 0, (command, exit.code)
print(sorted(m for m in sys.modules if m == "gguf" or ".gguf" in m))
"""


def test_commands_on_safetensors_never_import_gguf(tmp_path):
    """The gguf package and loramerge's GGUF modules load only for a GGUF file (about a tenth
    of a second of every command's start)."""
    merged, unmerged = tmp_path / "merged", tmp_path / "unmerged"
    commands = [
        ["merge", LLAMA, ADAPTERS / "llama-lora", "-o", merged, "--verify"],
        ["verify", merged, "--base", LLAMA, "--adapter", ADAPTERS / "llama-lora"],
        ["unmerge", merged, ADAPTERS / "llama-lora", "-o", unmerged],
        ["inspect", merged],
    ]
    args = ["|".join(map(str, [*c, "--quiet"] if c[0] != "inspect" else c)) for c in commands]
    result = subprocess.run(
        [sys.executable, "-c", IMPORTS_GGUF, *args], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert (unmerged / "loramerge.json").is_file()


@pytest.mark.parametrize(
    "base, adapter, uses_torch",
    [
        (LLAMA, "llama-lora", False),
        (LLAMA, "llama-embed", False),  # embeddings: (B@A)^T
        (GPT2, "gpt2-embed", False),  # tied embeddings, untied
        (GPT2, "gpt2-lora", True),  # Conv1D weights go by numpy, its lora_bias by torch
        (LLAMA, "llama-dora", True),  # DoRA needs torch, and the check can tell
    ],
)
def test_plain_lora_on_the_cpu_never_imports_torch(tmp_path, base, adapter, uses_torch):
    out = tmp_path / "out"
    args = ["merge", str(base), str(ADAPTERS / adapter), "-o", str(out), "--quiet"]
    result = subprocess.run(
        [sys.executable, "-c", IMPORTS_TORCH, *args], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(uses_torch)
    assert (out / "loramerge.json").is_file()


@pytest.mark.parametrize("module", ["rich", "loramerge.verify.in_pass", "loramerge.compare"])
def test_a_quiet_merge_never_imports(tmp_path, module):
    """rich draws the progress bar and the tables, and the check modules measure: a quiet merge
    without --verify needs none of them, and imports are serial start-up time."""
    out = tmp_path / "out"
    args = ["merge", str(LLAMA), str(ADAPTERS / "llama-lora"), "-o", str(out), "--quiet"]
    script = IMPORTS_TORCH.replace('"torch" in sys.modules', f"{module!r} in sys.modules")
    result = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# every float32 bit pattern class: normals, subnormals, ties, overflow, infinities, NaN
@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64))
def test_rounding_to_bfloat16_is_torchs(bits):
    ties = [0x3F808000, 0x3F818000, 0x00008000, 0x7F7F8000, 0x7F7FFFFF, 0x80018000]
    values = np.array(bits + ties, dtype=np.uint32).view(np.float32).reshape(1, -1)
    ours = np.empty(values.shape, dtype=ml_dtypes.bfloat16)
    blocked.merge_rows(values, [], ours, rounding=kernels.BFLOAT16)
    theirs = torch.from_numpy(values).to(torch.bfloat16)
    nan = np.isnan(values)
    assert np.array_equal(np.isnan(ours.astype(np.float32)), nan)
    assert np.array_equal(  # NaN payloads aside (torch writes 0xFFFF, ml_dtypes a quiet NaN)
        ours.view(np.uint16)[~nan], dtypes.as_numpy(theirs).view(np.uint16)[~nan]
    )


def test_the_cast_and_the_compiled_rounding_merge_the_same_bytes():
    """Linux merges round with the compiled kernels, other platforms with numpy's cast
    (`kernels.rounding`): the same bytes, for one term over whole blocks, for two terms, for
    part of a block, and for a float32 W0, with NaN, inf, overflow and cancellation in it."""
    rng = np.random.default_rng(11)
    rows, cols, rank = 300, 1100, 8  # several row blocks, the last one partial
    w0 = rng.standard_normal((rows, cols), dtype=np.float32) * 0.02
    w0.reshape(-1)[:6] = [np.nan, np.inf, -np.inf, 3.3e38, -3.3e38, 0.0]
    a = rng.standard_normal((rank, cols), dtype=np.float32)
    b = rng.standard_normal((rows, rank), dtype=np.float32) * 0.01
    b[0] = 1e38  # overflow into inf on the first row
    terms = {
        "one": [blocked.factor(a, b, 2.0, False)],
        "two": [blocked.factor(a, b, 2.0, False), blocked.factor(a, b, -2.0, False)],
        "part": [blocked.factor(a, b[:150], 0.5, False, at=40)],
    }
    for stored in (ml_dtypes.bfloat16, np.float32):
        for name, factors in terms.items():
            merged = []
            for rounding in (blocked.CAST, kernels.BFLOAT16):
                out = np.empty((rows, cols), ml_dtypes.bfloat16)
                blocked.merge_rows(w0.astype(stored), factors, out, rounding=rounding)
                merged.append(out.view(np.uint16))
            assert np.array_equal(*merged), (stored, name)


def test_the_compiled_rounding_is_used_where_it_is_kept(monkeypatch):
    assert kernels.rounding() is kernels.BFLOAT16
    monkeypatch.setattr(kernels.sys, "platform", "darwin")
    assert kernels.rounding() is blocked.CAST


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("out_dtype", ["BF16", "F32"])
def test_numpy_and_torch_routes_are_both_within_the_float32_bound(transposed, out_dtype):
    """Each route against float64, allowed the error float32 arithmetic can make; not each other.

    Both are float32 sums of the same rank-r products, in whatever order their BLAS takes (it
    depends on the library and the CPU's kernels), so where the products cancel they may differ
    by many ulps of the result while both are right.
    """
    rng = np.random.default_rng(7)
    rows, cols, rank = 300, 1100, 8  # several row blocks, the last one partial
    w0 = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    terms = []
    for coef in (2.0, -0.37):
        a = rng.standard_normal((rank, rows if transposed else cols), dtype=np.float32) * 0.1
        b = rng.standard_normal((cols if transposed else rows, rank), dtype=np.float32) * 0.01
        terms.append((a, b, coef))
    ours = np.empty((rows, cols), dtype=dtypes.to_numpy(out_dtype))
    factors = [blocked.factor(a, b, coef, transposed) for a, b, coef in terms]
    blocked.merge_rows(w0, factors, ours, rounding=kernels.BFLOAT16)
    kind = "embedding" if transposed else "linear"
    theirs = merge_weight(
        dtypes.as_torch(w0),
        [
            Term(kind, torch.from_numpy(a), torch.from_numpy(b), coef, 1.0, coef)
            for a, b, coef in terms
        ],
        compute_dtype=torch.float32,
        out_dtype=dtypes.to_torch(out_dtype),
    )
    theirs = dtypes.as_numpy(theirs)
    expected = _float64_merge(w0, terms, transposed)
    bound = float32_bound(expected, dtypes.to_torch(out_dtype))
    for route, result in (("numpy", ours), ("torch", theirs)):
        err = ulp_error(dtypes.as_torch(result), expected.value)
        used = float((err / bound).max())
        assert used <= 1, f"{route}: {used:.3f} of the bound"
        print(f"\n{route} route [{out_dtype}]: error at most {used:.4f} of the float32 bound")
    same = (ours.view(np.uint8) == theirs.view(np.uint8)).mean()
    print(f"numpy vs torch route: {same:.4%} of bytes identical")


def _float64_merge(w0: np.ndarray, terms: list, transposed: bool) -> Expected:
    """W0 + sum c * B @ A (transposed for embeddings) in float64, with its magnitude bound."""
    value = torch.from_numpy(w0.astype(np.float64))
    magnitude = value.abs()
    for a, b, coef in terms:
        a64, b64 = torch.from_numpy(a).double(), torch.from_numpy(b).double()
        delta, size = b64 @ a64, b64.abs() @ a64.abs()
        value = value + coef * (delta.T if transposed else delta)
        magnitude = magnitude + abs(coef) * (size.T if transposed else size)
    # the rank-r dot product, the coefficient and one addition per term
    return Expected(value, magnitude, inner=terms[0][0].shape[0] + 1 + len(terms))


def _plan(base, adapter, out_dtype=None):
    with open_weights(base, stem="model", allow_pickle=False) as checkpoint:
        opened = load_adapter(ADAPTERS / adapter, allow_pickle=False)
        try:
            plan = build_plan(checkpoint, read_config(base), [opened], [1.0], out_dtype)
        finally:
            opened.close()
        return plan, {n: i.dtype for n, i in checkpoint.tensors.items()}


@pytest.mark.parametrize(
    "adapter, device, compute, out_dtype, expected",
    [
        ("llama-lora", "cpu", "float32", None, True),
        ("llama-lora", "cpu", "float32", "F32", True),
        ("llama-lora", "cpu", "float64", None, False),  # round-to-odd lives in the torch route
        ("llama-lora", "cuda", "float32", None, False),
        ("llama-lora", "cpu", "float32", "F16", False),  # numpy's float16 casts are scalar
        ("llama-dora", "cpu", "float32", None, False),
    ],
)
def test_route_choice(adapter, device, compute, out_dtype, expected):
    plan, stored = _plan(LLAMA, adapter, out_dtype)
    route = Route(device, compute, {}, {})
    modified = [t for t in plan.tensors if t.modified]
    assert modified
    chosen = {route.by_numpy(t, stored[t.source]) for t in modified}
    assert chosen == {expected}


def test_replaced_rows_and_tensors_take_the_torch_route():
    plan, stored = _plan(LLAMA, "llama-resized")  # modules_to_save with a resized vocabulary
    route = Route("cpu", "float32", {}, {})
    replaced = [t for t in plan.tensors if t.replace or t.rows]
    assert replaced
    assert not any(route.by_numpy(t, stored[t.source]) for t in replaced)


def test_worker_count_keeps_big_tensors_within_the_buffer_budget(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert worker_count([23 << 20, 1 << 20]) == 4  # a 1.1B model's largest matrix
    assert worker_count([470 << 20]) == 2  # a 70B model's MLP matrix in bf16
    assert worker_count([3 << 30]) == 1  # one huge tensor at a time
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert worker_count([1 << 20]) == 3
