"""`QuantizedLinear`: a Linear on the official ChatGLM2 int8/int4 weight format, run by a kernel chosen at load.

The format (quantize, pack, dequantize) is serve_app.model.quant_format's; the kernels, one class each, and which one
a layer runs for a config's choice (QUANT_KERNELS) are serve_app.model.quant_kernels'. A layer's kernel is chosen
once, at load (`kernel="auto"`: Triton on GPU, PyTorch's own on CPU); it repacks the official tensors once where it
needs its own layout and is checked against the dequantize reference on a sample of rows before use. A kernel that
cannot run the layer or disagrees is an error (KernelUnavailable) unless the caller allows the dequantize fallback.
The names the rest of the app uses from those two modules are importable from here too.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from serve_app.model.quant_format import (
    QuantizationError,
    check_official,
    dequantize,
    pack_int4,
    quantize_rows,
    scaled,
    unpack_int4,
)
from serve_app.model.quant_kernels import QUANT_KERNELS, DequantKernel, Kernel, KernelUnavailable, kernel_class

__all__ = [
    "QUANT_KERNELS",
    "KernelUnavailable",
    "QuantizationError",
    "QuantizedLinear",
    "dequantize",
    "pack_int4",
    "quantize_rows",
    "reference_kernels",
    "unpack_int4",
    "use_reference_kernels",
]

# Output rows compared by the check (evenly spread, plus the last): enough to catch a wrong layout or tile edge.
_CHECK_SAMPLE_ROWS = 256


class QuantizedLinear(nn.Module):
    """y = x @ W^T (+ bias) with W held in the official int8/int4 format or a kernel layout repacked from it.

    Build it with `from_official` on the target device and compute dtype; don't `.to()` it afterwards (the
    kernel layouts are device-specific). forward takes x [..., in] in any float dtype, computes in `dtype` and
    returns [..., out] in x's dtype. `kernel`, one of QUANT_KERNELS, picks the path: "auto" is the fast one
    for the device, "dequant" the reference. Every kernel is checked against the reference at load; one that
    cannot run or disagrees raises KernelUnavailable, unless `allow_fallback`, which runs dequantize + matmul
    instead, warns, and records why in `fallback_reason`. The Kernel that runs is `self.kernel`, its name
    `kernel_name`; its layout of the weight is the buffer `weight` (and `kernel_scale`, where it keeps its own
    scale); `max_kernel_rows` is set where the kernel is a scalar loop and larger batches use the reference path.
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
        self.in_features = check_official(stored, scale, bits)
        self.out_features = stored.shape[0]
        self.bits = bits
        if not dtype.is_floating_point:
            raise QuantizationError(f"compute dtype must be floating, got {dtype}")
        if bias is not None and bias.shape != (self.out_features,):
            raise QuantizationError(f"bias must be [{self.out_features}], got {tuple(bias.shape)}")
        device = torch.device(device)
        chosen = kernel_class(kernel, device, bits)
        self.dtype = dtype
        stored = stored.to(device)
        self.register_buffer("weight_scale", scale.to(device), persistent=False)  # official fp16 [out]
        # The bias keeps its own dtype and is added after the matmul, in the caller's dtype (not rounded to bf16).
        self.register_buffer("bias", None if bias is None else bias.to(device), persistent=False)
        self.fallback_reason: str | None = None
        name = f"{chosen.family} int{bits}"  # what failed, until the kernel has accepted the layer
        try:
            accepted = chosen(bits, self.out_features, self.in_features, dtype, device)
            name = accepted.name
            self._install(accepted, stored)
            self._check_against_reference(stored)
        except (KernelUnavailable, RuntimeError, NotImplementedError) as exc:
            reason = f"{name} kernel for [{self.out_features}, {self.in_features}] on {device}: {exc}"
            if not allow_fallback:
                raise KernelUnavailable(
                    f"{reason}; allow the kernel fallback to run dequantize + matmul instead (~10x slower)"
                ) from exc
            warnings.warn(f"{reason}; running dequantize + matmul", RuntimeWarning, stacklevel=3)
            self.fallback_reason = reason
            self._install(DequantKernel(bits, self.out_features, self.in_features, dtype, device), stored)

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

    @property
    def kernel_name(self) -> str:
        return self.kernel.name

    def _install(self, kernel: Kernel, stored: Tensor) -> None:
        """Run `kernel` from now on, on its own layout of the official `stored` (replacing any other kernel's)."""
        weight, kernel_scale = kernel.pack(stored, self.weight_scale)
        self.kernel = kernel
        self.max_kernel_rows = kernel.max_rows
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("kernel_scale", kernel_scale, persistent=False)

    def _check_against_reference(self, stored: Tensor) -> None:
        """Run the kernel at its check batch sizes (one per code path) and compare a sample of output rows."""
        if not self.kernel.check_rows:
            return  # the reference itself
        generator = torch.Generator().manual_seed(0)
        sample = torch.unique(torch.cat((
            torch.linspace(0, self.out_features - 1, min(self.out_features, _CHECK_SAMPLE_ROWS)).long(),
            torch.tensor([self.out_features - 1]),
        ))).to(stored.device)  # [S] output rows
        reference = dequantize(stored.index_select(0, sample), self.weight_scale[sample], self.bits, self.dtype)
        for rows in self.kernel.check_rows:
            x = torch.randn(rows, self.in_features, generator=generator).to(stored.device, self.dtype)
            fast = self._kernel_matmul(x).float()[:, sample]  # [rows, S]
            bound = x.float().abs() @ reference.float().abs().T  # worst-case magnitude of each sum
            error = (fast - F.linear(x, reference).float()).abs()
            if not (error <= 2**-6 * bound + 1e-6).all():
                raise KernelUnavailable(f"disagrees with the dequantize reference at {rows} rows "
                                        f"(max error {error.max().item():.3g})")

    def _kernel_matmul(self, x2d: Tensor) -> Tensor:
        """x2d [rows, in] in self.dtype -> [rows, out] via the kernel."""
        scale = self.weight_scale if self.kernel_scale is None else self.kernel_scale
        return self.kernel.matmul(x2d, self.weight, scale)

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

    def dequantized_weight(self) -> Tensor:
        """The reference dense weight [out, in] in the compute dtype (a new tensor on every call)."""
        return scaled(self.kernel.values(self.weight), self.weight_scale, self.dtype)

    def official_state(self) -> tuple[Tensor, Tensor]:
        """(stored, scale) in the official format, for checkpoints and comparisons.

        int8 and dequant modules return their own buffers (don't modify them); int4 kernel layouts are
        decoded into new tensors.
        """
        return self.kernel.official(self.weight), self.weight_scale

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
