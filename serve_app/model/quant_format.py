"""The official ChatGLM2 weight-only int8/int4 format: quantize, pack, dequantize (bit-exact with the original code).

  scale = max|W_row| / (2**(bits-1) - 1)        fp16 [out]   (127 for int8, 7 for int4)
  q     = round(W / scale[:, None])             int8 [out, in], in -127..127 or -7..7
  W    ~= q * scale[:, None]
int8 stores q as is. int4 packs two values per byte along the input dim: element 2j in the HIGH nibble,
2j+1 in the LOW nibble, both signed (two's complement), so the stored tensor is int8 [out, in/2].

This is what checkpoints hold and what `dequantize`, the reference every kernel is checked against, reads; the
kernels that run it are serve_app.model.quant_kernels'.
"""

from __future__ import annotations

import torch
from torch import Tensor

SUPPORTED_BITS = (4, 8)


class QuantizationError(ValueError):
    """A tensor or setting the official weight-only format cannot represent."""


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise QuantizationError(f"unsupported quantization bits {bits!r}: ChatGLM2 uses 4 or 8")


def quantize_rows(weight: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Quantize a Linear weight [out, in] per output row: returns (q int8 [out, in], scale fp16 [out]).

    fp16 weights (the checkpoint dtype) go through exactly the original's fp16 arithmetic: the scale is
    max|W|/qmax in fp16 and W/scale is rounded to fp16 before round() (half-to-even), so q is bit-identical to
    the official tool's output. Other dtypes are computed in fp32 against the fp16-rounded scale, so that q
    and the stored scale agree. All-zero rows get scale 0 and q 0.
    """
    _check_bits(bits)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise QuantizationError(f"expected a floating weight [out, in], got {weight.dtype} {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise QuantizationError("weight has NaN or Inf values")
    qmax = 2 ** (bits - 1) - 1
    if weight.dtype == torch.float16:
        work = weight
        scale = weight.abs().amax(dim=-1) / qmax  # [out] fp16
        divisor = scale
    else:
        work = weight.float()
        scale = (work.abs().amax(dim=-1) / qmax).to(torch.float16)  # [out]
        divisor = scale.float()
    if not torch.isfinite(scale).all():
        raise QuantizationError("a row's scale overflows fp16 (|W| > 65504 * qmax)")
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)  # zero rows: 0 / 1 = 0, not NaN
    # The clamp only bites where a subnormal fp16 scale rounded down, where the original wraps around.
    q = torch.round(work / divisor[:, None]).clamp_(-qmax, qmax).to(torch.int8)  # [out, in]
    return q, scale


def pack_int4(q: Tensor) -> Tensor:
    """Pack int8 [out, in] values in -8..7 into int8 [out, in/2]: element 2j high nibble, 2j+1 low nibble."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise QuantizationError(f"expected int8 [out, in], got {q.dtype} {tuple(q.shape)}")
    if q.shape[1] % 2:
        raise QuantizationError(f"int4 packing needs an even number of input features, got {q.shape[1]}")
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise QuantizationError("int4 values must lie in -8..7")
    wide = q.to(torch.int16) & 0xF  # [out, in], two's-complement nibbles 0..15
    packed = (wide[:, 0::2] << 4) | wide[:, 1::2]  # [out, in/2], 0..255
    return packed.to(torch.uint8).view(torch.int8)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of pack_int4: int8 [out, in/2] -> int8 [out, in], sign-extending both nibbles."""
    if packed.dtype != torch.int8 or packed.dim() != 2:
        raise QuantizationError(f"expected packed int8 [out, in/2], got {packed.dtype} {tuple(packed.shape)}")
    high = packed >> 4  # arithmetic shift: already sign-extended
    low = ((packed & 0xF) ^ 8) - 8  # 0..7 stay, 8..15 become -8..-1
    return torch.stack((high, low), dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


def check_official(stored: Tensor, scale: Tensor, bits: int) -> int:
    """Validate official tensors; returns in_features."""
    _check_bits(bits)
    if stored.dtype != torch.int8 or stored.dim() != 2:
        raise QuantizationError(f"expected an int8 [out, in] weight, got {stored.dtype} {tuple(stored.shape)}")
    if scale.dim() != 1 or not scale.is_floating_point():
        raise QuantizationError(f"expected a floating scale [out], got {scale.dtype} {tuple(scale.shape)}")
    if scale.shape[0] != stored.shape[0]:
        raise QuantizationError(
            f"weight has {stored.shape[0]} rows but scale has {scale.shape[0]}: "
            f"expected scale [out] for a weight [out, in{'/2' if bits == 4 else ''}]"
        )
    return stored.shape[1] * (2 if bits == 4 else 1)


def scaled(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """q int8 [out, in] * scale [out] -> dtype [out, in], each product rounded once to dtype."""
    # q (|q| <= 127) and an fp16/bf16 scale multiply exactly in fp32, so fp32 rounds nothing and computing
    # directly in the scale's own dtype rounds once, like the original fp16 code. bf16 output of an fp16 scale
    # goes through fp32 so that the scale itself is not rounded to bf16 first.
    work = dtype if dtype in (scale.dtype, torch.float32, torch.float64) else torch.float32
    return (q.to(work) * scale.to(work)[:, None]).to(dtype)


def dequantize(stored: Tensor, scale: Tensor, bits: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Official tensors -> dense weight [out, in] in dtype: the reference for every fast path.

    stored is int8 [out, in] for 8 bits, packed int8 [out, in/2] for 4 bits; scale is [out].
    """
    check_official(stored, scale, bits)
    q = unpack_int4(stored) if bits == 4 else stored
    return scaled(q, scale, dtype)
