"""llama.cpp's own quantizers, for the tests: ggml-quants.c compiled from llama-cpp-python's sdist.

The source distribution of llama-cpp-python carries the whole llama.cpp tree. `load()` fetches it
with pip (once), compiles ggml-quants.c with the shim beside this file into a small shared
library cached under .venv, and wraps `quantize_row_*_ref` and `dequantize_row_*` with ctypes.
Compiled as llama.cpp's ggml-base is (no -march, asserts off) and with -ffp-contract=off, so that
no compiler fuses a multiply-add the x86-64 build does not.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

VERSION = "0.3.36"
ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".venv" / f"ggml-ref-{VERSION}"
LIB = CACHE / "libggmlref.so"
SHIM = Path(__file__).resolve().parent / "ggml_ref_shim.c"
T = GGMLQuantizationType

_NAMES = {
    T.Q8_0: "q8_0",
    T.Q4_0: "q4_0",
    T.Q4_1: "q4_1",
    T.Q5_0: "q5_0",
    T.Q5_1: "q5_1",
    T.Q2_K: "q2_K",
    T.Q3_K: "q3_K",
    T.Q4_K: "q4_K",
    T.Q5_K: "q5_K",
    T.Q6_K: "q6_K",
}


class Unavailable(Exception):
    """The compiler or the llama-cpp-python sdist is not available here."""


def _fetch_sources(dest: Path) -> Path:
    """Download the sdist with pip and extract the ggml headers and ggml-quants.c; the ggml dir."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary"]
        cmd += [":all:", f"llama-cpp-python=={VERSION}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode or not sdists:
            raise Unavailable(
                f"pip download llama-cpp-python=={VERSION} failed: {done.stderr[-300:]}"
            )
        with tarfile.open(sdists[0]) as tar:
            wanted = [
                m
                for m in tar.getmembers()
                if "/vendor/llama.cpp/ggml/" in m.name
                and m.isfile()
                and (m.name.endswith(".h") or m.name.endswith("/ggml-quants.c"))
                and ("/ggml/include/" in m.name or "/ggml/src/" in m.name)
            ]
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest, members=wanted, **safe)
    return next(dest.glob("*/vendor/llama.cpp/ggml"))


def build() -> Path:
    """The cached shared library, compiled on first use."""
    if LIB.exists():
        return LIB
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if not cc:
        raise Unavailable("no C compiler (gcc or cc) on PATH")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        ggml = _fetch_sources(Path(tmp))
        out = Path(tmp) / LIB.name
        cmd = [cc, "-O2", "-DNDEBUG", "-ffp-contract=off", "-std=gnu11", "-fPIC", "-shared"]
        cmd += ["-I", str(ggml / "include"), "-I", str(ggml / "src")]
        cmd += [str(ggml / "src" / "ggml-quants.c"), str(SHIM), "-o", str(out), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise Unavailable(f"compiling ggml-quants.c failed: {done.stderr[-500:]}")
        os.replace(out, LIB)
    return LIB


class Reference:
    """ctypes wrappers around the compiled llama.cpp functions."""

    def __init__(self, path: Path) -> None:
        self.lib = ctypes.CDLL(str(path))

    def quantize(self, x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
        """quantize_row_*_ref over the whole array (rows of whole blocks): (*rows, row_bytes)."""
        x = np.ascontiguousarray(x, np.float32)
        size, type_size = GGML_QUANT_SIZES[qtype]
        out = np.empty((x.size // size) * type_size, np.uint8)
        if qtype == T.F16:
            fn = self.lib.ref_fp32_to_fp16_row
        elif qtype == T.BF16:
            fn = self.lib.ref_fp32_to_bf16_row
        else:
            fn = getattr(self.lib, f"quantize_row_{_NAMES[qtype]}_ref")
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn(x.ctypes.data, out.ctypes.data, x.size)
        return out.reshape(*x.shape[:-1], -1)

    def dequantize(self, data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
        """dequantize_row_* over the whole array: (*rows, n) float32."""
        data = np.ascontiguousarray(data, np.uint8)
        size, type_size = GGML_QUANT_SIZES[qtype]
        n = data.size // type_size * size
        out = np.empty(n, np.float32)
        fn = getattr(self.lib, f"dequantize_row_{_NAMES[qtype]}")
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn(data.ctypes.data, out.ctypes.data, n)
        return out.reshape(*data.shape[:-1], -1)
