"""The compiled check's kernels as C functions (`loramerge.kernels`): a process that finds them
in the cache loads them without numba (and on x86-64 without llvmlite, by `objectcode`) and
measures exactly what numba's own compilation does; llvmlite's loader, kept for other machines,
gives the same functions; a damaged cache file is compiled again; arrays a C function would
misread are refused."""

from __future__ import annotations

import json
import os
import platform
import struct
import subprocess
import sys

import numpy as np
import pytest
from conftest import ADAPTERS, LLAMA, ROOT

from loramerge import kernels, objectcode
from loramerge.merge import merge
from loramerge.verify.weights import verify_weights

X86_64 = sys.platform.startswith("linux") and platform.machine() == "x86_64"
CHECK = """
import json, sys
from loramerge.verify.weights import verify_weights
report = verify_weights(sys.argv[1], sys.argv[2], [sys.argv[3]])
loaded = {name: name in sys.modules for name in ("numba", "llvmlite")}
print(json.dumps({**loaded, "report": report.summary()}))
"""


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels") / "merged"
    merge(LLAMA, [ADAPTERS / "llama-lora"], out)
    return out


def _check(merged, cache) -> dict:
    """`verify_weights` in a fresh process whose kernel cache is `cache`."""
    env = {**os.environ, "LORAMERGE_KERNEL_CACHE": str(cache)}
    args = [sys.executable, "-c", CHECK, str(merged), str(LLAMA), str(ADAPTERS / "llama-lora")]
    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_a_warm_cache_checks_without_numba(merged, tmp_path):
    cold = _check(merged, tmp_path / "cache")  # compiles with numba, keeps the machine code
    warm = _check(merged, tmp_path / "cache")
    assert cold["numba"] and not warm["numba"]
    assert warm["llvmlite"] == (not X86_64)  # objectcode loads x86-64 code itself
    assert warm["report"] == cold["report"]  # every figure of every tensor, exactly
    here = verify_weights(merged, LLAMA, [ADAPTERS / "llama-lora"]).summary()
    assert json.loads(json.dumps(here)) == warm["report"] and here["passed"]


def test_a_damaged_cache_file_is_compiled_again(merged, tmp_path):
    cache = tmp_path / "cache"
    first = _check(merged, cache)
    files = sorted(cache.rglob("*.o"))
    assert files
    for i, file in enumerate(files):  # a foreign file, one cut short, one with a lost symbol
        code = file.read_bytes()
        damaged = [b"junk\nnot an object", code[: len(code) // 2], b"gone" + code]
        file.write_bytes(damaged[i % len(damaged)])
    again = _check(merged, cache)
    assert again["numba"] and again["report"] == first["report"]
    assert not _check(merged, cache)["numba"]  # written afresh


def test_the_cache_is_keyed_by_the_cpu(monkeypatch, tmp_path):
    core = "vendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nflags\t\t: fpu avx2 {}\n"
    folders = []
    for flags, clock in (("avx512f", 2600), ("avx512f", 3100), ("", 2600)):
        info = tmp_path / f"cpuinfo-{len(folders)}"
        info.write_text(core.format(flags) + f"cpu MHz\t\t: {clock}\n\n" + core.format(flags))
        monkeypatch.setattr(kernels, "_CPUINFO", info)
        folders.append(kernels.cache_folder())
    # the clock is not the CPU; a feature less is another one
    assert folders[0] == folders[1] != folders[2]


def _cached_round_sum(tmp_path, monkeypatch) -> tuple[str, bytes]:
    """The bfloat16 rounding kernel's cached symbol and object, compiled into a fresh cache."""
    monkeypatch.setenv("LORAMERGE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_loaded", {})
    kernels.kernel("round_sum")
    symbol, _, code = (kernels.cache_folder() / "round_sum.o").read_bytes().partition(b"\n")
    return symbol.decode(), code


@pytest.mark.skipif(not X86_64, reason="objectcode loads x86-64 Linux objects")
def test_objectcode_and_llvmlite_load_the_same_function(tmp_path, monkeypatch):
    name, code = _cached_round_sum(tmp_path, monkeypatch)
    ours = objectcode.load(code, name, kernels._symbol)
    theirs = kernels._cached_by_llvm(code, name)
    assert ours and theirs and ours != theirs
    rng = np.random.default_rng(5)
    w0 = rng.integers(0, 1 << 16, 4099, dtype=np.uint16)  # every kind: NaN, inf, subnormal
    delta = rng.standard_normal(4099).astype(np.float32) * np.float32(1e-2)
    numba_own = np.zeros_like(w0)
    kernels.round_sum_to_bfloat16(w0, delta, numba_own)  # the function numba compiled
    for address in (ours, theirs):
        out = np.zeros_like(w0)
        function = kernels.ctypes.CFUNCTYPE(None, *kernels._SIGNATURES["round_sum"][1])(address)
        function(w0.ctypes.data, delta.ctypes.data, out.ctypes.data, 4099, 4099, 4099)
        assert np.array_equal(out, numba_own)


def test_objectcode_refuses_what_it_cannot_load(tmp_path, monkeypatch):
    name, code = _cached_round_sum(tmp_path, monkeypatch)
    arm = code[:0x12] + struct.pack("<H", 183) + code[0x14:]  # EM_AARCH64
    with pytest.raises(objectcode.Unsupported):
        objectcode.load(arm, name, kernels._symbol)
    for damaged in (code[: len(code) // 2], b"not an object"):
        with pytest.raises((ValueError, struct.error, IndexError)):
            objectcode.load(damaged, name, kernels._symbol)
    with pytest.raises(ValueError):  # a symbol it does not define
        objectcode.load(code, "gone" + name, kernels._symbol)
    with pytest.raises(ValueError):  # a name nothing in the process has
        objectcode.load(code, name, lambda needed: 0)


def test_arrays_a_kernel_would_misread_are_refused():
    w0, delta, out = np.zeros(8, np.uint16), np.zeros(8, np.float32), np.zeros(8, np.uint16)
    kernels.round_sum_to_bfloat16(w0, delta, out)
    for bad in (
        (w0, delta.astype(np.float64), out),  # another dtype
        (w0, delta[:4], out),  # another size
        (np.zeros(16, np.uint16)[::2], delta, out),  # strided
        (w0, np.zeros((2, 8), np.float32)[:, ::2], out),  # rows whose columns are apart
        (w0, np.zeros((2, 6), np.float32)[::-1, :4], out),  # rows backwards
        (w0, np.zeros((2, 6), np.float32)[:, :3], out),  # rows of another length
    ):
        with pytest.raises(ValueError):
            kernels.round_sum_to_bfloat16(*bad)
    empty = np.empty(0)
    with pytest.raises(ValueError):  # seven figures, not six
        kernels.measure(w0, w0, empty, w0[:0], empty, 7, -126, np.zeros(6))
    with pytest.raises(ValueError):  # a scale of another length
        kernels.measure(w0, w0, empty, w0[:3], empty, 7, -126, np.zeros(7))
    u, v, left, right = np.zeros(2), np.zeros(4), np.zeros((2, 3)), np.zeros(3 * 4)
    assert kernels.judge_bounded(w0, w0, delta, u, v, left, right, 1.0, 7, -126)  # 2 x 4, rank 3
    transposed = np.zeros((3, 2)).T  # a factor's transpose, taken as the view it is
    assert kernels.judge_bounded(w0, w0, delta, u, v, transposed, right, 1.0, 7, -126)
    # factors that do not fit the block; steps backwards; float64 terms
    for bad in ((left[:, :2], right), (left, right[:11]), (left[::-1], right)):
        with pytest.raises(ValueError):
            kernels.judge_bounded(w0, w0, delta, u, v, *bad, 1.0, 7, -126)
    with pytest.raises(ValueError):
        kernels.judge_bounded(w0, w0, delta.astype(np.float64), u, v, left, right, 1.0, 7, -126)
    apart = np.zeros((2, 6), np.float32)[:, :4]  # terms with their rows apart, as the gate pads
    assert kernels.judge_bounded(w0, w0, apart, u, v, left, right, 1.0, 7, -126)
    with pytest.raises(ValueError):  # terms with their columns apart
        kernels.judge_bounded(w0, w0, delta.reshape(2, 4)[:, ::2], u, v, left, right, 1.0, 7, -126)
