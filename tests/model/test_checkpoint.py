"""Checkpoint files: the official layout is written and read back exactly, and broken directories fail clearly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from serve_app.model.checkpoint import (
    CheckpointError,
    expected_shapes,
    iter_tensors,
    read_config,
    weight_files,
    write_checkpoint,
)
from serve_app.model.demo import preset_config, random_tensors, write_demo_checkpoint
from serve_app.model.loader import load_model

IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])


def _logits(checkpoint):
    return load_model(checkpoint, "fp32", "cpu").model(IDS, torch.arange(6)[None])


def test_demo_checkpoint_has_the_official_layout(tiny_checkpoint):
    raw = json.loads((tiny_checkpoint / "config.json").read_text())
    for field in ("num_layers", "hidden_size", "ffn_hidden_size", "kv_channels", "num_attention_heads",
                  "multi_query_attention", "multi_query_group_num", "padded_vocab_size", "seq_length",
                  "layernorm_epsilon", "rmsnorm", "post_layer_norm", "add_qkv_bias", "original_rope",
                  "add_bias_linear", "apply_residual_connection_post_layernorm"):
        assert field in raw
    assert raw["model_type"] == "chatglm" and raw["torch_dtype"] == "float16" and "quantization_bit" not in raw
    tensors = dict(iter_tensors(tiny_checkpoint))
    config = read_config(tiny_checkpoint)
    assert {name: tuple(t.shape) for name, t in tensors.items()} == expected_shapes(config)
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert (tiny_checkpoint / "tokenizer.model").is_file() and (tiny_checkpoint / "tokenizer_config.json").is_file()
    assert [p.name for p in weight_files(tiny_checkpoint)] == ["pytorch_model.bin"]


def test_6b_preset_has_the_real_shapes():
    config = preset_config("6b", 8000)
    shapes = expected_shapes(config)
    assert len(shapes) == 200
    assert shapes["transformer.encoder.layers.0.self_attention.query_key_value.weight"] == (4608, 4096)
    assert shapes["transformer.encoder.layers.27.mlp.dense_h_to_4h.weight"] == (27392, 4096)
    assert shapes["transformer.encoder.layers.27.mlp.dense_4h_to_h.weight"] == (4096, 13696)
    assert shapes["transformer.output_layer.weight"] == (65024, 4096)
    total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    assert total == 12_487_168_064


@pytest.mark.parametrize("safetensors", [False, True])
@pytest.mark.parametrize("shard", [None, 200_000])
def test_round_trip_single_and_sharded(tmp_path, tiny_checkpoint, safetensors, shard):
    config = read_config(tiny_checkpoint)
    out = write_checkpoint(tmp_path / "copy", config, iter_tensors(tiny_checkpoint),
                           tokenizer_model=tiny_checkpoint / "tokenizer.model", safetensors=safetensors,
                           max_shard_bytes=shard)
    files = weight_files(out)
    assert all(f.suffix == (".safetensors" if safetensors else ".bin") for f in files)
    if shard:
        assert len(files) > 1 and files[0].name.endswith(f"-00001-of-{len(files):05d}" + files[0].suffix)
        index = "model.safetensors.index.json" if safetensors else "pytorch_model.bin.index.json"
        assert set(json.loads((out / index).read_text())["weight_map"]) == set(expected_shapes(config))
    for (name_a, a), (name_b, b) in zip(sorted(iter_tensors(tiny_checkpoint)), sorted(iter_tensors(out))):
        assert name_a == name_b and torch.equal(a, b)
    torch.testing.assert_close(_logits(out), _logits(tiny_checkpoint), rtol=0, atol=0)


def test_demo_writer_is_deterministic(tmp_path):
    a = write_demo_checkpoint(tmp_path / "a", "tiny")
    b = write_demo_checkpoint(tmp_path / "b", "tiny", safetensors=True)
    for (_, x), (_, y) in zip(sorted(iter_tensors(a)), sorted(iter_tensors(b))):
        assert torch.equal(x, y)
    assert (a / "tokenizer.model").read_bytes() == (b / "tokenizer.model").read_bytes()


@pytest.fixture
def broken(tmp_path, tiny_checkpoint):
    target = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, target)
    return target


def test_missing_directory_or_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_model(tmp_path / "nowhere")


def test_missing_weights(broken):
    (broken / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(broken)


def test_missing_shard_named_by_index(tmp_path, tiny_checkpoint):
    out = write_checkpoint(tmp_path / "s", read_config(tiny_checkpoint), iter_tensors(tiny_checkpoint),
                           max_shard_bytes=200_000)
    weight_files(out)[1].unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_model(out)


def test_wrong_model_type(broken):
    raw = json.loads((broken / "config.json").read_text())
    raw["model_type"] = "llama"
    (broken / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        load_model(broken)


def _rewrite(broken, edit):
    tensors = {name: tensor.clone() for name, tensor in iter_tensors(broken)}  # detach from the mapped file
    edit(tensors)
    torch.save(tensors, broken / "pytorch_model.bin")


def test_missing_tensor(broken):
    _rewrite(broken, lambda t: t.pop("transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"))
    with pytest.raises(CheckpointError, match="lacks tensor.*layers.1.mlp.dense_4h_to_h.weight"):
        load_model(broken)


def test_shape_mismatch(broken):
    def shrink(t):
        t["transformer.encoder.layers.0.self_attention.dense.weight"] = torch.zeros(128, 64, dtype=torch.float16)

    _rewrite(broken, shrink)
    with pytest.raises(CheckpointError, match=r"self_attention.dense.weight: shape \[128, 64\] disagrees"):
        load_model(broken)


def test_unexpected_tensor(broken):
    _rewrite(broken, lambda t: t.__setitem__("lm_head.weight", torch.zeros(2, 2)))
    with pytest.raises(CheckpointError, match="unexpected tensor 'lm_head.weight'"):
        load_model(broken)


def test_pickled_code_is_refused(broken):
    """A .bin is opened weights-only: a pickle that would run code is rejected, not executed."""
    import pickle

    class Exploit:
        def __reduce__(self):
            return (print, ("this must never run",))

    with open(broken / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"x": Exploit()}, handle)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_model(broken)


def test_unsupported_config_values(broken):
    raw = json.loads((broken / "config.json").read_text())
    raw["quantization_bit"] = 3
    (broken / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="quantization_bit=3"):
        read_config(broken)


def test_random_tensors_stream_one_at_a_time():
    """The 6b writer never materialises the model: tensors come from a generator, in the official order."""
    stream = random_tensors(preset_config("tiny", 1000))
    name, first = next(stream)
    assert name == "transformer.embedding.word_embeddings.weight" and first.dtype == torch.float16
