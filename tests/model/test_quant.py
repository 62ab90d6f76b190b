"""The official int8/int4 format (bit-exact) and every QuantizedLinear kernel against the dequantize reference."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from serve_app.model import quant_kernels
from serve_app.model.quant import (
    KernelUnavailable,
    QuantizationError,
    QuantizedLinear,
    dequantize,
    pack_int4,
    quantize_rows,
    unpack_int4,
)

CUDA = torch.cuda.is_available()

# |fast - reference| <= TOL * sum_k |x_k| |W_k| per output: rounding of one product chain in each dtype.
TOL = {torch.float32: 1e-6, torch.float16: 2**-9, torch.bfloat16: 2**-7}


def official(out_features, in_features, bits, seed=0, dtype=torch.float16):
    """A random fp16 weight quantized to the official (stored, scale)."""
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out_features, in_features, generator=generator) * 0.02).to(dtype)
    q, scale = quantize_rows(weight, bits)
    return (pack_int4(q) if bits == 4 else q), scale


def assert_matches_reference(module, stored, scale, bits, x):
    """module(x) equals x @ dequantize(...)^T computed in the module's dtype, within that dtype's rounding."""
    dtype = module.dtype
    reference = F.linear(x.to(dtype), dequantize(stored, scale, bits, dtype).to(x.device)).to(x.dtype)
    exact = dequantize(stored, scale, bits, torch.float64).to(x.device)
    bound = x.double().abs() @ exact.abs().T  # [..., out]
    y = module(x)
    assert y.shape == reference.shape and y.dtype == x.dtype
    assert ((y.double() - reference.double()).abs() <= TOL[dtype] * bound + 1e-30).all()


# --- packing -------------------------------------------------------------------------------------------------


def test_pack_hand_computed_bytes():
    q = torch.tensor([[1, -2, -8, 7, 0, -1]], dtype=torch.int8)
    # [1, -2] -> 0x1E; [-8, 7] -> 0x87 = -121 as int8; [0, -1] -> 0x0F
    assert pack_int4(q).tolist() == [[0x1E, -121, 0x0F]]


def test_pack_unpack_round_trip_every_pair():
    values = torch.arange(-8, 8, dtype=torch.int8)
    pairs = torch.cartesian_prod(values, values)  # every (even, odd) combination, [256, 2]
    q = pairs.reshape(2, 256)  # each row holds 128 pairs at even/odd positions
    packed = pack_int4(q)
    assert packed.shape == (2, 128) and packed.dtype == torch.int8
    assert torch.equal(unpack_int4(packed), q)
    # high nibble = element 2j, low nibble = element 2j+1, both sign-extended
    assert torch.equal(packed.view(torch.uint8) >> 4, (pairs[:, 0] & 0xF).view(torch.uint8).reshape(2, 128))
    assert torch.equal(unpack_int4(pack_int4(q.T.contiguous())), q.T)


def test_pack_rejects_bad_input():
    with pytest.raises(QuantizationError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(QuantizationError, match="-8..7"):
        pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))
    with pytest.raises(QuantizationError):
        unpack_int4(torch.zeros(2, 3, dtype=torch.int32))


# --- quantize_rows: the official formula ------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_rows_is_bit_exact_with_the_official_fp16_formula(bits):
    w = (torch.randn(256, 384, generator=torch.Generator().manual_seed(1)) * 0.05).half()
    q, scale = quantize_rows(w, bits)
    qmax = 2 ** (bits - 1) - 1
    # The original: computed on the fp16 weight, scale kept fp16.
    official_scale = w.abs().max(dim=-1).values / qmax
    official_q = torch.round(w / official_scale[:, None]).to(torch.int8)
    # The same arithmetic spelled out: fp32 ops, each result rounded to fp16 (what torch's fp16 ops do).
    emulated_scale = (w.float().abs().amax(-1) / qmax).half()
    emulated_q = torch.round((w.float() / emulated_scale.float()[:, None]).half().float()).to(torch.int8)
    assert scale.dtype == torch.float16 and q.dtype == torch.int8
    assert torch.equal(scale, official_scale) and torch.equal(scale, emulated_scale)
    assert torch.equal(q, official_q) and torch.equal(q, emulated_q)
    assert q.abs().max() == qmax
    # Rounding W/scale to fp16 before round() matters: skipping it changes some values.
    naive_q = torch.round(w.float() / scale.float()[:, None]).to(torch.int8)
    assert not torch.equal(q, naive_q)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_quantization_error_is_at_most_half_a_step(bits, dtype):
    w = (torch.randn(64, 512, generator=torch.Generator().manual_seed(2)) * 0.05).to(dtype)
    q, scale = quantize_rows(w, bits)
    error = (dequantize(pack_int4(q) if bits == 4 else q, scale, bits, torch.float64) - w.double()).abs()
    # half a step, plus fp16's rounding of W/scale (relative 2**-11 of |q| <= 2**(bits-1)) in the fp16 path
    step_fraction = 0.5 + 2**-11 * 2 ** (bits - 1)
    assert (error <= step_fraction * scale.double()[:, None]).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_zero_row_gives_zero_scale_and_values(bits):
    w = torch.randn(3, 16).half()
    w[1] = 0
    q, scale = quantize_rows(w, bits)
    assert scale[1] == 0 and (q[1] == 0).all()
    assert torch.isfinite(dequantize(pack_int4(q) if bits == 4 else q, scale, bits)).all()


def test_quantize_rows_rejects_bad_input():
    with pytest.raises(QuantizationError, match="bits 3"):
        quantize_rows(torch.randn(4, 4), 3)
    with pytest.raises(QuantizationError):
        quantize_rows(torch.randn(4), 8)
    with pytest.raises(QuantizationError, match="NaN"):
        quantize_rows(torch.tensor([[1.0, float("nan")]]), 8)


# --- dequantize: the reference ----------------------------------------------------------------------------------


def test_dequantize_fp16_is_the_official_fp16_product():
    stored, scale = official(32, 64, 8)
    assert torch.equal(dequantize(stored, scale, 8, torch.float16), stored.half() * scale[:, None])
    packed, scale4 = official(32, 64, 4)
    assert torch.equal(dequantize(packed, scale4, 4, torch.float16), unpack_int4(packed).half() * scale4[:, None])


def test_dequantize_rejects_mismatched_tensors():
    stored, scale = official(8, 32, 4)
    with pytest.raises(QuantizationError, match="bits 3"):
        dequantize(stored, scale, 3)
    with pytest.raises(QuantizationError, match="rows"):
        dequantize(stored, scale[:4], 4)
    with pytest.raises(QuantizationError, match="int8"):
        dequantize(stored.to(torch.int32), scale, 4)
    with pytest.raises(QuantizationError, match="bits 3"):
        QuantizedLinear.from_official(stored, scale, 3, dtype=torch.float32, device="cpu")
    with pytest.raises(QuantizationError, match="rows"):
        QuantizedLinear.from_official(stored[:4], scale, 4, dtype=torch.float32, device="cpu")
    with pytest.raises(QuantizationError, match="bias"):
        QuantizedLinear.from_official(stored, scale, 4, dtype=torch.float32, device="cpu", bias=torch.zeros(3))


# --- QuantizedLinear on CPU -------------------------------------------------------------------------------------

# (out, in): kernel-friendly shapes, incl. ChatGLM2's 13696 = 107 * 128 input features
KERNEL_SHAPES = [(64, 64), (48, 96), (32, 128), (16, 13696)]
# shapes a kernel cannot take: int4 needs out % 16 and in % 32; every CPU kernel needs in % 16
FALLBACK_SHAPES = {8: [(7, 100)], 4: [(40, 64), (16, 48), (7, 100)]}
CPU_KERNEL = {8: "int8pack_mm", 4: "int4pack_mm_cpu"}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", KERNEL_SHAPES)
def test_cpu_kernel_matches_reference(bits, dtype, shape):
    stored, scale = official(*shape, bits)
    module = QuantizedLinear.from_official(stored, scale, bits, dtype=dtype, device="cpu")
    assert module.kernel_name == CPU_KERNEL[bits]
    # scalar fp32/fp16 kernels serve few rows; 8 rows exercise the dequantize path of the same module
    assert module.max_kernel_rows == (None if dtype == torch.bfloat16 else 4)
    generator = torch.Generator().manual_seed(3)
    for rows in (1, 3, 8):
        x = torch.randn(rows, shape[1], generator=generator).to(dtype)
        assert_matches_reference(module, stored, scale, bits, x)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_takes_any_leading_shape_and_keeps_x_dtype(bits, dtype):
    stored, scale = official(32, 128, bits)
    bias = torch.randn(32)
    module = QuantizedLinear.from_official(stored, scale, bits, dtype=dtype, device="cpu", bias=bias)
    x = torch.randn(2, 2, 128)  # fp32 input into a module that may compute in bf16
    y = module(x)
    assert y.shape == (2, 2, 32) and y.dtype == torch.float32
    reference = F.linear(x.to(dtype), dequantize(stored, scale, bits, dtype), bias.to(dtype)).float()
    bound = x.double().abs() @ dequantize(stored, scale, bits, torch.float64).abs().T + bias.double().abs()
    assert ((y.double() - reference.double()).abs() <= TOL[dtype] * bound).all()
    assert module(torch.randn(0, 128)).shape == (0, 32)
    with pytest.raises(ValueError, match="128"):
        module(torch.randn(1, 64))


def test_unaligned_input_is_safe_for_the_simd_int8_kernel():
    stored, scale = official(16, 64, 8)
    module = QuantizedLinear.from_official(stored, scale, 8, dtype=torch.bfloat16, device="cpu")
    x = torch.randn(3 * 64 + 1).bfloat16()[1:].view(3, 64)  # storage offset of 2 bytes
    assert_matches_reference(module, stored, scale, 8, x)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unsupported_shapes_are_an_error_unless_the_fallback_is_allowed(bits, dtype):
    for shape in FALLBACK_SHAPES[bits]:
        stored, scale = official(*shape, bits)
        with pytest.raises(KernelUnavailable, match="allow the kernel fallback"):
            QuantizedLinear.from_official(stored, scale, bits, dtype=dtype, device="cpu")
        with pytest.warns(RuntimeWarning, match="dequantize"):
            module = QuantizedLinear.from_official(stored, scale, bits, dtype=dtype, device="cpu", allow_fallback=True)
        assert module.kernel_name == "dequant" and "needs" in module.fallback_reason
        assert module.weight is not None and module.weight.dtype == torch.int8  # still the official bytes
        for rows in (1, 3):
            assert_matches_reference(module, stored, scale, bits, torch.randn(rows, shape[1]).to(dtype))


@pytest.mark.parametrize("bits", [8, 4])
def test_the_reference_path_is_chosen_explicitly_without_a_warning(bits):
    stored, scale = official(7, 100, bits) if bits == 8 else official(40, 64, bits)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = QuantizedLinear.from_official(stored, scale, bits, dtype=torch.float32, device="cpu", kernel="dequant")
    assert module.kernel_name == "dequant" and module.fallback_reason is None
    assert_matches_reference(module, stored, scale, bits, torch.randn(2, stored.shape[1] * (2 if bits == 4 else 1)))


def test_a_kernel_that_disagrees_with_the_reference_is_refused(monkeypatch):
    stored, scale = official(32, 128, 8)
    real = QuantizedLinear._kernel_matmul
    monkeypatch.setattr(QuantizedLinear, "_kernel_matmul", lambda self, x: real(self, x) * 1.1)
    with pytest.raises(KernelUnavailable, match="disagrees"):
        QuantizedLinear.from_official(stored, scale, 8, dtype=torch.bfloat16, device="cpu")


def test_unknown_kernel_is_a_clear_error():
    stored, scale = official(32, 128, 8)
    with pytest.raises(QuantizationError, match="kernel must be one of"):
        QuantizedLinear.from_official(stored, scale, 8, dtype=torch.bfloat16, device="cpu", kernel="cutlass")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    stored, scale = official(32, 128, 8)
    with pytest.raises(KernelUnavailable, match="CUDA devices"):
        QuantizedLinear.from_official(stored, scale, 8, dtype=torch.bfloat16, device="cpu", kernel="triton")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", KERNEL_SHAPES + [(40, 64)])
@pytest.mark.filterwarnings("ignore:native int4 kernel:RuntimeWarning")
def test_official_state_round_trips_exactly(bits, shape):
    stored, scale = official(*shape, bits)
    module = QuantizedLinear.from_official(stored, scale, bits, dtype=torch.bfloat16, device="cpu",
                                           allow_fallback=True)  # (40, 64) int4: the reference path
    got_stored, got_scale = module.official_state()
    assert torch.equal(got_stored, stored) and torch.equal(got_scale, scale)
    assert module.weight.numel() == stored.numel()  # int4 stays 4-bit in every layout


def test_cpu_int4_layout_is_identified_and_chunked_packing_matches():
    assert quant_kernels._cpu_int4_layout() is not None
    stored, _ = official(112, 64, 4)  # one full block plus a smaller trailing block for every layout
    whole = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(stored).to(torch.int32) + 8, 1)
    assert torch.equal(quant_kernels._pack_for_cpu_int4(stored, rows_per_call=64), whole)


def test_cpu_int4_kernel_dequantizes_as_u_minus_8_times_scale_plus_zero():
    u = torch.randint(0, 16, (16, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(4))
    weight = torch._convert_weight_to_int4pack_for_cpu(u, 1)
    scale, zero = torch.rand(16) + 0.5, torch.randn(16)
    scales_and_zeros = torch.stack((scale.expand(2, 16), zero.expand(2, 16)), -1).contiguous()  # group 32
    got = torch._weight_int4pack_mm_for_cpu(torch.eye(64), weight, 32, scales_and_zeros)  # [in, out] = W^T
    torch.testing.assert_close(got.T, (u - 8) * scale[:, None] + zero[:, None])


def test_identity_decoding_reads_back_an_opaque_int4_layout():
    # The CUDA module's official_state path, run here with the CPU kernel.
    stored, _ = official(32, 128, 4)
    weight = quant_kernels._pack_for_cpu_int4(stored)
    q = quant_kernels._decode_int4_by_identity(
        lambda x, unit: torch._weight_int4pack_mm_for_cpu(x, weight, 64, unit),
        32,
        128,
        64,
        torch.bfloat16,
        torch.device("cpu"),
        rows_per_call=48,
    )
    assert torch.equal(q, unpack_int4(stored))


# --- QuantizedLinear on CUDA ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", KERNEL_SHAPES + [(40, 64), (16, 48)])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_module_matches_reference(bits, dtype, shape):
    stored, scale = official(*shape, bits)
    module = QuantizedLinear.from_official(stored, scale, bits, dtype=dtype, device="cuda")
    assert module.kernel_name == f"triton_w{bits}a16"  # the Triton kernels take any shape
    for rows in (1, 3, 8, 40, 100):
        assert_matches_reference(module, stored, scale, bits, torch.randn(rows, shape[1], device="cuda").to(dtype))
    got_stored, got_scale = module.official_state()
    assert torch.equal(got_stored.cpu(), stored) and torch.equal(got_scale.cpu(), scale)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_native_kernels_stay_selectable(bits):
    stored, scale = official(64, 256, bits)
    module = QuantizedLinear.from_official(stored, scale, bits, dtype=torch.bfloat16, device="cuda", kernel="native")
    assert module.kernel_name == ("int8pack_mm" if bits == 8 else "int4pack_mm_cuda")
    assert_matches_reference(module, stored, scale, bits, torch.randn(3, 256, device="cuda").bfloat16())
    got_stored, _ = module.official_state()
    assert torch.equal(got_stored.cpu(), stored)
