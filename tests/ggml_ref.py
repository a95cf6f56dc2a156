"""llama.cpp's own code, for the tests, built from llama-cpp-python's sdist (whole llama.cpp tree).

`sources()` fetches it with pip once and keeps the few files used under .venv. `build()` compiles
ggml-quants.c (with the shim beside this file) into a small shared library wrapped by `Reference`
(ctypes: `quantize_row_*_ref`, `dequantize_row_*`), as llama.cpp's ggml-base is compiled (no
-march, asserts off) and with -ffp-contract=off, so that no compiler fuses a multiply-add the
x86-64 build does not. `build_type_chooser()` compiles llama-quant.cpp's tensor-type selection
into a small program (llama_quant_harness.cpp); `choose_types` runs it. `convert` runs the
sdist's own convert_hf_to_gguf.py (hf_to_gguf_runner.py), `convert_lora` its
convert_lora_to_gguf.py (lora_to_gguf_runner.py).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

VERSION = "0.3.36"
ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".venv" / f"ggml-ref-{VERSION}"
LIB = CACHE / "libggmlref.so"
CHOOSER = CACHE / "llama-quant-types"
HERE = Path(__file__).resolve().parent
SHIM = HERE / "ggml_ref_shim.c"
HARNESS = HERE / "llama_quant_harness.cpp"
T = TypeVar("T")
Q = GGMLQuantizationType

_NAMES = {
    Q.Q8_0: "q8_0",
    Q.Q4_0: "q4_0",
    Q.Q4_1: "q4_1",
    Q.Q5_0: "q5_0",
    Q.Q5_1: "q5_1",
    Q.Q2_K: "q2_K",
    Q.Q3_K: "q3_K",
    Q.Q4_K: "q4_K",
    Q.Q5_K: "q5_K",
    Q.Q6_K: "q6_K",
}


class Unavailable(Exception):
    """The compiler or the llama-cpp-python sdist is not available here."""


def require(build: Callable[[], T]) -> T:
    """build(), or skip the calling test with the reason it cannot be built here."""
    try:
        return build()
    except Unavailable as exc:
        pytest.skip(f"llama.cpp reference unavailable: {exc}")


def sources() -> Path:
    """The llama.cpp files the tests need, extracted once from the sdist (pip download)."""
    root = CACHE / "llama.cpp"
    if all((root / f).exists() for f in _SENTINELS):
        return root
    shutil.rmtree(root, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary"]
        cmd += [":all:", f"llama-cpp-python=={VERSION}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode or not sdists:
            raise Unavailable(
                f"pip download llama-cpp-python=={VERSION} failed: {done.stderr[-300:]}"
            )
        with tarfile.open(sdists[0]) as tar:
            wanted = [m for m in tar.getmembers() if m.isfile() and _wanted(m.name)]
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=wanted, **safe)
        os.replace(next(Path(tmp).glob("*/vendor/llama.cpp")), root)
    return root


_SENTINELS = (
    "ggml/src/ggml-quants.c",
    "src/llama-quant.cpp",
    "convert_hf_to_gguf.py",
    "convert_lora_to_gguf.py",
)


def _wanted(member: str) -> bool:
    """The sdist members the tests read: headers, three sources, snapshots, the converter."""
    _, _, rel = member.partition("/vendor/llama.cpp/")
    return (
        rel.startswith(("ggml/include/", "ggml/src/", "include/", "src/llama-"))
        and rel.endswith(".h")
        or rel in (*_SENTINELS, "src/llama-arch.cpp")
        or rel.startswith(("tests/snapshots/", "conversion/", "gguf-py/gguf/"))
    )


def _compile(cmd: list[str], out: Path) -> Path:
    """Run a compiler command that writes `out` (atomically into place)."""
    tmp = out.with_name(out.name + ".tmp")
    done = subprocess.run([*cmd, "-o", str(tmp)], capture_output=True, text=True)
    if done.returncode:
        raise Unavailable(f"compiling {out.name} failed: {done.stderr[-500:]}")
    os.replace(tmp, out)
    return out


def _compiler(name: str, fallback: str) -> str:
    found = shutil.which(os.environ.get(name.upper(), name)) or shutil.which(fallback)
    if not found:
        raise Unavailable(f"no {name} or {fallback} compiler on PATH")
    return found


def build() -> Path:
    """The cached shared library of ggml-quants.c, compiled on first use."""
    if LIB.exists():
        return LIB
    cc = _compiler("gcc", "cc")
    ggml = sources() / "ggml"
    cmd = [cc, "-O2", "-DNDEBUG", "-ffp-contract=off", "-std=gnu11", "-fPIC", "-shared"]
    cmd += ["-I", str(ggml / "include"), "-I", str(ggml / "src")]
    return _compile([*cmd, str(ggml / "src" / "ggml-quants.c"), str(SHIM), "-lm"], LIB)


def build_type_chooser() -> Path:
    """The cached executable running llama-quant.cpp's type selection (see the harness)."""
    if CHOOSER.exists():
        return CHOOSER
    cxx = _compiler("g++", "c++")
    root = sources()
    quant = (root / "src" / "llama-quant.cpp").read_text()
    (CACHE / "llama-quant-selection.inc").write_text("\n".join(_selection_code(quant)))
    cmd = [cxx, "-std=c++17", "-O1", "-I", str(CACHE)]
    cmd += [f"-I{root / d}" for d in ("include", "ggml/include", "src")]
    return _compile([*cmd, str(HARNESS), str(root / "src" / "llama-arch.cpp")], CHOOSER)


def _selection_code(src: str) -> list[str]:
    """The parts of llama-quant.cpp that choose tensor types, verbatim, cut at their markers."""

    def cut(start: str, stop: str) -> str:
        at = src.index(start)
        return src[at : src.index(stop, at)]

    return [
        cut("enum class tensor_category {", "static void zeros("),
        cut("static bool tensor_name_match_token_embd", "//\n// dequantization"),
        cut("static bool tensor_allows_quantization", "//\n// quantization implementation"),
        cut("ggml_type llama_ftype_get_default_type", "//\n// main quantization driver"),
        cut("llama_model_quantize_params llama_model_quantize_default_params()", "uint32_t llama_"),
        src[src.index("void llama_quant_compute_types(") :],
    ]


def choose_types(
    chooser: Path, model, ftype: int, pure: bool, tensors: list[tuple[str, tuple[int, ...]]]
) -> dict[str, GGMLQuantizationType | None]:
    """llama.cpp's type for each quantizable (name, numpy shape); None for tensors it keeps."""
    head = f"{model.arch} {model.n_layer} {model.n_head} {model.n_head_kv} {model.n_expert}"
    lines = [f"{head} {int(ftype)} {int(pure)}"]
    for name, shape in tensors:
        ne = [*reversed(shape), 1, 1, 1, 1][:4]
        lines.append(f"{name} {' '.join(map(str, ne))}")
    done = subprocess.run([str(chooser)], input="\n".join(lines), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = (line.split() for line in done.stdout.splitlines())
    return {n: None if t == "keep" else GGMLQuantizationType(int(t)) for n, t in rows}


def convert(models: dict[str, Path], out_dir: Path, outtypes: list[str]) -> dict:
    """llama.cpp's convert_hf_to_gguf.py on each model at each --outtype (vocabulary left out).

    One process for all (the converter's imports dominate); {(model, outtype): file}.
    """
    files = {(m, t): out_dir / f"{i}-{t}.gguf" for i, m in enumerate(models) for t in outtypes}
    jobs = [f"{models[m]}={t}={path}" for (m, t), path in files.items()]
    cmd = [sys.executable, str(HERE / "hf_to_gguf_runner.py"), str(sources()), *jobs]
    done = subprocess.run(cmd, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return files


def convert_lora(jobs: list[tuple[Path, str]], base: Path, out_dir: Path) -> dict:
    """llama.cpp's convert_lora_to_gguf.py on each (adapter, outtype), the base's config from
    `base`, in one process; {(adapter folder name, outtype): file}."""
    files = {(Path(a).name, t): out_dir / f"{Path(a).name}-{t}.gguf" for a, t in jobs}
    args = [f"{a}={t}={files[Path(a).name, t]}" for a, t in jobs]
    cmd = [sys.executable, str(HERE / "lora_to_gguf_runner.py"), str(sources()), str(base)]
    done = subprocess.run([*cmd, *args], capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return files


class Reference:
    """ctypes wrappers around the compiled llama.cpp functions."""

    def __init__(self, path: Path) -> None:
        self.lib = ctypes.CDLL(str(path))

    def quantize(self, x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
        """quantize_row_*_ref over the whole array (rows of whole blocks): (*rows, row_bytes)."""
        x = np.ascontiguousarray(x, np.float32)
        size, type_size = GGML_QUANT_SIZES[qtype]
        out = np.empty((x.size // size) * type_size, np.uint8)
        if qtype == Q.F16:
            fn = self.lib.ref_fp32_to_fp16_row
        elif qtype == Q.BF16:
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
