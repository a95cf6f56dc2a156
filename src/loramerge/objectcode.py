"""Load a relocatable ELF64 object (a compiled kernel's cached machine code) into this process
without LLVM: place its sections in fresh pages, apply its relocations, make the pages
executable.

llvmlite's loader maps a 170 MB library, about 100 MiB of it resident in every process that
loads a kernel, and its import takes 45 ms; the kernels need a few pages. This loads what LLVM's
large code model makes of them on x86-64 Linux (calls and constants through absolute 64-bit
addresses, PC-relative offsets in the unwind tables, numba's environment pointers as common
symbols). Anything else (another machine, another relocation type, a writable section) is
`Unsupported`, and the caller loads it with llvmlite instead. A file cut short or naming a
symbol it does not define raises `ValueError`. Loaded code stays for the life of the process.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

# ELF constants (System V ABI; x86-64 psABI for the relocation types)
_ET_REL, _EM_X86_64 = 1, 62
_SHT_SYMTAB, _SHT_RELA, _SHT_NOBITS, _SHT_REL = 2, 4, 8, 9
_SHF_WRITE, _SHF_ALLOC = 0x1, 0x2
_SHN_UNDEF, _SHN_ABS, _SHN_COMMON = 0, 0xFFF1, 0xFFF2
_R_X86_64_64, _R_X86_64_PC32, _R_X86_64_PLT32, _R_X86_64_PC64 = 1, 2, 4, 24

_PAGE = mmap.PAGESIZE


class Unsupported(Exception):
    """An object this loader does not handle (llvmlite can)."""


@dataclass(frozen=True)
class _Section:
    kind: int
    flags: int
    offset: int
    size: int
    link: int
    info: int
    align: int


@dataclass(frozen=True)
class _Symbol:
    name: str
    section: int
    value: int
    size: int


def undefined_symbols(code: bytes) -> list[str]:
    """The names an ELF64 object leaves for the loader to find; a file that is not a
    little-endian ELF64 object raises `ValueError`."""
    sections = _sections(code)
    return [s.name for s in _symbols(code, sections) if s.section == _SHN_UNDEF and s.name]


def load(code: bytes, symbol: str, resolve: Callable[[str], int]) -> int:
    """The address of `symbol` once the object `code` is loaded; `resolve` gives the address of
    each name the object leaves undefined (0: unknown, which refuses the object)."""
    sections = _sections(code)
    kind, machine = struct.unpack_from("<HH", code, 0x10)
    if kind != _ET_REL or machine != _EM_X86_64 or not sys.platform.startswith("linux"):
        raise Unsupported(f"an ELF object of type {kind} for machine {machine}")
    placed, size = {}, 0
    for index, s in enumerate(sections):
        if s.flags & _SHF_ALLOC and s.size:
            if s.flags & _SHF_WRITE or s.kind == _SHT_REL:
                raise Unsupported("a writable section, or relocations without addends")
            size = _aligned(size, s.align)
            placed[index], size = size, size + s.size
    code_size = _aligned(size, _PAGE) or _PAGE
    # common symbols (numba's environment pointers, never set for cached code) get zeroed,
    # writable memory after the code's pages, each aligned as its value says
    symbols, commons = _symbols(code, sections), {}
    for index, s in enumerate(symbols):
        if s.section == _SHN_COMMON:
            size = _aligned(max(size, code_size), s.value)
            commons[index], size = size, size + s.size
    image = bytearray(_aligned(size, _PAGE) or _PAGE)
    libc = _libc()
    base = _pages(libc, len(image))
    try:
        addresses = [
            base + commons[i] if i in commons else _address(s, placed, base, resolve)
            for i, s in enumerate(symbols)
        ]
        for index, at in placed.items():
            s = sections[index]
            if s.kind != _SHT_NOBITS:
                image[at : at + s.size] = code[s.offset : s.offset + s.size]
        for s in sections:
            if s.kind == _SHT_RELA and s.info in placed:
                target = (placed[s.info], sections[s.info].size)
                _relocate(image, code, s, target, base, addresses)
        wanted = [a for s, a in zip(symbols, addresses, strict=True) if symbol and s.name == symbol]
        if not wanted:
            raise ValueError(f"the object defines no symbol {symbol!r}")
        ctypes.memmove(base, bytes(image), len(image))
        _protect(libc, base, code_size)
    except BaseException:
        libc.munmap(base, len(image))
        raise
    return wanted[0]


def _sections(code: bytes) -> list[_Section]:
    """The section headers of a little-endian ELF64 file."""
    if code[:4] != b"\x7fELF" or code[4:6] != b"\x02\x01":
        raise ValueError("not a little-endian ELF64 object")
    (shoff,) = struct.unpack_from("<Q", code, 0x28)
    entsize, count = struct.unpack_from("<HH", code, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", code, shoff + i * entsize) for i in range(count)]
    sections = [
        _Section(k, f, off, size, ln, inf, al) for _, k, f, _, off, size, ln, inf, al, _ in headers
    ]
    if any(s.kind != _SHT_NOBITS and s.offset + s.size > len(code) for s in sections):
        raise ValueError("a section runs past the end of the file")
    return sections


def _symbols(code: bytes, sections: list[_Section]) -> list[_Symbol]:
    """The symbol table, in its order (relocations refer to symbols by index)."""
    tables = [s for s in sections if s.kind == _SHT_SYMTAB]
    if len(tables) != 1:
        raise ValueError(f"{len(tables)} symbol tables")
    table, strings = tables[0], sections[tables[0].link].offset
    symbols = []
    for at in range(table.offset, table.offset + table.size, 24):
        name, _, _, section, value, size = struct.unpack_from("<IBBHQQ", code, at)
        end = code.index(b"\0", strings + name)
        symbols.append(_Symbol(code[strings + name : end].decode(), section, value, size))
    return symbols


def _aligned(offset: int, alignment: int) -> int:
    """`offset` rounded up to a multiple of `alignment` (0 or 1: none)."""
    return -(-offset // max(alignment, 1)) * max(alignment, 1)


def _address(
    s: _Symbol, placed: dict[int, int], base: int, resolve: Callable[[str], int]
) -> int | None:
    """Where a symbol is once the object is loaded at `base` (None: in no loaded section)."""
    if s.section == _SHN_UNDEF:
        if not s.name:
            return 0  # the null symbol
        address = resolve(s.name)
        if not address:
            raise ValueError(f"nothing in this process is called {s.name!r}")
        return address
    if s.section == _SHN_ABS:
        return s.value
    if s.section not in placed:
        return None  # in a section not loaded (debug info), or a reserved index
    return base + placed[s.section] + s.value


def _relocate(
    image: bytearray,
    code: bytes,
    rela: _Section,
    section: tuple[int, int],
    base: int,
    addresses: list[int | None],
) -> None:
    """Apply a RELA section to its target `section` ((where it is in `image`, its size);
    `image` is loaded at `base`)."""
    at, size = section
    for entry in range(rela.offset, rela.offset + rela.size, 24):
        offset, info, addend = struct.unpack_from("<QQq", code, entry)
        if offset + 8 > size or info >> 32 >= len(addresses):
            raise ValueError("a relocation outside its section, or of no symbol")
        kind, target = info & 0xFFFFFFFF, addresses[info >> 32]
        if target is None:
            raise Unsupported("a relocation against a symbol in no loaded section")
        place = at + offset
        if kind == _R_X86_64_64:
            struct.pack_into("<Q", image, place, (target + addend) % 2**64)
        elif kind == _R_X86_64_PC64:
            struct.pack_into("<Q", image, place, (target + addend - base - place) % 2**64)
        elif kind in (_R_X86_64_PC32, _R_X86_64_PLT32):
            value = target + addend - base - place
            if not -(2**31) <= value < 2**31:
                raise Unsupported("a 32-bit offset that does not reach its target")
            struct.pack_into("<i", image, place, value)
        else:
            raise Unsupported(f"relocation type {kind}")


@cache
def _libc() -> ctypes.CDLL:
    """The C library's mmap, mprotect and munmap, typed."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def _pages(libc: ctypes.CDLL, size: int) -> int:
    """Fresh private pages, readable and writable."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    address = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        raise Unsupported(f"mmap failed: {ctypes.get_errno()}")
    return address


def _protect(libc: ctypes.CDLL, address: int, size: int) -> None:
    """Make loaded pages readable and executable, and no longer writable."""
    if libc.mprotect(address, size, mmap.PROT_READ | mmap.PROT_EXEC):
        raise Unsupported(f"mprotect failed: {ctypes.get_errno()} (a policy against new code?)")
