"""The kernel classes on their own (pack, matmul, read back), the one place a layer's kernel is chosen, and how a layer
names the kernel that failed it."""

import pytest
import torch
import torch.nn.functional as F

from serve_app.model import quant, quant_kernels
from serve_app.model.quant import KernelUnavailable, QuantizationError, QuantizedLinear, dequantize, pack_int4
from serve_app.model.quant_format import quantize_rows, unpack_int4
from serve_app.model.quant_kernels import (
    QUANT_KERNELS,
    CpuInt4Kernel,
    CpuInt8Kernel,
    CudaInt4Kernel,
    CudaInt8Kernel,
    DequantKernel,
    TritonKernel,
    kernel_class,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU: kernel_class only reads its type


def official(out_features, in_features, bits, seed=0):
    weight = (torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.02).half()
    q, scale = quantize_rows(weight, bits)
    return (pack_int4(q) if bits == 4 else q), scale


def test_the_kernel_choices_are_defined_once_and_the_config_path_sees_them():
    assert QUANT_KERNELS == ("auto", "triton", "native", "dequant")
    assert quant.QUANT_KERNELS is QUANT_KERNELS


@pytest.mark.parametrize(("choice", "device", "bits", "expected"), [
    ("auto", CPU, 8, CpuInt8Kernel), ("auto", CPU, 4, CpuInt4Kernel),
    ("auto", CUDA, 8, TritonKernel), ("auto", CUDA, 4, TritonKernel),
    ("native", CPU, 8, CpuInt8Kernel), ("native", CPU, 4, CpuInt4Kernel),
    ("native", CUDA, 8, CudaInt8Kernel), ("native", CUDA, 4, CudaInt4Kernel),
    ("triton", CPU, 8, TritonKernel), ("triton", CUDA, 4, TritonKernel),
    ("dequant", CPU, 4, DequantKernel), ("dequant", CUDA, 8, DequantKernel),
])
def test_kernel_class_is_the_one_place_a_kernel_is_chosen(choice, device, bits, expected):
    chosen = kernel_class(choice, device, bits)
    assert chosen is expected
    assert chosen.family == (choice if choice != "auto" else "triton" if device.type == "cuda" else "native")


def test_an_unknown_choice_is_a_clear_error():
    with pytest.raises(QuantizationError, match="kernel must be one of auto, triton, native, dequant, not 'cutlass'"):
        kernel_class("cutlass", CPU, 8)


def _cpu_kernels():
    """(class, compute dtype, bits) of every kernel that runs on CPU here."""
    kernels = [(DequantKernel, torch.float32, 8), (DequantKernel, torch.float32, 4),
               (CpuInt8Kernel, torch.bfloat16, 8), (CpuInt4Kernel, torch.bfloat16, 4)]
    if quant_kernels.triton_unavailable(CPU) is None:  # under TRITON_INTERPRET=1 (tests/conftest.py)
        kernels += [(TritonKernel, torch.float16, 8), (TritonKernel, torch.float16, 4)]
    return kernels


@pytest.mark.parametrize(("cls", "dtype", "bits"), _cpu_kernels(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_each_kernel_packs_multiplies_and_reads_its_layout_back(cls, dtype, bits):
    stored, scale = official(48, 128, bits)
    kernel = cls(bits, 48, 128, dtype, CPU)
    weight, kernel_scale = kernel.pack(stored, scale)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = kernel.matmul(x, weight, scale if kernel_scale is None else kernel_scale)
    exact = dequantize(stored, scale, bits, torch.float64)
    bound = x.double().abs() @ exact.abs().T
    assert y.shape == (3, 48) and ((y.double() - x.double() @ exact.T).abs() <= 2**-7 * bound + 1e-30).all()
    assert torch.equal(kernel.values(weight), unpack_int4(stored) if bits == 4 else stored)
    assert torch.equal(kernel.official(weight), stored)
    assert weight.numel() == stored.numel()  # int4 stays 4-bit in every layout


def test_the_reference_is_not_checked_and_the_scalar_cpu_kernels_cap_their_rows():
    assert DequantKernel.check_rows == ()
    assert CpuInt8Kernel(8, 16, 64, torch.float32, CPU).max_rows == 4
    assert CpuInt8Kernel(8, 16, 64, torch.bfloat16, CPU).max_rows is None


@pytest.mark.parametrize(("make", "reason"), [
    (lambda: CpuInt8Kernel(8, 7, 100, torch.bfloat16, CPU), "in_features % 16"),
    (lambda: CpuInt4Kernel(4, 40, 64, torch.bfloat16, CPU), "out_features % 16"),
    (lambda: TritonKernel(8, 16, 64, torch.float32, CPU), "fp16 or bf16|CUDA devices|not installed"),
    (lambda: CudaInt4Kernel(4, 64, 256, torch.float16, CUDA), "bf16 only"),
    (lambda: CudaInt4Kernel(4, 60, 256, torch.bfloat16, CUDA), "out_features % 8"),
])
def test_a_kernel_refuses_a_layer_it_cannot_run_when_built(make, reason):
    with pytest.raises(KernelUnavailable, match=reason):
        make()


def test_a_failure_names_the_family_until_the_kernel_has_accepted_the_layer_then_the_kernel(monkeypatch):
    stored, scale = official(7, 100, 8)
    with pytest.raises(KernelUnavailable, match=r"^native int8 kernel for \[7, 100\] on cpu: int8pack_mm needs"):
        QuantizedLinear.from_official(stored, scale, 8, dtype=torch.bfloat16, device="cpu")

    def broken_pack(self, stored, scale):
        raise RuntimeError("no memory for the repack")

    monkeypatch.setattr(CpuInt4Kernel, "pack", broken_pack)
    stored, scale = official(32, 128, 4)
    with pytest.raises(KernelUnavailable, match=r"^int4pack_mm_cpu kernel for \[32, 128\] on cpu: no memory"):
        QuantizedLinear.from_official(stored, scale, 4, dtype=torch.bfloat16, device="cpu")
    with pytest.warns(RuntimeWarning, match="int4pack_mm_cpu kernel .* running dequantize"):
        module = QuantizedLinear.from_official(stored, scale, 4, dtype=torch.bfloat16, device="cpu",
                                               allow_fallback=True)
    assert isinstance(module.kernel, DequantKernel) and module.kernel_name == "dequant"
    assert torch.equal(module.weight, stored) and module.kernel_scale is None
    x = torch.randn(2, 128).bfloat16()
    torch.testing.assert_close(module(x), F.linear(x, dequantize(stored, scale, 4, torch.bfloat16)))


def test_a_fallback_after_a_failed_check_keeps_none_of_the_kernels_buffers(monkeypatch):
    stored, scale = official(32, 128, 8)
    monkeypatch.setattr(CpuInt8Kernel, "matmul", lambda self, x, weight, scale: torch.zeros(len(x), 32, dtype=x.dtype))
    with pytest.warns(RuntimeWarning, match="int8pack_mm kernel .* disagrees"):
        module = QuantizedLinear.from_official(stored, scale, 8, dtype=torch.bfloat16, device="cpu",
                                               allow_fallback=True)
    assert module.kernel_name == "dequant" and module.max_kernel_rows is None
    assert {name for name, _ in module.named_buffers()} == {"weight_scale", "weight"}
