"""The kernels a QuantizedLinear runs, one class each, and the one place a layer's kernel is chosen (`kernel_class`).

A config asks for one of QUANT_KERNELS: "auto" (the device's fast kernel), one family by name, or the reference.
The kernel each layer runs is in its `kernel_name` (and, per model, in the engine stats and the startup log):

  device  bits  family  compute dtype  class / kernel_name               layout / notes
  cuda    8     triton  fp16 or bf16   TritonKernel    triton_w8a16      the official int8 [out, in]; any shape; sm_80+
  cuda    4     triton  fp16 or bf16   TritonKernel    triton_w4a16      the official packed [out, in/2]; any shape
  cuda    8     native  any float      CudaInt8Kernel  int8pack_mm       torch's one-output-per-thread fp32 kernel
  cuda    4     native  bf16           CudaInt4Kernel  int4pack_mm_cuda  tinygemm: out % 8 == 0, in % 32 == 0
  cpu     8     native  any float      CpuInt8Kernel   int8pack_mm       in % 16 == 0; bf16 runs SIMD code on x86,
                                                                         fp32/fp16 scalar loops, so above 4 rows
                                                                         they dequantize
  cpu     4     native  any float      CpuInt4Kernel   int4pack_mm_cpu   out % 16 == 0, in % 32 == 0; same SIMD split
  cpu     4/8   triton  fp16 or bf16   TritonKernel    triton_w*a16      only under TRITON_INTERPRET=1 (the tests)
  any     4/8   dequant any float      DequantKernel   dequant           the reference; the official bytes
"auto" is triton on CUDA, native on CPU.

Measured on CPU (docs/benchmarks.md): both native CPU kernels are compute-bound, at about the same cost per
weight, so INT4 decodes only as fast as INT8 there although it reads half the bytes. GPU speeds are not
measured yet (scripts/quant_gpu_check.py measures them).

Activations are never narrowed: a kernel runs only on the compute dtype it supports natively (bf16 is the
fast compute dtype for quantized weights on CPU; the Triton kernels take the model's fp16 on GPU). The native
kernels take the scale in the compute dtype: exact for fp32 and fp16, rounded to bf16 (relative 2**-9) for
bf16 compute; the Triton kernels apply the fp16 scale in fp32 to the fp32 sum.

A kernel object holds no tensors: the layer keeps the buffers `pack` makes at load (so they count as the model's
weights and torch.compile sees them as buffers) and hands them to `matmul`.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from serve_app.model.quant_format import QuantizationError, pack_int4, scaled, unpack_int4

# What a config may ask for: the device's fast kernel, one family explicitly, or the reference path.
QUANT_KERNELS = ("auto", "triton", "native", "dequant")

# The CPU weight-only kernels run SIMD code only for bf16 activations on x86; for fp32/fp16 they are scalar
# loops (~10x slower per row than the bf16 path), so more rows than this go through dequantize + BLAS instead.
_SCALAR_KERNEL_MAX_ROWS = 4
# Group sizes the int4 kernels accept; every group of a row gets that row's scale.
_INT4_GROUP_SIZES = (256, 128, 64, 32)
# Rows repacked per call when loading int4 for the CPU kernel (bounds the int32 temporary the converter needs);
# a multiple of every CPU block height (16, 32, 64), so the chunks' packed bytes simply concatenate.
_CPU_INT4_PACK_ROWS = 1024
# Candidate CPU int4 layouts: (rows per block, full blocks keep nibbles as [low half | high half] of the block
# instead of interleaved). The one this torch build uses is identified by a round trip, see _cpu_int4_layout.
_CPU_INT4_LAYOUTS = ((64, True), (32, True), (32, False), (16, False))


class KernelUnavailable(QuantizationError):
    """The kernel asked for cannot run this layer here (package, device, shape, dtype) or disagrees with the
    dequantize reference at load. Raised unless the caller allows the dequantize fallback."""


class Kernel(abc.ABC):
    """One way to compute x @ W^T for an official int8/int4 weight [out_features, in_features].

    Constructing one checks that it can run such a layer in `dtype` on `device` (KernelUnavailable if not); `pack`
    makes its layout once at load, `matmul` runs it, `values` and `official` read the layout back. `check_rows` are
    the batch sizes the layer's load-time check runs it at, one per code path; `max_rows`, where set, is the largest
    batch it is fast for (larger ones dequantize).
    """

    name: str  # the layer's kernel_name
    family: str  # the QUANT_KERNELS choice it belongs to
    check_rows: tuple[int, ...] = (1, 5)  # PyTorch's kernels: one code path per dtype, and the scalar-row cap

    def __init__(self, bits: int, out_features: int, in_features: int, dtype: torch.dtype, device: torch.device):
        self.bits, self.out_features, self.in_features = bits, out_features, in_features
        self.dtype = dtype
        self.max_rows: int | None = None

    def pack(self, stored: Tensor, scale: Tensor) -> tuple[Tensor, Tensor | None]:
        """(weight, scale) in this kernel's layout from the official tensors on the device; scale None where the
        kernel reads the official fp16 one. The default keeps the official bytes as they are."""
        return stored.contiguous(), None

    @abc.abstractmethod
    def matmul(self, x2d: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        """x2d [rows, in] in the compute dtype -> [rows, out]; weight and scale as `pack` made them (the official
        scale where pack gave None)."""

    def values(self, weight: Tensor) -> Tensor:
        """The quantized values, int8 [out, in], read back from this kernel's weight."""
        return unpack_int4(weight) if self.bits == 4 else weight

    def official(self, weight: Tensor) -> Tensor:
        """The official stored tensor (int8 [out, in], or packed [out, in/2]) of this kernel's weight."""
        return weight


class DequantKernel(Kernel):
    """The reference: the official bytes dequantized on every call, then a dense matmul."""

    name = family = "dequant"
    check_rows = ()  # what the other kernels are checked against

    def matmul(self, x2d: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        return F.linear(x2d, scaled(self.values(weight), scale, self.dtype))


class TritonKernel(Kernel):
    """serve_app.model.quant_triton's W8A16/W4A16 matmuls, reading the official bytes as they are (any shape)."""

    family = "triton"
    check_rows = (1, 24, 80)  # the kernels pick tiles by batch (<= 16, <= 64, more): one batch in each bucket

    def __init__(self, bits: int, out_features: int, in_features: int, dtype: torch.dtype, device: torch.device):
        super().__init__(bits, out_features, in_features, dtype, device)
        reason = triton_unavailable(device)
        if reason:
            raise KernelUnavailable(reason)
        if dtype not in (torch.float16, torch.bfloat16):
            raise KernelUnavailable(f"the Triton kernels compute in fp16 or bf16, not {dtype}")
        self.name = f"triton_w{bits}a16"

    def pack(self, stored: Tensor, scale: Tensor) -> tuple[Tensor, Tensor | None]:
        import serve_app.model.quant_triton  # noqa: F401  (registers torch.ops.chatglm2.weight_only_matmul)

        return super().pack(stored, scale)

    def matmul(self, x2d: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        return torch.ops.chatglm2.weight_only_matmul(x2d, weight, scale, self.bits)


class CpuInt8Kernel(Kernel):
    """PyTorch's CPU int8 weight-only kernel on the official int8 bytes, kept 64-byte aligned for its SIMD loads."""

    name, family = "int8pack_mm", "native"

    def __init__(self, bits: int, out_features: int, in_features: int, dtype: torch.dtype, device: torch.device):
        super().__init__(bits, out_features, in_features, dtype, device)
        if not _cpu_kernel_runs(8, dtype):
            raise KernelUnavailable(f"this torch build has no CPU int8 kernel for {dtype}")
        if in_features % 16:  # the SIMD loops step over in_features 8 or 16 at a time
            raise KernelUnavailable("int8pack_mm needs in_features % 16 == 0")
        self.max_rows = _cpu_max_rows(dtype)

    def pack(self, stored: Tensor, scale: Tensor) -> tuple[Tensor, Tensor | None]:
        return _aligned(stored), scale.to(self.dtype)  # int8 [out, in], [out]

    def matmul(self, x2d: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        return torch._weight_int8pack_mm(_aligned(x2d), weight, scale)


class CpuInt4Kernel(Kernel):
    """PyTorch's CPU int4 kernel: the weight repacked once into its blocked layout, one scale per group."""

    name, family = "int4pack_mm_cpu", "native"

    def __init__(self, bits: int, out_features: int, in_features: int, dtype: torch.dtype, device: torch.device):
        super().__init__(bits, out_features, in_features, dtype, device)
        if not _cpu_kernel_runs(4, dtype):
            raise KernelUnavailable(f"this torch build has no CPU int4 kernel for {dtype}")
        group_size = _group_size(in_features)
        if group_size is None or out_features % 16:
            raise KernelUnavailable("int4pack_mm_cpu needs out_features % 16 == 0 and in_features % 32 == 0")
        self.group_size = group_size
        self.max_rows = _cpu_max_rows(dtype)

    def pack(self, stored: Tensor, scale: Tensor) -> tuple[Tensor, Tensor | None]:
        weight = _pack_for_cpu_int4(stored)  # uint8 [out, in/2]
        return weight, _scales_and_zeros(scale, self.in_features // self.group_size, self.dtype)

    def matmul(self, x2d: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        return torch._weight_int4pack_mm_for_cpu(x2d.contiguous(), weight, self.group_size, scale)

    def values(self, weight: Tensor) -> Tensor:
        u = _cpu_int4pack_to_uint4(weight, self.out_features, self.in_features, _cpu_int4_layout())
        return u.view(torch.int8) - 8

    def official(self, weight: Tensor) -> Tensor:
        return pack_int4(self.values(weight))


class CudaInt8Kernel(Kernel):
    """PyTorch's own CUDA int8 kernel (slow, one output per thread): kept selectable to measure against."""

    name, family = "int8pack_mm", "native"

    def __init__(self, bits: int, out_features: int, in_features: int, dtype: torch.dtype, device: torch.device):
        super().__init__(bits, out_features, in_features, dtype, device)
        if not hasattr(torch, "_weight_int8pack_mm"):
            raise KernelUnavailable("this torch build has no _weight_int8pack_mm")

    def pack(self, stored: Tensor, scale: Tensor) -> tuple[Tensor, Tensor | None]:
        return stored.contiguous(), scale.to(self.dtype)

    def matmul(self, x2d: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        return torch._weight_int8pack_mm(x2d.contiguous(), weight, scale)


class CudaInt4Kernel(Kernel):
    """PyTorch's tinygemm (bf16 only, sm_80+): kept selectable to measure against."""

    name, family = "int4pack_mm_cuda", "native"

    def __init__(self, bits: int, out_features: int, in_features: int, dtype: torch.dtype, device: torch.device):
        super().__init__(bits, out_features, in_features, dtype, device)
        group_size = _group_size(in_features)
        inner_k_tiles = next((t for t in (8, 4, 2) if in_features % (16 * t) == 0), None)
        if dtype != torch.bfloat16:
            raise KernelUnavailable(f"tinygemm computes in bf16 only, not {dtype}")
        if group_size is None or inner_k_tiles is None or out_features % 8:
            raise KernelUnavailable("tinygemm needs out_features % 8 == 0 and in_features % 32 == 0")
        if not hasattr(torch, "_weight_int4pack_mm") or torch.cuda.get_device_capability(device) < (8, 0):
            raise KernelUnavailable("tinygemm needs sm_80 or newer")
        self.group_size, self.inner_k_tiles = group_size, inner_k_tiles

    def pack(self, stored: Tensor, scale: Tensor) -> tuple[Tensor, Tensor | None]:
        # tinygemm's converter takes uint8 [out, in/2] with element 2j in the high nibble as u = q + 8;
        # for a 4-bit two's-complement nibble, adding 8 is flipping its top bit: XOR 0x88 per byte.
        unsigned = (stored.view(torch.uint8) ^ 0x88).contiguous()
        weight = torch._convert_weight_to_int4pack(unsigned, self.inner_k_tiles)
        return weight, _scales_and_zeros(scale, self.in_features // self.group_size, self.dtype)

    def matmul(self, x2d: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        return torch._weight_int4pack_mm(x2d.contiguous(), weight, self.group_size, scale)

    def values(self, weight: Tensor) -> Tensor:
        return _decode_int4_by_identity(
            lambda x, unit: torch._weight_int4pack_mm(x, weight, self.group_size, unit),
            self.out_features, self.in_features, self.group_size, self.dtype, weight.device,
        )

    def official(self, weight: Tensor) -> Tensor:
        return pack_int4(self.values(weight))


# PyTorch's own kernels, by (device, bits): what "native" means (and "auto" on CPU).
_NATIVE: dict[tuple[str, int], type[Kernel]] = {
    ("cpu", 8): CpuInt8Kernel, ("cpu", 4): CpuInt4Kernel, ("cuda", 8): CudaInt8Kernel, ("cuda", 4): CudaInt4Kernel,
}


def kernel_class(choice: str, device: torch.device, bits: int) -> type[Kernel]:
    """The kernel a layer of `bits` on `device` runs for a config's `choice`, one of QUANT_KERNELS."""
    if choice not in QUANT_KERNELS:
        raise QuantizationError(f"kernel must be one of {', '.join(QUANT_KERNELS)}, not {choice!r}")
    family = choice if choice != "auto" else ("triton" if device.type == "cuda" else "native")
    if family == "native":
        return _NATIVE["cpu" if device.type == "cpu" else "cuda", bits]
    return TritonKernel if family == "triton" else DequantKernel


def triton_unavailable(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on `device`, or None if they can (sm_80+, or CPU under the interpreter)."""
    try:
        import triton  # optional: the GPU image has it; CPU-only installs need not
    except ImportError:
        return "the triton package is not installed"
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 0):
            major, minor = torch.cuda.get_device_capability(device)
            return f"the Triton kernels need sm_80 or newer, {device} is sm_{major}{minor}"
        return None
    if device.type == "cpu" and triton.knobs.runtime.interpret:
        return None  # the interpreter runs the same kernels on CPU tensors (slowly): for tests
    return f"Triton kernels run on CUDA devices (or on CPU under TRITON_INTERPRET=1), not on {device.type}"


# --- the native kernels' layouts --------------------------------------------------------------------------------


def _cpu_max_rows(dtype: torch.dtype) -> int | None:
    return None if dtype == torch.bfloat16 else _SCALAR_KERNEL_MAX_ROWS


def _group_size(in_features: int) -> int | None:
    return next((g for g in _INT4_GROUP_SIZES if in_features % g == 0), None)


def _scales_and_zeros(scale: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    """tinygemm's per-group (scale, zero) [groups, out, 2]: it dequantizes (u - 8) * scale + zero, u = q + 8."""
    per_group = scale.to(dtype)[None, :].expand(groups, -1)  # [groups, out]
    return torch.stack((per_group, torch.zeros_like(per_group)), dim=-1).contiguous()


def _aligned(t: Tensor) -> Tensor:
    """Contiguous with 64-byte-aligned storage: the SIMD CPU int8 kernel uses aligned loads."""
    t = t.contiguous()
    return t if t.data_ptr() % 64 == 0 else t.clone()


def _cpu_int4pack_to_uint4(packed: Tensor, out_features: int, in_features: int, layout: tuple[int, bool]) -> Tensor:
    """Undo torch's CPU int4 packing: kernel bytes -> uint8 [out, in] values 0..15 (u = q + 8).

    The CPU layout stores blocks of `block` rows one after another; inside a block, input position k holds
    that block's values in block/2 bytes (low nibble first). A trailing smaller block is always interleaved.
    """
    block, split = layout
    flat = packed.reshape(-1)
    u = torch.empty(out_features, in_features, dtype=torch.uint8, device=packed.device)
    full = out_features // block * block
    if full:
        seg = flat[: full * in_features // 2].view(full // block, in_features, block // 2)  # [blocks, in, block/2]
        low, high = seg & 0xF, seg >> 4
        vals = torch.cat((low, high), -1) if split else torch.stack((low, high), -1).flatten(-2)  # [blocks, in, block]
        u[:full] = vals.transpose(1, 2).reshape(full, in_features)
    tail = out_features - full
    if tail:
        seg = flat[full * in_features // 2 :].view(in_features, tail // 2)  # [in, tail/2]
        u[full:] = torch.stack((seg & 0xF, seg >> 4), -1).flatten(-2).T  # [tail, in]
    return u


@functools.cache
def _cpu_int4_layout() -> tuple[int, bool] | None:
    """Which CPU int4 layout this torch build writes (it depends on the SIMD level), or None if unusable."""
    if not hasattr(torch, "_convert_weight_to_int4pack_for_cpu"):
        return None
    generator = torch.Generator().manual_seed(0)
    u = torch.randint(0, 16, (112, 64), generator=generator, dtype=torch.int32)  # 112 = 64 + 48 = 3 * 32 + 16
    try:
        packed = torch._convert_weight_to_int4pack_for_cpu(u, 1)
    except (RuntimeError, NotImplementedError):
        return None
    for layout in _CPU_INT4_LAYOUTS:
        if torch.equal(_cpu_int4pack_to_uint4(packed, 112, 64, layout), u.to(torch.uint8)):
            return layout
    return None


@functools.cache
def _cpu_kernel_runs(bits: int, dtype: torch.dtype) -> bool:
    """Whether the CPU weight-only kernel for `bits` accepts activations of `dtype` in this torch build."""
    try:
        if bits == 8:
            y = torch._weight_int8pack_mm(
                torch.ones(1, 32, dtype=dtype), torch.ones(16, 32, dtype=torch.int8), torch.ones(16, dtype=dtype)
            )
        else:
            if _cpu_int4_layout() is None:
                return False
            weight = torch._convert_weight_to_int4pack_for_cpu(torch.full((16, 32), 9, dtype=torch.int32), 1)
            y = torch._weight_int4pack_mm_for_cpu(
                torch.ones(1, 32, dtype=dtype), weight, 32, _scales_and_zeros(torch.ones(16), 1, dtype)
            )
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return bool((y == 32).all())


def _pack_for_cpu_int4(stored: Tensor, rows_per_call: int = _CPU_INT4_PACK_ROWS) -> Tensor:
    """Official packed int8 [out, in/2] -> torch's CPU int4 kernel layout, uint8 [out, in/2]."""
    chunks = []
    for start in range(0, stored.shape[0], rows_per_call):
        q = unpack_int4(stored[start : start + rows_per_call])  # int8 [rows, in]
        chunks.append(torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).add_(8), 1))  # [rows, in/2]
    return torch.cat(chunks)


def _decode_int4_by_identity(
    matmul: Callable[[Tensor, Tensor], Tensor],
    out_features: int,
    in_features: int,
    group_size: int,
    dtype: torch.dtype,
    device: torch.device,
    rows_per_call: int = 512,
) -> Tensor:
    """Read q int8 [out, in] back out of an opaque int4 kernel layout by multiplying identity rows.

    matmul(x [m, in], scales_and_zeros) runs the kernel; with scale 1 and zero 0 it returns q exactly (small
    integers, one nonzero product per output). Costs in * in * out MACs: meant for GPUs.
    """
    unit = _scales_and_zeros(torch.ones(out_features, device=device), in_features // group_size, dtype)
    q = torch.empty(out_features, in_features, dtype=torch.int8, device=device)
    for start in range(0, in_features, rows_per_call):
        rows = min(rows_per_call, in_features - start)
        eye = torch.zeros(rows, in_features, dtype=dtype, device=device)
        eye[torch.arange(rows), torch.arange(start, start + rows)] = 1
        q[:, start : start + rows] = matmul(eye, unit).T.round().to(torch.int8)  # [rows, out] -> [out, rows]
    return q
