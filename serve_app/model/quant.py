"""The official ChatGLM2 weight-only int8/int4 format, and the Linear module that runs it.

Format (what checkpoints hold; bit-exact with the original quantization code):
  scale = max|W_row| / (2**(bits-1) - 1)        fp16 [out]   (127 for int8, 7 for int4)
  q     = round(W / scale[:, None])             int8 [out, in], in -127..127 or -7..7
  W    ~= q * scale[:, None]
int8 stores q as is. int4 packs two values per byte along the input dim: element 2j in the HIGH nibble,
2j+1 in the LOW nibble, both signed (two's complement), so the stored tensor is int8 [out, in/2].

`dequantize` + matmul is the reference path. `QuantizedLinear` runs a kernel chosen per device at load
(`kernel="auto"`, or one family by name), repacking the official tensors once where the kernel needs its own
layout, and checks it against the reference on a sample of rows before use. A kernel that cannot run a layer
or disagrees is an error (KernelUnavailable) unless the caller allows the dequantize fallback; the kernel each
layer runs is in `kernel_name` (and, per model, in the engine stats and the startup log):

  device  bits  family  compute dtype  kernel_name       layout / notes
  cuda    8     triton  fp16 or bf16   triton_w8a16      the official int8 [out, in]; any shape; sm_80+ (auto)
  cuda    4     triton  fp16 or bf16   triton_w4a16      the official packed [out, in/2]; any shape; sm_80+ (auto)
  cuda    8     native  any float      int8pack_mm       torch's one-output-per-thread fp32 kernel
  cuda    4     native  bf16           int4pack_mm_cuda  tinygemm: out % 8 == 0, in % 32 == 0
  cpu     8     native  any float      int8pack_mm       (auto) in % 16 == 0; bf16 runs SIMD code on x86,
                                                         fp32/fp16 scalar loops, so above 4 rows they dequantize
  cpu     4     native  any float      int4pack_mm_cpu   (auto) out % 16 == 0, in % 32 == 0; same SIMD split
  cpu     4/8   triton  fp16 or bf16   triton_w*a16      only under TRITON_INTERPRET=1: how the tests run them
  any     4/8   dequant any float      dequant           the reference; weights stay in the official bytes

Measured on CPU (docs/benchmarks.md): both native CPU kernels are compute-bound, at about the same cost per
weight, so INT4 decodes only as fast as INT8 there although it reads half the bytes. GPU speeds are not
measured yet (scripts/quant_gpu_check.py measures them).

Activations are never narrowed: a kernel runs only on the compute dtype it supports natively (bf16 is the
fast compute dtype for quantized weights on CPU; the Triton kernels take the model's fp16 on GPU). The native
kernels take the scale in the compute dtype: exact for fp32 and fp16, rounded to bf16 (relative 2**-9) for
bf16 compute; the Triton kernels apply the fp16 scale in fp32 to the fp32 sum.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED_BITS = (4, 8)
# What a config may ask for: the device's fast kernel, one family explicitly, or the reference path.
KERNELS = ("auto", "triton", "native", "dequant")
# Batch sizes the load-time check runs: the Triton kernels pick tiles by batch (<= 16, <= 64, more), so each
# bucket is checked; the native kernels have one code path per dtype.
_CHECK_ROWS = {"triton": (1, 24, 80), "native": (1, 5)}
# Output rows compared by the check (evenly spread, plus the last): enough to catch a wrong layout or tile edge.
_CHECK_SAMPLE_ROWS = 256

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


def _check_official(stored: Tensor, scale: Tensor, bits: int) -> int:
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


def _scaled(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
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
    _check_official(stored, scale, bits)
    q = unpack_int4(stored) if bits == 4 else stored
    return _scaled(q, scale, dtype)


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
    matmul,
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


class KernelUnavailable(QuantizationError):
    """The kernel asked for cannot run this layer here (package, device, shape, dtype) or disagrees with the
    dequantize reference at load. Raised unless the caller allows the dequantize fallback."""


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


class QuantizedLinear(nn.Module):
    """y = x @ W^T (+ bias) with W held in the official int8/int4 format or a kernel layout repacked from it.

    Build it with `from_official` on the target device and compute dtype; don't `.to()` it afterwards (the
    kernel layouts are device-specific). forward takes x [..., in] in any float dtype, computes in `dtype` and
    returns [..., out] in x's dtype. `kernel` picks the path (see the module docstring): "auto" is the fast one
    for the device, "dequant" the reference. Every kernel is checked against the reference at load; one that
    cannot run or disagrees raises KernelUnavailable, unless `allow_fallback`, which runs dequantize + matmul
    instead, warns, and records why in `fallback_reason`. `kernel_name` says which path runs;
    `max_kernel_rows` is set where the kernel is a scalar loop and larger batches use the reference path.
    """

    def __init__(
        self,
        stored: Tensor,
        scale: Tensor,
        bits: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        bias: Tensor | None = None,
        kernel: str = "auto",
        allow_fallback: bool = False,
    ):
        super().__init__()
        self.in_features = _check_official(stored, scale, bits)
        self.out_features = stored.shape[0]
        self.bits = bits
        if not dtype.is_floating_point:
            raise QuantizationError(f"compute dtype must be floating, got {dtype}")
        if bias is not None and bias.shape != (self.out_features,):
            raise QuantizationError(f"bias must be [{self.out_features}], got {tuple(bias.shape)}")
        if kernel not in KERNELS:
            raise QuantizationError(f"kernel must be one of {', '.join(KERNELS)}, not {kernel!r}")
        self.dtype = dtype
        device = torch.device(device)
        stored = stored.to(device)
        self.register_buffer("weight_scale", scale.to(device), persistent=False)  # official fp16 [out]
        # The bias keeps its own dtype and is added after the matmul, in the caller's dtype (not rounded to bf16).
        self.register_buffer("bias", None if bias is None else bias.to(device), persistent=False)
        self.group_size: int | None = None
        self.max_kernel_rows: int | None = None
        self.kernel_name = "dequant"
        self.fallback_reason: str | None = None
        if kernel != "dequant":
            family = kernel if kernel != "auto" else ("triton" if device.type == "cuda" else "native")
            try:
                if family == "triton":
                    self._use_triton_kernel(stored)
                elif device.type == "cpu":
                    self._use_cpu_kernel(stored)
                else:
                    self._use_cuda_native_kernel(stored)
                self._check_against_reference(stored)
            except (KernelUnavailable, RuntimeError, NotImplementedError) as exc:
                name = self.kernel_name if self.kernel_name != "dequant" else f"{family} int{bits}"
                reason = f"{name} kernel for [{self.out_features}, {self.in_features}] on {device}: {exc}"
                self._drop_kernel()
                if not allow_fallback:
                    raise KernelUnavailable(
                        f"{reason}; allow the kernel fallback to run dequantize + matmul instead (~10x slower)"
                    ) from exc
                warnings.warn(f"{reason}; running dequantize + matmul", RuntimeWarning, stacklevel=3)
                self.fallback_reason = reason
        if self.kernel_name == "dequant":
            self.register_buffer("weight", stored.contiguous(), persistent=False)

    @classmethod
    def from_official(
        cls,
        stored: Tensor,
        scale: Tensor,
        bits: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        bias: Tensor | None = None,
        kernel: str = "auto",
        allow_fallback: bool = False,
    ) -> QuantizedLinear:
        """Build from a checkpoint's `...weight` (int8 [out, in] or packed [out, in/2]) and `...weight_scale`."""
        return cls(stored, scale, bits, dtype=dtype, device=device, bias=bias, kernel=kernel,
                   allow_fallback=allow_fallback)

    def _drop_kernel(self) -> None:
        self.kernel_name, self.group_size, self.max_kernel_rows = "dequant", None, None
        for name in ("weight", "kernel_scale"):
            if hasattr(self, name):
                delattr(self, name)

    def _use_triton_kernel(self, stored: Tensor) -> None:
        reason = triton_unavailable(stored.device)
        if reason:
            raise KernelUnavailable(reason)
        if self.dtype not in (torch.float16, torch.bfloat16):
            raise KernelUnavailable(f"the Triton kernels compute in fp16 or bf16, not {self.dtype}")
        self.kernel_name = f"triton_w{self.bits}a16"
        self.register_buffer("weight", stored.contiguous(), persistent=False)  # the official bytes, as they are

    def _use_cpu_kernel(self, stored: Tensor) -> None:
        if not _cpu_kernel_runs(self.bits, self.dtype):
            raise KernelUnavailable(f"this torch build has no CPU int{self.bits} kernel for {self.dtype}")
        if self.bits == 8:
            if self.in_features % 16:  # the SIMD loops step over in_features 8 or 16 at a time
                raise KernelUnavailable("int8pack_mm needs in_features % 16 == 0")
            self.kernel_name = "int8pack_mm"
            self.register_buffer("weight", _aligned(stored), persistent=False)  # int8 [out, in]
            self.register_buffer("kernel_scale", self.weight_scale.to(self.dtype), persistent=False)
        else:
            group_size = _group_size(self.in_features)
            if group_size is None or self.out_features % 16:
                raise KernelUnavailable("int4pack_mm_cpu needs out_features % 16 == 0 and in_features % 32 == 0")
            self.kernel_name, self.group_size = "int4pack_mm_cpu", group_size
            self.register_buffer("weight", _pack_for_cpu_int4(stored), persistent=False)  # uint8 [out, in/2]
            self.register_buffer(
                "kernel_scale",
                _scales_and_zeros(self.weight_scale, self.in_features // group_size, self.dtype),
                persistent=False,
            )
        if self.dtype != torch.bfloat16:
            self.max_kernel_rows = _SCALAR_KERNEL_MAX_ROWS

    def _use_cuda_native_kernel(self, stored: Tensor) -> None:
        """PyTorch's own CUDA kernels (slow int8, bf16-only tinygemm int4): kept selectable to measure against."""
        if self.bits == 8:
            if not hasattr(torch, "_weight_int8pack_mm"):
                raise KernelUnavailable("this torch build has no _weight_int8pack_mm")
            self.kernel_name = "int8pack_mm"
            self.register_buffer("weight", stored.contiguous(), persistent=False)
            self.register_buffer("kernel_scale", self.weight_scale.to(self.dtype), persistent=False)
            return
        group_size = _group_size(self.in_features)
        inner_k_tiles = next((t for t in (8, 4, 2) if self.in_features % (16 * t) == 0), None)
        if self.dtype != torch.bfloat16:
            raise KernelUnavailable(f"tinygemm computes in bf16 only, not {self.dtype}")
        if group_size is None or inner_k_tiles is None or self.out_features % 8:
            raise KernelUnavailable("tinygemm needs out_features % 8 == 0 and in_features % 32 == 0")
        if not hasattr(torch, "_weight_int4pack_mm") or torch.cuda.get_device_capability(stored.device) < (8, 0):
            raise KernelUnavailable("tinygemm needs sm_80 or newer")
        self.kernel_name, self.group_size = "int4pack_mm_cuda", group_size
        # tinygemm's converter takes uint8 [out, in/2] with element 2j in the high nibble as u = q + 8;
        # for a 4-bit two's-complement nibble, adding 8 is flipping its top bit: XOR 0x88 per byte.
        unsigned = (stored.view(torch.uint8) ^ 0x88).contiguous()
        self.register_buffer("weight", torch._convert_weight_to_int4pack(unsigned, inner_k_tiles), persistent=False)
        self.register_buffer(
            "kernel_scale",
            _scales_and_zeros(self.weight_scale, self.in_features // group_size, self.dtype),
            persistent=False,
        )

    def _check_against_reference(self, stored: Tensor) -> None:
        """Run the kernel on a few batch sizes (every Triton tile bucket) and compare a sample of output rows."""
        generator = torch.Generator().manual_seed(0)
        sample = torch.unique(torch.cat((
            torch.linspace(0, self.out_features - 1, min(self.out_features, _CHECK_SAMPLE_ROWS)).long(),
            torch.tensor([self.out_features - 1]),
        ))).to(stored.device)  # [S] output rows
        reference = dequantize(stored.index_select(0, sample), self.weight_scale[sample], self.bits, self.dtype)
        for rows in _CHECK_ROWS["triton" if self.kernel_name.startswith("triton") else "native"]:
            x = torch.randn(rows, self.in_features, generator=generator).to(stored.device, self.dtype)
            fast = self._kernel_matmul(x).float()[:, sample]  # [rows, S]
            bound = x.float().abs() @ reference.float().abs().T  # worst-case magnitude of each sum
            error = (fast - F.linear(x, reference).float()).abs()
            if not (error <= 2**-6 * bound + 1e-6).all():
                raise KernelUnavailable(f"disagrees with the dequantize reference at {rows} rows "
                                        f"(max error {error.max().item():.3g})")

    def _kernel_matmul(self, x2d: Tensor) -> Tensor:
        """x2d [rows, in] in self.dtype -> [rows, out] via the chosen kernel."""
        if self.kernel_name.startswith("triton"):
            import serve_app.model.quant_triton  # noqa: F401  (registers torch.ops.chatglm2.weight_only_matmul)

            return torch.ops.chatglm2.weight_only_matmul(x2d, self.weight, self.weight_scale, self.bits)
        if self.kernel_name == "int8pack_mm":
            x2d = _aligned(x2d) if x2d.is_cpu else x2d.contiguous()
            return torch._weight_int8pack_mm(x2d, self.weight, self.kernel_scale)
        if self.kernel_name == "int4pack_mm_cpu":
            return torch._weight_int4pack_mm_for_cpu(x2d.contiguous(), self.weight, self.group_size, self.kernel_scale)
        if self.kernel_name == "int4pack_mm_cuda":
            return torch._weight_int4pack_mm(x2d.contiguous(), self.weight, self.group_size, self.kernel_scale)
        return F.linear(x2d, self.dequantized_weight())

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input [..., {self.in_features}], got {tuple(x.shape)}")
        x2d = x.reshape(-1, self.in_features).to(self.dtype)  # [rows, in]
        rows = x2d.shape[0]
        if rows == 0:
            y = x2d.new_empty(0, self.out_features)
        elif self.max_kernel_rows is not None and rows > self.max_kernel_rows:
            y = F.linear(x2d, self.dequantized_weight())
        else:
            y = self._kernel_matmul(x2d)  # [rows, out]
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _q(self) -> Tensor:
        """The quantized values, int8 [out, in]."""
        if self.kernel_name == "int4pack_mm_cpu":
            u = _cpu_int4pack_to_uint4(self.weight, self.out_features, self.in_features, _cpu_int4_layout())
            return u.view(torch.int8) - 8
        if self.kernel_name == "int4pack_mm_cuda":
            return _decode_int4_by_identity(
                lambda x, unit: torch._weight_int4pack_mm(x, self.weight, self.group_size, unit),
                self.out_features,
                self.in_features,
                self.group_size,
                self.dtype,
                self.weight.device,
            )
        return unpack_int4(self.weight) if self.bits == 4 else self.weight

    def dequantized_weight(self) -> Tensor:
        """The reference dense weight [out, in] in the compute dtype (a new tensor on every call)."""
        return _scaled(self._q(), self.weight_scale, self.dtype)

    def official_state(self) -> tuple[Tensor, Tensor]:
        """(stored, scale) in the official format, for checkpoints and comparisons.

        int8 and dequant modules return their own buffers (don't modify them); int4 kernel layouts are
        decoded into new tensors.
        """
        if self.kernel_name in ("int4pack_mm_cpu", "int4pack_mm_cuda"):
            return pack_int4(self._q()), self.weight_scale
        return self.weight, self.weight_scale

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"dtype={self.dtype}, kernel={self.kernel_name}, bias={self.bias is not None}"
        )


@contextlib.contextmanager
def reference_kernels(model: nn.Module):
    """Within the block, every QuantizedLinear of `model` computes dequantize + matmul (the reference path) whatever
    kernel it loaded with: what the device check compares the kernels against. Not thread-safe; not for serving."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    saved = [m.max_kernel_rows for m in layers]
    for layer in layers:
        layer.max_kernel_rows = 0  # every batch is "above the kernel's rows": it dequantizes
    try:
        yield
    finally:
        for layer, rows in zip(layers, saved):
            layer.max_kernel_rows = rows


def use_reference_kernels(model: nn.Module) -> int:
    """From now on every QuantizedLinear of `model` computes dequantize + matmul (a device check's fallback);
    returns how many layers were switched."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    for layer in layers:
        layer.max_kernel_rows = 0
    return len(layers)
