"""NF4 quantization in torch, for CUDA: quant/nf4.py's arithmetic (bitsandbytes' CPU reference),
step for step, so the bytes are the same on any device.

The per-element work (block absmax, scaling, code search, packing) runs where the tensor is;
the double quantization of the small absmax vector runs in numpy (`nf4.assemble`), because the
offset must be summed in the order torch sums on the CPU. Every step is exactly rounded float32
arithmetic or a comparison, which CUDA does as the CPU does: a full block is scaled by
x * (1 / max(absmax, 1e-38)), the short last block by x / max(absmax, 1e-38), and the code is
the count of the 15 float32 midpoints strictly below the scaled value.

bitsandbytes' own CUDA kernel (kQuantizeBlockwise) differs from its CPU reference, and so from
this, in three places: it scales the short last block by the reciprocal too, an all-zero block
gets absmax 0 and codes 0 (0 * inf is NaN, which its comparison tree sends to code 0), and with
double quantization its offset is a CUDA sum and its nested codes come from a binary search of
the dynamic map instead of the CPU's 65536-cell table. Its 15 thresholds are the same float32
midpoints, so on whole blocks without zero blocks and without double quantization the packed
codes and absmax agree bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from loramerge.quant import nf4

_MIDPOINTS = torch.from_numpy(nf4.MIDPOINTS)
_TINY = float(nf4.TINY)
_ZERO_CODE = 7  # the code of 0.0, which pads an odd element count


def quantize(values: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> nf4.NF4:
    """NF4 of a float tensor on its own device; the same bytes as `nf4.quantize` of it."""
    packed, absmax = quantize_codes(values, blocksize)
    dtype = str(values.dtype).removeprefix("torch.")
    return nf4.assemble(packed, absmax, tuple(values.shape), dtype, blocksize, double_quant)


def quantize_codes(values: torch.Tensor, blocksize: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The first level of `quantize` (whole blocks but for the last): packed codes and float32
    block absmax, on the CPU; the same bytes as `nf4.quantize_codes` of it."""
    if blocksize not in nf4.BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {nf4.BLOCKSIZES}, not {blocksize}")
    if values.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"NF4 quantizes bfloat16, float16 or float32, not {values.dtype}")
    flat = values.reshape(-1).float()
    n = flat.numel()
    full = (n // blocksize) * blocksize
    grid = flat[:full].view(-1, blocksize)
    absmax = grid.abs().amax(dim=1) if full else flat.new_empty(0)
    scaled = torch.empty(n + n % 2, dtype=torch.float32, device=flat.device)
    torch.mul(grid, absmax.clamp_min(_TINY).reciprocal()[:, None], out=scaled[:full].view_as(grid))
    if full < n:
        tail = flat[full:].abs().amax().clamp_min(_TINY).reshape(1)
        torch.div(flat[full:], tail, out=scaled[full:n])
        absmax = torch.cat([absmax, tail])
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("NaN or Inf among the values: NF4 cannot hold them")
    codes = torch.bucketize(scaled, _MIDPOINTS.to(flat.device), out_int32=True).to(torch.uint8)
    if n % 2:
        codes[n] = _ZERO_CODE
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.cpu().numpy(), absmax.cpu().numpy()
