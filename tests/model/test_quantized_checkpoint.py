"""Pre-quantized checkpoints: `quantize` writes the official format bit-exactly, and it loads like on-the-fly."""

from __future__ import annotations

import json

import pytest
import torch

from serve_app.model.checkpoint import CheckpointError, is_quantized_weight, iter_tensors, quantize_checkpoint
from serve_app.model.loader import load_model
from tests.serving import run_cli

IDS = torch.tensor([[1001, 1003, 5, 6, 7, 8, 9]])


@pytest.fixture(scope="module", params=[8, 4])
def quantized(request, tmp_path_factory, tiny_checkpoint):
    bits = request.param
    return bits, quantize_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp(f"int{bits}"), bits)


def official_expected(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official formula written out independently: fp16 arithmetic, then two's-complement nibbles."""
    scale = weight.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)  # fp16 [out]
    q = torch.round(weight / scale[:, None]).to(torch.int8)
    if bits == 8:
        return q, scale
    high, low = q[:, 0::2].to(torch.int16), q[:, 1::2].to(torch.int16)
    byte = ((high & 0xF) << 4) | (low & 0xF)  # 0..255
    return torch.where(byte > 127, byte - 256, byte).to(torch.int8), scale


def test_quantize_output_is_the_official_format(quantized, tiny_checkpoint):
    bits, out = quantized
    assert json.loads((out / "config.json").read_text())["quantization_bit"] == bits
    assert (out / "tokenizer.model").read_bytes() == (tiny_checkpoint / "tokenizer.model").read_bytes()
    written = dict(iter_tensors(out))
    for name, weight in iter_tensors(tiny_checkpoint):
        if is_quantized_weight(name):
            q, scale = official_expected(weight, bits)
            assert written[name].dtype == torch.int8 and torch.equal(written[name], q), name
            assert written[name + "_scale"].dtype == torch.float16 and torch.equal(written[name + "_scale"], scale)
        else:
            assert torch.equal(written[name], weight), name  # embedding, output layer, norms, qkv bias: unchanged


def test_prequantized_load_equals_on_the_fly(quantized, tiny_checkpoint):
    bits, out = quantized
    pre = load_model(out, "auto", "cpu")
    fly = load_model(tiny_checkpoint, f"int{bits}", "cpu")
    assert pre.precision == fly.precision == f"int{bits}"
    positions = torch.arange(IDS.shape[1])[None]
    torch.testing.assert_close(pre.model(IDS, positions), fly.model(IDS, positions), rtol=0, atol=0)


def test_loaded_layers_give_back_the_file(quantized):
    bits, out = quantized
    loaded = load_model(out, "auto", "cpu")
    written = dict(iter_tensors(out))
    layer = loaded.model.transformer.encoder.layers[1].mlp.dense_h_to_4h
    stored, scale = layer.official_state()
    assert torch.equal(stored, written["transformer.encoder.layers.1.mlp.dense_h_to_4h.weight"])
    assert torch.equal(scale, written["transformer.encoder.layers.1.mlp.dense_h_to_4h.weight_scale"])


def test_quantized_model_is_close_to_full_precision(quantized, tiny_fp32):
    bits, out = quantized
    loaded = load_model(out, "auto", "cpu")
    positions = torch.arange(IDS.shape[1])[None]
    full = tiny_fp32.model(IDS, positions)
    err = (loaded.model(IDS, positions) - full).norm() / full.norm()
    assert err < (0.05 if bits == 8 else 0.35), err


def test_quantized_model_is_small(quantized, tiny_fp32):
    bits, out = quantized
    loaded = load_model(out, "auto", "cpu")
    layer = loaded.model.transformer.encoder.layers[0].mlp.dense_h_to_4h
    dense = layer.out_features * layer.in_features
    held = sum(b.numel() * b.element_size() for name, b in layer.named_buffers() if name != "bias")
    assert held <= dense * bits / 8 + 4 * layer.out_features * 8  # packed bytes + per-row scales and zeros



def test_generate_on_the_fly_int4_and_on_a_bits4_checkpoint(tmp_path, tiny_checkpoint):
    run = run_cli("quantize", str(tiny_checkpoint), str(tmp_path / "q4"), "--bits", "4")
    assert run.returncode == 0, run.stderr
    fly = run_cli("generate", "--checkpoint", str(tiny_checkpoint), "--precision", "int4", "--prompt", "你好",
               "--max-new-tokens", "8", "--json")
    pre = run_cli("generate", "--checkpoint", str(tmp_path / "q4"), "--prompt", "你好", "--max-new-tokens", "8",
               "--json")
    assert fly.returncode == 0 and pre.returncode == 0, fly.stderr + pre.stderr
    fly_out, pre_out = json.loads(fly.stdout), json.loads(pre.stdout)
    assert fly_out["token_ids"] == pre_out["token_ids"] and len(fly_out["token_ids"]) >= 1


def test_a_prequantized_checkpoint_cannot_be_served_in_full_precision(quantized):
    bits, out = quantized
    with pytest.raises(CheckpointError, match=f"pre-quantized to int{bits}"):
        load_model(out, "fp32", "cpu")


def test_unsupported_quantization_bit(quantized, tmp_path):
    import shutil

    _, out = quantized
    copy = shutil.copytree(out, tmp_path / "copy")
    raw = json.loads((copy / "config.json").read_text())
    raw["quantization_bit"] = 2
    (copy / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="quantization_bit=2"):
        load_model(copy, "auto", "cpu")


def test_wrong_packed_shape(tmp_path, tiny_checkpoint):
    out = quantize_checkpoint(tiny_checkpoint, tmp_path / "bad", 4)
    tensors = {name: t.clone() for name, t in iter_tensors(out)}
    name = "transformer.encoder.layers.0.self_attention.dense.weight"
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] * 2, dtype=torch.int8)  # unpacked
    torch.save(tensors, out / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"self_attention.dense.weight: expected int8 \[128, 64\]"):
        load_model(out, "auto", "cpu")


def test_quantize_refuses_bad_input(tmp_path, quantized):
    _, out = quantized
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(out, tmp_path / "again", 4)


def test_the_kernel_choice_reaches_every_layer_and_a_failing_kernel_stops_the_load(tiny_checkpoint, monkeypatch):
    from serve_app.model.quant import KernelUnavailable

    assert load_model(tiny_checkpoint, "int8", "cpu").kernels == {"int8pack_mm": 8}  # 2 layers x 4 linears
    assert load_model(tiny_checkpoint, "int4", "cpu", quant_kernel="dequant").kernels == {"dequant": 8}
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)  # Triton cannot run on CPU then
    with pytest.raises(KernelUnavailable, match="allow the kernel fallback"):
        load_model(tiny_checkpoint, "int4", "cpu", quant_kernel="triton")
    with pytest.warns(RuntimeWarning, match="dequantize"):
        loaded = load_model(tiny_checkpoint, "int4", "cpu", quant_kernel="triton", allow_kernel_fallback=True)
    assert loaded.kernels == {"dequant": 8}
