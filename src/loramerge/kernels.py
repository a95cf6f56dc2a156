"""The compiled kernels (`compare_kernel`: the check's, and the bfloat16 rounding merges use),
called as C functions through ctypes.

numba compiles each kernel once per dtype combination as a C function (`compare_kernel.
c_function`) and its machine code is kept in a cache folder; a later process loads that code
itself (`objectcode`; llvmlite on machines other than x86-64) and never imports numba, whose
imports and registries cost 0.3-0.5 s of every check's start (most of it holding the GIL), nor,
on x86-64, llvmlite (45 ms and 100 MiB of resident library). The cache is keyed by the kernels'
source, numba's and llvmlite's versions and the CPU (`_cpu`: code built for one CPU may not run
on another); anything amiss with a cached file sends that kernel back through numba.

Each wrapper takes the numpy arrays `compare_kernel`'s function of the same name takes, checks
what the C function cannot (dtypes, contiguity, sizes), and passes pointers and sizes.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import struct
import sys
import tempfile
import threading
from collections.abc import Callable
from functools import cache
from importlib import metadata
from pathlib import Path

import numpy as np

from loramerge import blocked, objectcode

_P, _N = ctypes.c_void_p, ctypes.c_ssize_t
_BOUNDED = (_P, _P, _P, _N)  # judge_bounded's block: got, want, terms, the terms' row stride
_BOUNDED += (_P, _N, _P, _N, _P, _N, _N, _N, _P, _N)  # the bounds, the factors
_BOUNDED += (ctypes.c_double, _N, _N, _P, _P, _N)  # the tolerance, the format, the scratch row
# argument and result types of each kind of C function (compare_kernel.c_function)
_SIGNATURES = {
    "measure": (None, (_P, _P, _P, _N, _P, _N, _P, _N, _N, _N, _P, _N)),
    "judge": (ctypes.c_int32, (_P, _P, _P, _N, _N, _P, _N)),
    "bounded": (ctypes.c_int32, _BOUNDED),
    "round": (None, (_P, _P, _N)),
    "round_sum": (None, (_P, _P, _P, _N, _N, _N)),
}
_CODES = {np.dtype(np.uint16): "u16", np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
_SOURCES = ("compare_kernel.py", "intrinsics.py")

_lock = threading.Lock()
_local = threading.local()
_loaded: dict[str, Callable] = {}
_engine = None  # llvmlite's execution engine holding the cached code (kept alive)
_built: list = []  # the C functions numba compiled here, kept alive with their code


def measure(got, want, delta, scale, allowance, mantissa: int, emin: int, out) -> None:
    """`compare_kernel.measure`: fold every element of `got` against `want` (+ `delta`) into
    `out`; `delta`, `scale` and `allowance` may be empty."""
    n = _size(got, want)
    for optional in (delta, scale, allowance):
        _size(got, optional, empty_too=True)
    name = f"measure-{_code(got)}-{_code(want)}-{_code(scale)}"
    kernel(name)(
        *(_at(got), _at(want), _at(delta, np.float64), delta.size, _at(scale), scale.size),
        *(_at(allowance, np.float64), allowance.size, mantissa, emin, _out(out), n),
    )


def judge(got, want, delta, mantissa: int, emin: int, out) -> bool:
    """`compare_kernel.judge` (uint16 bfloat16 bits against uint16 W0 + float64 terms)."""
    n = _size(got, want, delta)
    arrays = _at(got, np.uint16), _at(want, np.uint16), _at(delta, np.float64)
    return bool(kernel("judge")(*arrays, mantissa, emin, _out(out), n))


def judge_bounded(
    got, want, terms, rows_bound, cols_bound, left, right, tol: float, mantissa: int, emin: int
) -> bool:
    """`compare_kernel.judge_bounded`: whether a block of uint16 bfloat16 rows is within `tol`
    ulps of uint16 W0 + left @ right, decided from float32 terms and their bounds. `terms` may
    be rows x cols of a wider buffer (`rows_apart`); `left` may be a strided view (rows x rank:
    a factor's transpose is not copied); `right` is contiguous."""
    rows, cols = rows_bound.size, cols_bound.size
    _size(got, want)
    stride = rows_apart(terms, rows, cols)
    rank = right.size // max(cols, 1)
    if got.size != rows * cols or left.shape != (rows, rank) or right.size != rank * cols:
        raise ValueError(f"a {rows} x {cols} block, rank {rank}, does not fit these arrays")
    if left.dtype != np.float64 or any(s % 8 or s < 0 for s in left.strides):
        raise ValueError("a kernel takes float64 factors with whole, forward element steps")
    row, step = (s // 8 for s in left.strides)
    extent = (rows - 1) * row + (rank - 1) * step + 1 if left.size else 0
    block = _at(got, np.uint16), _at(want, np.uint16), _at(terms, np.float32, rows=True), stride
    bounds = _at(rows_bound, np.float64), rows, _at(cols_bound, np.float64), cols
    factors = left.ctypes.data, extent, row, step, _at(right, np.float64), rank
    flags = _flags(cols)
    scratch = flags.ctypes.data, flags.ctypes.data, flags.size // 8
    return bool(kernel("bounded")(*block, *bounds, *factors, tol, mantissa, emin, *scratch))


def _flags(cols: int) -> np.ndarray:
    """This thread's row of scratch bytes for `judge_bounded`, `cols` rounded up to a multiple
    of 8 (the kernel reads past `cols` only as part of a word whose columns it bounds)."""
    flags = getattr(_local, "flags", None)
    if flags is None or flags.size < cols:
        flags = _local.flags = np.zeros(-(-cols // 8) * 8, np.uint8)
    return flags[: -(-cols // 8) * 8]


def round_to_bfloat16(values, out) -> None:
    """`compare_kernel.round_to_bfloat16`: float32 values into uint16 bfloat16 bits."""
    n = _size(values, out)
    kernel("round")(_at(values, np.float32), _at(out, np.uint16), n)


def round_sum_to_bfloat16(w0, delta, out) -> None:
    """`compare_kernel.round_sum_to_bfloat16`: uint16 W0 + float32 delta into uint16 bits. W0
    and out are flat or rows x cols; `delta` the same, or rows x cols of a wider buffer."""
    n = _size(w0, out)
    rows, cols = delta.shape if delta.ndim == 2 else (1, delta.size)
    stride = rows_apart(delta, rows, cols)
    if rows * cols != n:
        raise ValueError(f"kernel arrays of {n} and {rows * cols} elements")
    arrays = _at(w0, np.uint16), _at(delta, np.float32, rows=True), _at(out, np.uint16)
    kernel("round_sum")(*arrays, n, cols, stride)


def rows_apart(array: np.ndarray, rows: int, cols: int) -> int:
    """The elements from one row's start to the next of `array`: rows x cols with contiguous
    columns and whole, forward rows, or `rows * cols` contiguous elements, as the kernels read
    it; refused otherwise."""
    if array.ndim == 2 and array.shape == (rows, cols) and rows > 1:
        row, col = array.strides
        if col == array.itemsize and row % col == 0 and row >= cols * col:
            return row // col
    elif array.flags.c_contiguous and array.size == rows * cols:
        return cols
    raise ValueError(f"a kernel takes {rows} x {cols} rows with contiguous columns")


class _Bfloat16Rounding:
    """`blocked.Rounding` by the compiled kernels: float32 blocks into bfloat16 rows."""

    def round(self, acc: np.ndarray, into: np.ndarray) -> None:
        """`round_to_bfloat16` over a block of any shape."""
        round_to_bfloat16(acc.reshape(-1), into.reshape(-1).view(np.uint16))

    def round_sum(self, w0: np.ndarray, delta: np.ndarray, into: np.ndarray) -> None:
        """`round_sum_to_bfloat16` over bfloat16 blocks of any shape (`delta`'s rows may be
        apart, as `blocked.merge_rows` pads them)."""
        terms = delta if delta.ndim == 2 else delta.reshape(-1)
        flat = w0.reshape(-1).view(np.uint16), terms, into.reshape(-1).view(np.uint16)
        round_sum_to_bfloat16(*flat)


BFLOAT16 = _Bfloat16Rounding()


def rounding():
    """The bfloat16 rounding a merge uses (`blocked.Rounding`): the compiled kernels where
    their machine code is kept between processes (Linux), else numpy's cast, where every
    process would compile them with numba again (about 1.5 s and 110 MiB); the same bits."""
    return BFLOAT16 if sys.platform.startswith("linux") else blocked.CAST


def kernel(name: str) -> Callable:
    """The C function `name` (its kind, then its dtypes: "measure-u16-u16-f64"), from the
    cache when it holds it, else compiled by numba now and added to the cache."""
    with _lock:
        function = _loaded.get(name)
        if function is None:
            restype, argtypes = _SIGNATURES[name.split("-")[0]]
            file = cache_folder() / f"{name}.o"
            address = _cached(file) or _compiled(name, file)
            function = _loaded[name] = ctypes.CFUNCTYPE(restype, *argtypes)(address)
        return function


def cache_folder() -> Path:
    """Where this machine's compiled kernels are kept: $LORAMERGE_KERNEL_CACHE, else the user's
    cache folder; one subfolder per key (`_key`)."""
    root = os.environ.get("LORAMERGE_KERNEL_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(base) / "loramerge" / "kernels"
    return Path(root) / _key()


def _key() -> str:
    """What the machine code depends on: the kernels' source, the compilers, the CPU."""
    digest = hashlib.sha256()
    here = Path(__file__).parent
    for source in _SOURCES:
        digest.update((here / source).read_bytes())
    for part in (metadata.version("numba"), metadata.version("llvmlite"), sys.platform, _cpu()):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:20]


# /proc/cpuinfo's lines that name a core and its features (x86, then Arm); LLVM reads the same
# CPUID (or ID registers) when numba compiles for "the host"
_CPU_LINES = ("vendor_id", "cpu family", "model", "model name", "stepping", "flags")
_CPU_LINES += ("CPU implementer", "CPU architecture", "CPU variant", "CPU part", "Features")
_CPUINFO = Path("/proc/cpuinfo")


def _cpu() -> str:
    """The CPU the code is compiled for: its machine, and /proc/cpuinfo's identity and feature
    lines for the first core (read without importing llvmlite, whose library alone would be
    100 MiB of every process's memory); elsewhere the platform's name for the processor."""
    try:
        first = _CPUINFO.read_text().split("\n\n", 1)[0]
    except OSError:
        return f"{platform.machine()}\n{platform.processor()}"
    named = [line for line in first.splitlines() if line.split(":")[0].strip() in _CPU_LINES]
    return "\n".join([platform.machine(), *named])


def _cached(file: Path) -> int:
    """The address of a kernel loaded from its cache file, or 0 when that is not usable."""
    try:
        symbol, _, code = file.read_bytes().partition(b"\n")
        name = symbol.decode()
    except (OSError, UnicodeDecodeError):
        return 0
    damaged = (RuntimeError, ValueError, struct.error, IndexError)
    try:
        return objectcode.load(code, name, _symbol)
    except objectcode.Unsupported:
        pass  # another machine's code: llvmlite's loader
    except damaged:
        return 0
    try:
        return _cached_by_llvm(code, name)
    except damaged:
        return 0


def _cached_by_llvm(code: bytes, symbol: str) -> int:
    """A cached kernel loaded by llvmlite, for objects `objectcode` does not load (another
    machine than x86-64)."""
    global _engine
    import llvmlite.binding as llvm

    # LLVM aborts the process on a name it cannot resolve, so none may be left unresolved
    for needed in objectcode.undefined_symbols(code):
        if not llvm.address_of_symbol(needed):
            address = _symbol(needed)
            if not address:
                return 0
            llvm.add_symbol(needed, address)
    if _engine is None:
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        machine = llvm.Target.from_default_triple().create_target_machine()
        _engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), machine)
    _engine.add_object_file(llvm.ObjectFileRef.from_data(code))
    _engine.finalize_object()
    return _engine.get_function_address(symbol)


def _compiled(name: str, file: Path) -> int:
    """Compile a kernel with numba, keep its machine code in `file`, return its address."""
    from loramerge import compare_kernel

    function = compare_kernel.c_function(name)
    _built.append(function)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=file.parent, suffix=".tmp", delete=False) as f:
            f.write(function.native_name.encode() + b"\n" + compare_kernel.machine_code(function))
        os.replace(f.name, file)
    except OSError:
        pass  # an unwritable cache: numba compiles it again next time
    return function.address


def _code(array: np.ndarray) -> str:
    """A kernel's name for an array's dtype."""
    return _CODES[array.dtype]


def _at(array: np.ndarray, dtype: type | None = None, rows: bool = False) -> int:
    """The address of an array the C function reads as `dtype` (by default the array's own,
    one of those it takes), refused where it would misread it: another dtype, strides (but
    for rows apart, with `rows`, that `rows_apart` has checked)."""
    if (dtype is not None and array.dtype != dtype) or array.dtype not in _CODES:
        raise ValueError(f"a kernel cannot take a {array.dtype} array here")
    if not (rows or array.flags.c_contiguous):
        raise ValueError("a kernel takes contiguous arrays")
    return array.ctypes.data


def _out(array: np.ndarray) -> int:
    """The address of `measure`'s or `judge`'s seven float64 figures."""
    if array.size != 7:
        raise ValueError(f"a kernel folds into 7 figures, not {array.size}")
    return _at(array, np.float64)


def _size(first: np.ndarray, *others: np.ndarray, empty_too: bool = False) -> int:
    """The arrays' common size (an empty one allowed, with `empty_too`)."""
    for other in others:
        if other.size != first.size and not (empty_too and other.size == 0):
            raise ValueError(f"kernel arrays of {first.size} and {other.size} elements")
    return first.size


def _symbol(name: str) -> int:
    """The address a cached kernel's undefined `name` is given: found in this process (the C
    library, libm, Python's C API), or, for numba's runtime, a stand-in (0: none). numba's
    C-function wrapper reaches its runtime only to report an exception, which these kernels
    never raise (no allocation, no bounds checks, numpy's error model); the stand-in aborts,
    loudly, should one ever be reached."""
    for library in _libraries():
        try:
            return ctypes.addressof(ctypes.c_char.in_dll(library, name))
        except ValueError:
            continue
    if name.startswith(("numba_", "NRT_")):
        return ctypes.cast(_UNREACHABLE, ctypes.c_void_p).value
    return 0


@cache
def _libraries() -> list[ctypes.CDLL]:
    """Where `_symbol` looks: this process's global names, then libm (where Python does not
    link it)."""
    found = [ctypes.CDLL(None)]
    with contextlib.suppress(OSError):
        found.append(ctypes.CDLL("libm.so.6"))
    return found


@ctypes.CFUNCTYPE(None)
def _UNREACHABLE() -> None:
    """Where a cached kernel's calls into numba's runtime lead (see `_symbol`)."""
    os.write(2, b"loramerge: a compiled kernel called numba's runtime; aborting\n")
    os.abort()
