"""The Triton W8A16/W4A16 kernels against the dequantize reference, run by Triton's interpreter on CPU tensors.

The interpreter executes the same kernel source the GPU compiles (one program at a time, in numpy), so these tests
check indexing, masking, nibble unpacking, split-K and scaling; speed is a GPU matter (scripts/quant_gpu_check.py).
"""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is imported and the kernels are decorated
triton = pytest.importorskip("triton")

from serve_app.model.quant import QuantizedLinear, dequantize, pack_int4, quantize_rows  # noqa: E402
from serve_app.model.quant_triton import TileConfig, choose_config, weight_only_matmul  # noqa: E402

if not triton.knobs.runtime.interpret:  # triton was imported before this module, without the interpreter
    pytest.skip("the Triton interpreter is off (run this module first or set TRITON_INTERPRET=1)",
                allow_module_level=True)

TOL = {torch.float16: 2**-9, torch.bfloat16: 2**-7}


def official(out_features, in_features, bits, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out_features, in_features, generator=generator) * 0.02).half()
    q, scale = quantize_rows(weight, bits)
    return (pack_int4(q) if bits == 4 else q), scale


def assert_close_to_reference(y, x, stored, scale, bits):
    """|y - x @ W^T| <= tol * sum_k |x_k W_k|: one rounding of the output plus fp32 accumulation."""
    exact = dequantize(stored, scale, bits, torch.float64)
    bound = x.double().abs() @ exact.abs().T
    assert y.dtype == x.dtype and y.shape == bound.shape
    assert ((y.double() - x.double() @ exact.T).abs() <= TOL[x.dtype] * bound + 1e-30).all()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 24, 80])  # every tile bucket of choose_config
def test_kernel_matches_reference(bits, dtype, rows):
    stored, scale = official(72, 200, bits)  # neither dimension a multiple of any tile: masked edges
    x = torch.randn(rows, 200, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert_close_to_reference(weight_only_matmul(x, stored, scale, bits), x, stored, scale, bits)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_split_k_partial_sums_add_up(bits, split_k):
    stored, scale = official(40, 384, bits)
    x = torch.randn(3, 384, generator=torch.Generator().manual_seed(2)).half()
    config = TileConfig(block_m=16, block_n=32, block_k=64, split_k=split_k, num_warps=4, num_stages=2)
    assert_close_to_reference(weight_only_matmul(x, stored, scale, bits, config), x, stored, scale, bits)


def test_int4_nibbles_are_the_official_order_and_signs():
    # One row holding every int4 value at even and odd positions: a swapped or unsigned nibble changes y.
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(2)[None].repeat(16, 1)  # [16, 32]
    q[:, 1::2] = q[:, 1::2].flip(-1)
    stored, scale = pack_int4(q), torch.ones(16, dtype=torch.float16)
    x = torch.eye(32, dtype=torch.float16)  # x @ W^T = W^T: reads every weight back
    assert torch.equal(weight_only_matmul(x, stored, scale, 4).T, q.half())


def test_bad_inputs_are_value_errors():
    stored, scale = official(16, 64, 8)
    with pytest.raises(ValueError, match="fp16/bf16"):
        weight_only_matmul(torch.randn(2, 64), stored, scale, 8)
    with pytest.raises(ValueError, match="do not fit"):
        weight_only_matmul(torch.randn(2, 32).half(), stored, scale, 8)


def test_choose_config_splits_k_only_for_small_batches_and_fills_the_gpu():
    decode = choose_config(1, 4096, 4096, 8, num_sms=132)
    assert decode.split_k > 1 and 4096 // decode.block_n * decode.split_k >= 132
    assert choose_config(128, 4096, 4096, 4, num_sms=132).split_k == 1
    wide = choose_config(1, 27392, 4096, 4, num_sms=132)
    assert 27392 // wide.block_n >= 2 * 132 and wide.split_k == 1  # enough tiles without splitting
    for m in (1, 16, 17, 64, 65, 128):
        config = choose_config(m, 4096, 13696, 4, num_sms=132)
        assert min(config.block_m, config.block_n, config.block_k // 2) >= 16  # tl.dot needs 16 on every side


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_linear_runs_the_triton_kernel(bits):
    stored, scale = official(48, 128, bits)
    bias = torch.randn(48)
    module = QuantizedLinear.from_official(stored, scale, bits, dtype=torch.float16, device="cpu", bias=bias,
                                           kernel="triton")
    assert module.kernel_name == f"triton_w{bits}a16"
    assert torch.equal(module.weight, stored)  # the official bytes, not repacked
    x = torch.randn(2, 3, 128).half()
    y = module(x)
    reference = torch.nn.functional.linear(x.float(), dequantize(stored, scale, bits), bias)
    torch.testing.assert_close(y.float(), reference, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("bits", [8, 4])
def test_the_kernel_is_one_opaque_op_to_torch_compile(bits):
    # The op's fake implementation and its schema hold (opcheck), and a compiled graph keeps the op whole
    # (fullgraph=True raises on a graph break) and computes what the eager call computes.
    stored, scale = official(48, 128, bits)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(4)).half()
    op = torch.ops.chatglm2.weight_only_matmul
    torch.library.opcheck(op, (x, stored, scale, bits))
    compiled = torch.compile(lambda x: op(x, stored, scale, bits) * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), 2 * weight_only_matmul(x, stored, scale, bits))
