"""Triton W8A16 / W4A16 matmuls that read the official ChatGLM2 weight bytes directly.

    y[m, n] = scale[n] * sum_k x[m, k] * q[n, k]        x fp16/bf16 [M, K], q int8, scale fp16 [N]

int8 weights are the official int8 [N, K]; int4 weights are the official packed int8 [N, K/2] (element 2j in the
high nibble, 2j+1 in the low nibble, both signed), so nothing is repacked at load: each program loads a
[BLOCK_N, BLOCK_K/2] byte tile once (coalesced along K), splits it into its high and low nibbles with two shifts,
and multiplies them against the even and odd columns of x. Products accumulate in fp32 on the tensor cores
(`tl.dot`); the per-row scale is applied once, to the fp32 sum.

Small batches (decode) are memory-bound: the weight tile is the only large read, so the grid is split along K as
well (SPLIT_K programs per output tile, their fp32 partial sums added afterwards) until there are enough programs
to keep every SM streaming. Larger batches run as a plain tiled GEMM. `choose_config` is the one place the tile
sizes come from. The kernels also run on CPU tensors under TRITON_INTERPRET=1 (how the tests check them against
the dequantize reference); importing this module needs the triton package, which the caller checks first.

The model calls them as the custom op `torch.ops.chatglm2.weight_only_matmul` (registered here, with a fake
implementation for shapes), so torch.compile and export see one opaque op instead of breaking the graph at a
Python kernel launch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int  # unpacked input features per step (int4: BLOCK_K/2 bytes of each weight row)
    split_k: int
    num_warps: int
    num_stages: int


def choose_config(m: int, n: int, k: int, bits: int, num_sms: int) -> TileConfig:
    """Tile sizes for y [m, n] = x [m, k] @ w^T. Written from the shapes, not tuned on hardware yet.

    Decode (m <= 16) streams weights: 64 output rows per program and enough K splits for ~2 programs per SM.
    Mid batches (m <= 64) keep the weight tile reused across m. Larger batches use GEMM-sized tiles.
    tests/model/test_quant_triton_aot.py compiles every kernel these lead to on the 6B shapes for sm_90 and sm_80
    (no GPU needed): a change here must keep them free of register spills, within a block's shared memory, and
    loading through cp.async.
    """
    if m <= 16:
        block_m, block_n, block_k, warps, stages = 16, 64, 256 if bits == 8 else 512, 4, 3
    elif m <= 64:
        block_m, block_n, block_k, warps, stages = (32 if m <= 32 else 64), 64, 128, 4, 4
    else:
        block_m, block_n, block_k, warps, stages = 64, 128, 64, 8, 4
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    k_steps = triton.cdiv(k, block_k)
    split_k = 1
    # Split K only while a split still gets several K steps and the grid is short of two programs per SM.
    while tiles * split_k < 2 * num_sms and k_steps // (split_k * 2) >= 4 and m <= 64:
        split_k *= 2
    return TileConfig(block_m, block_n, block_k, split_k, warps, stages)


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    """a [M, K] @ b^T for b [N, K], accumulated in fp32. DOT_FP32: through fp32 operands (see weight_only_matmul)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)))
    return tl.dot(a, tl.trans(b))


@triton.jit
def _store_scaled(acc, scale_ptr, y_ptr, pid_k, offs_m, offs_n, M, N, stride_ys, stride_ym):
    """The epilogue of both kernels: acc [BM, BN] times the per-row scale, stored to split pid_k's slice of y."""
    scale = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)  # [BN]
    acc = acc * scale[None, :]
    y = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _w8a16_kernel(
    x_ptr, w_ptr, scale_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_ys, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    K_STEPS: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, K_STEPS):
        k = (step * SPLIT_K + pid_k) * BLOCK_K + offs_k  # split pid_k takes every SPLIT_K-th tile
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                    mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0)  # [BM, BK]
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + k[None, :],
                    mask=(offs_n[:, None] < N) & (k[None, :] < K), other=0)  # int8 [BN, BK]
        # |q| <= 127 is exact in fp16 and bf16; through fp32 because the interpreter cannot cast ints to bf16
        w = w.to(tl.float32).to(x.dtype)
        acc += _dot(x, w, DOT_FP32)
    _store_scaled(acc, scale_ptr, y_ptr, pid_k, offs_m, offs_n, M, N, stride_ys, stride_ym)


@triton.jit
def _w4a16_kernel(
    x_ptr, w_ptr, scale_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_ys, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    K_STEPS: tl.constexpr, DOT_FP32: tl.constexpr,
):
    HALF_K: tl.constexpr = BLOCK_K // 2
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, HALF_K)  # packed byte columns: byte j holds input features 2j (high) and 2j+1 (low)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    half_k = K // 2
    for step in range(0, K_STEPS):
        j = (step * SPLIT_K + pid_k) * HALF_K + offs_j  # split pid_k takes every SPLIT_K-th tile
        x_mask = (offs_m[:, None] < M) & (j[None, :] < half_k)
        x_rows = x_ptr + offs_m[:, None] * stride_xm + 2 * j[None, :]
        x_even = tl.load(x_rows, mask=x_mask, other=0.0)  # [BM, BK/2], features 2j
        x_odd = tl.load(x_rows + 1, mask=x_mask, other=0.0)  # [BM, BK/2], features 2j+1
        packed = tl.load(w_ptr + offs_n[:, None] * stride_wn + j[None, :],
                         mask=(offs_n[:, None] < N) & (j[None, :] < half_k), other=0)  # int8 [BN, BK/2]
        high = packed >> 4  # arithmetic shift keeps the sign: -8..7
        low = (packed << 4).to(tl.int8) >> 4  # move the low nibble up, then shift back down sign-extending
        high = high.to(tl.float32).to(x_even.dtype)  # through fp32: see _w8a16_kernel
        low = low.to(tl.float32).to(x_odd.dtype)
        acc += _dot(x_even, high, DOT_FP32)
        acc += _dot(x_odd, low, DOT_FP32)
    _store_scaled(acc, scale_ptr, y_ptr, pid_k, offs_m, offs_n, M, N, stride_ys, stride_ym)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: one program at a time, so never split K for parallelism


def weight_only_matmul(x: Tensor, weight: Tensor, scale: Tensor, bits: int, config: TileConfig | None = None) -> Tensor:
    """x [M, K] fp16/bf16 @ official weight^T -> [M, N] in x's dtype.

    weight: int8 [N, K] (bits 8) or packed int8 [N, K/2] (bits 4); scale [N] (any float dtype). K must be even for
    int4. Raises ValueError for mismatched shapes or dtypes.
    """
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"expected fp16/bf16 x [M, K], got {x.dtype} {tuple(x.shape)}")
    m, k = x.shape
    n = weight.shape[0]
    if weight.dtype != torch.int8 or weight.shape[1] * (2 if bits == 4 else 1) != k or scale.shape != (n,):
        raise ValueError(f"weight {weight.dtype} {tuple(weight.shape)} / scale {tuple(scale.shape)} do not fit "
                         f"int{bits} with {k} input features")
    x = x.contiguous()
    if x.data_ptr() % 16:
        # Triton's JIT specializes on 16-byte alignment: a misaligned view (a slice of a larger activation) would
        # compile a variant with byte-wide loads and register spills (tests/model/test_quant_triton_aot.py).
        x = x.clone()
    weight = weight.contiguous()
    config = config or choose_config(m, n, k, bits, _num_sms(x.device))
    if config.split_k == 1:
        out = torch.empty(1, m, n, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(config.split_k, m, n, dtype=torch.float32, device=x.device)  # partial sums
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), config.split_k)
    kernel = _w8a16_kernel if bits == 8 else _w4a16_kernel
    kernel[grid](
        x, weight, scale, out,
        m, n, k,
        x.stride(0), weight.stride(0), out.stride(0), out.stride(1),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
        # The loop count is a compile-time constant (one per layer shape): the interpreter, under numpy >= 2.4,
        # cannot take a runtime tensor as a loop bound.
        K_STEPS=triton.cdiv(k, config.block_k * config.split_k),
        # The interpreter (CPU tensors) computes bf16 dots on the raw bits; fp32 operands hold bf16 values exactly.
        DOT_FP32=x.is_cpu and x.dtype == torch.bfloat16,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out[0] if config.split_k == 1 else out.sum(0).to(x.dtype)


@torch.library.custom_op("chatglm2::weight_only_matmul", mutates_args=())
def weight_only_matmul_op(x: Tensor, weight: Tensor, scale: Tensor, bits: int) -> Tensor:
    """`weight_only_matmul` as a torch op (tile sizes from `choose_config`)."""
    return weight_only_matmul(x, weight, scale, bits)


@weight_only_matmul_op.register_fake
def _(x: Tensor, weight: Tensor, scale: Tensor, bits: int) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])
