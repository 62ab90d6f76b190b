"""The CPU dense linears: oneDNN's packed GEMM gives what F.linear gives, and the loader installs it where it can."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from serve_app.model import cpu_linear
from serve_app.model.cpu_linear import PackedLinear, pack_linears
from serve_app.model.loader import load_model

pytestmark = pytest.mark.skipif(not cpu_linear.packable(torch.float32), reason="this torch build has no oneDNN")


@pytest.mark.parametrize("shape", [(1, 96), (16, 96), (3, 5, 96), (200, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_computes_what_linear_computes(shape, bias):
    linear = nn.Linear(96, 160, bias=bias)
    packed = PackedLinear.from_linear(linear)
    x = torch.randn(shape)
    with torch.inference_mode():
        out = packed(x)
    assert out.shape == (*shape[:-1], 160)
    torch.testing.assert_close(out, linear(x).detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(packed.dense_weight(), linear.weight.detach())  # the reorder loses nothing


def test_packed_linear_takes_a_transposed_input():
    linear = nn.Linear(64, 32)
    x = torch.randn(64, 7).t()  # not contiguous
    torch.testing.assert_close(PackedLinear.from_linear(linear)(x), linear(x).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not cpu_linear.packable(torch.bfloat16), reason="no oneDNN bf16 kernels on this CPU")
def test_packed_linear_in_bf16():
    linear = nn.Linear(128, 64).to(torch.bfloat16)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    torch.testing.assert_close(PackedLinear.from_linear(linear)(x), linear(x).detach(), rtol=2e-2, atol=2e-2)


def test_pack_linears_packs_fp32_linears_as_they_are(monkeypatch):
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8)), nn.ReLU())
    assert pack_linears(model) == {"onednn-packed": 2, "onednn-packed-bf16": 0, "aten": 0}
    assert isinstance(model[0], PackedLinear) and isinstance(model[1][0], PackedLinear)
    assert model[0].dtype == torch.float32


def test_fp16_linears_are_packed_as_bf16_where_onednn_has_bf16_and_left_alone_elsewhere(monkeypatch, caplog):
    linear = nn.Linear(64, 32).half()
    x = torch.randn(5, 64, dtype=torch.float16)
    reference = linear(x).float().detach()
    for bf16 in (True, False):
        def packable(dtype, bf16=bf16):
            return dtype == torch.float32 or (bf16 and dtype == torch.bfloat16)

        monkeypatch.setattr(cpu_linear, "packable", packable)
        if bf16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            continue  # this CPU cannot run the packed bf16 path
        model = nn.Sequential(linear)
        with caplog.at_level(logging.WARNING, logger=cpu_linear.__name__):
            counts = pack_linears(model)
        if bf16:
            assert counts == {"onednn-packed": 0, "onednn-packed-bf16": 1, "aten": 0}
            assert model[0].dtype == torch.bfloat16
            out = model[0](x)
            assert out.dtype == torch.float16  # fp16 in, fp16 out, as the module it replaced
            out = out.float()
            torch.testing.assert_close(out, reference, rtol=3e-2, atol=3e-2)
        else:
            assert counts == {"onednn-packed": 0, "onednn-packed-bf16": 0, "aten": 1}
            assert type(model[0]) is nn.Linear
            assert "float16 linears run through F.linear" in caplog.text


def test_a_linear_that_could_not_be_packed_is_reported(monkeypatch, caplog):
    monkeypatch.setattr(cpu_linear, "packable", lambda dtype: False)
    model = nn.Sequential(nn.Linear(8, 8))
    with caplog.at_level(logging.WARNING, logger=cpu_linear.__name__):
        assert pack_linears(model) == {"onednn-packed": 0, "onednn-packed-bf16": 0, "aten": 1}
    assert "not oneDNN's packed GEMM" in caplog.text


def test_the_loader_packs_cpu_linears_unless_told_not_to(tiny_checkpoint):
    packed = load_model(tiny_checkpoint, "fp32", "cpu")
    plain = load_model(tiny_checkpoint, "fp32", "cpu", pack_cpu_linears=False)
    layers = packed.config.num_layers
    assert packed.dense_kernels == {"onednn-packed": 4 * layers + 1}  # four per block and the output layer
    assert plain.dense_kernels == {}
    assert isinstance(packed.model.transformer.output_layer, PackedLinear)
    assert type(plain.model.transformer.output_layer) is nn.Linear
    assert packed.weight_bytes() == plain.weight_bytes()
    ids = torch.tensor([[5, 9, 17, 33, 2, 71]])
    positions = torch.arange(6)[None]
    torch.testing.assert_close(
        packed.model(ids, positions), plain.model(ids, positions), rtol=1e-4, atol=1e-4
    )


def test_quantized_models_pack_their_fp16_output_layer_as_bf16_where_they_can(tiny_checkpoint):
    loaded = load_model(tiny_checkpoint, "int8", "cpu")
    # The block linears are quantized; the output layer is fp16 as officially, packed as bf16 where oneDNN can.
    expected = "onednn-packed-bf16" if cpu_linear.packable(torch.bfloat16) else "aten"
    assert loaded.dense_kernels == {expected: 1}
    assert loaded.weight_bytes() == load_model(tiny_checkpoint, "int8", "cpu", pack_cpu_linears=False).weight_bytes()
