"""build_model's checkpoint-name -> install-rule table: every tensor of a checkpoint has exactly one rule, each rule
installs what it says, and a name outside the table is an error."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from serve_app.model import loader
from serve_app.model.checkpoint import (
    CheckpointError,
    expected_shapes,
    is_quantized_weight,
    iter_tensors,
    quantize_checkpoint,
    read_config,
)
from serve_app.model.demo import preset_config, random_tensors
from serve_app.model.loader import PRECISIONS, RULES, build_model, install_rules
from serve_app.model.quant import QuantizedLinear

TINY = preset_config("tiny", 1000)
IDS = torch.tensor([[5, 6, 7, 8, 9]])


def logits(loaded):
    with torch.inference_mode():
        return loaded.model(IDS, torch.arange(IDS.shape[1])[None])


def test_the_precisions_are_defined_once_here():
    assert PRECISIONS == ("auto", "fp32", "bf16", "fp16", "int8", "int4")


def test_every_rule_is_an_installer_method():
    assert all(callable(getattr(loader._Installer, rule, None)) for rule in RULES)


@pytest.mark.parametrize("preset", ["tiny", "6b"])
@pytest.mark.parametrize(("bits", "prequantized"), [(0, False), (8, False), (4, False), (8, True), (4, True)])
def test_every_checkpoint_name_maps_to_exactly_one_rule(preset, bits, prequantized):
    config = preset_config(preset, 1000)
    if prequantized:
        config = replace(config, quantization_bit=bits)
    rules = install_rules(config, bits)
    shapes = expected_shapes(config)
    scales = {f"{name}_scale" for name in shapes if is_quantized_weight(name)} if prequantized else set()
    assert set(rules) == set(shapes) | scales  # a dict: one rule per name
    assert set(rules.values()) <= set(RULES)
    linears = 4 * config.num_layers
    counts = Counter(rules.values())
    assert counts["skip"] == 1 and rules["transformer.rotary_pos_emb.inv_freq"] == "skip"
    if not bits:
        assert counts == {"skip": 1, "dense": len(shapes) - 1}
    elif prequantized:
        assert counts["packed"] == counts["scale"] == linears and "quantize" not in counts
    else:
        assert counts["quantize"] == linears and "packed" not in counts and "scale" not in counts
    if bits:
        side = ("transformer.embedding.word_embeddings.weight", "transformer.output_layer.weight")
        assert [rules[name] for name in side] == ["side", "side"]
        assert counts["bias"] == config.num_layers  # the qkv biases
        assert rules["transformer.encoder.layers.0.input_layernorm.weight"] == "dense"


def test_the_table_holds_exactly_the_tensors_a_checkpoint_writes(tiny_checkpoint, tmp_path):
    config = read_config(tiny_checkpoint)
    assert set(install_rules(config, 0)) == {name for name, _ in iter_tensors(tiny_checkpoint)}
    out = quantize_checkpoint(tiny_checkpoint, tmp_path / "q4", 4)
    assert set(install_rules(read_config(out), 4)) == {name for name, _ in iter_tensors(out)}


def test_a_name_outside_the_table_is_an_error():
    tensors = [*random_tensors(TINY), ("transformer.encoder.layers.0.mlp.dense_4h_to_h.weight_scale", torch.ones(64))]
    with pytest.raises(CheckpointError, match="unexpected tensor '.*dense_4h_to_h.weight_scale' in random"):
        build_model(TINY, tensors, Path("random"), "int8", "cpu")  # a scale in a checkpoint that is not pre-quantized


def test_inv_freq_may_be_left_out_but_nothing_else():
    tensors = [(name, t) for name, t in random_tensors(TINY) if not name.endswith("inv_freq")]
    build_model(TINY, tensors, Path("random"), "fp32", "cpu")
    with pytest.raises(CheckpointError, match="random lacks tensor.*layers.0.input_layernorm.weight"):
        build_model(TINY, tensors[2:], Path("random"), "fp32", "cpu")


def test_a_prequantized_layer_missing_its_scale_is_named(tiny_checkpoint, tmp_path):
    out = quantize_checkpoint(tiny_checkpoint, tmp_path / "q8", 8)
    dropped = "transformer.encoder.layers.1.self_attention.dense.weight_scale"
    tensors = [(name, t) for name, t in iter_tensors(out) if name != dropped]
    with pytest.raises(CheckpointError, match=r"lacks tensor\(s\): transformer.encoder.layers.1.self_attention.dense"
                                              r".weight_scale$"):
        build_model(read_config(out), tensors, out, "auto", "cpu")


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_a_quantized_layers_bias_may_come_before_or_after_its_weight(precision):
    in_order = list(random_tensors(TINY))  # the official order: each qkv weight, then its bias
    bias_first = sorted(in_order, key=lambda item: not item[0].endswith(".bias"))
    after = build_model(TINY, in_order, Path("random"), precision, "cpu")
    before = build_model(TINY, bias_first, Path("random"), precision, "cpu")
    qkv = after.model.transformer.encoder.layers[0].self_attention.query_key_value
    assert isinstance(qkv, QuantizedLinear) and qkv.bias is not None and qkv.bias.dtype == after.dtype
    torch.testing.assert_close(logits(before), logits(after), rtol=0, atol=0)
    assert after.kernels == before.kernels and after.weight_bytes() == before.weight_bytes()


def test_side_tensors_are_fp16_only_in_quantized_models():
    quantized = build_model(TINY, random_tensors(TINY), Path("random"), "int8", "cpu", pack_cpu_linears=False)
    full = build_model(TINY, random_tensors(TINY), Path("random"), "fp32", "cpu", pack_cpu_linears=False)
    for loaded, side in ((quantized, torch.float16), (full, torch.float32)):
        assert loaded.model.transformer.output_layer.weight.dtype == side
        assert loaded.model.transformer.embedding.word_embeddings.weight.dtype == side
        assert loaded.model.transformer.encoder.final_layernorm.weight.dtype == torch.float32
