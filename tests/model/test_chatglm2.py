"""The model computes what ChatGLM2 computes: checked against a float64 reference written here from the published
facts, and against transformers' native GlmForCausalLM loaded through a key mapping (an independent oracle)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from serve_app.model.chatglm2 import KVCache
from serve_app.model.checkpoint import iter_tensors, read_config


def reference_logits(state: dict[str, torch.Tensor], config, ids: list[int]) -> torch.Tensor:
    """ChatGLM2 forward in float64, one head and one position at a time where it helps readability."""
    sd = {k: v.double() for k, v in state.items()}
    heads, groups, d = config.num_attention_heads, config.multi_query_group_num, config.kv_channels
    n = len(ids)

    def rmsnorm(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + config.layernorm_epsilon)

    def rotate(x, pos):  # x [n_heads, d]; first half rotated, pairs (2i, 2i+1)
        out = x.clone()
        half = d // 2
        for i in range(half // 2):
            theta = pos * 10000.0 ** (-2 * i / half)
            a, b = x[:, 2 * i], x[:, 2 * i + 1]
            out[:, 2 * i] = a * math.cos(theta) - b * math.sin(theta)
            out[:, 2 * i + 1] = b * math.cos(theta) + a * math.sin(theta)
        return out

    x = sd["transformer.embedding.word_embeddings.weight"][ids]  # [n, hidden]
    for layer in range(config.num_layers):
        p = f"transformer.encoder.layers.{layer}."
        h = rmsnorm(x, sd[p + "input_layernorm.weight"])
        qkv = h @ sd[p + "self_attention.query_key_value.weight"].T + sd[p + "self_attention.query_key_value.bias"]
        q = qkv[:, : heads * d].reshape(n, heads, d)
        k = qkv[:, heads * d : (heads + groups) * d].reshape(n, groups, d)
        v = qkv[:, (heads + groups) * d :].reshape(n, groups, d)
        q = torch.stack([rotate(q[t], t) for t in range(n)])
        k = torch.stack([rotate(k[t], t) for t in range(n)])
        ctx = torch.zeros(n, heads, d, dtype=torch.float64)
        for head in range(heads):
            g = head // (heads // groups)  # heads 0..H/G-1 share group 0, and so on
            scores = q[:, head] @ k[:, g].T / math.sqrt(d)  # [n, n]
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            ctx[:, head] = scores.softmax(-1) @ v[:, g]
        x = x + ctx.reshape(n, heads * d) @ sd[p + "self_attention.dense.weight"].T
        h = rmsnorm(x, sd[p + "post_attention_layernorm.weight"])
        up = h @ sd[p + "mlp.dense_h_to_4h.weight"].T
        gate, lin = up[:, : config.ffn_hidden_size], up[:, config.ffn_hidden_size :]
        x = x + (torch.nn.functional.silu(gate) * lin) @ sd[p + "mlp.dense_4h_to_h.weight"].T
    x = rmsnorm(x, sd["transformer.encoder.final_layernorm.weight"])
    return x @ sd["transformer.output_layer.weight"].T


def glm_oracle(checkpoint):
    """transformers' GlmForCausalLM with the ChatGLM2 tensors mapped onto it (no remote code involved)."""
    from transformers import GlmConfig, GlmForCausalLM

    config = read_config(checkpoint)
    glm = GlmForCausalLM(
        GlmConfig(
            vocab_size=config.padded_vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.ffn_hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.multi_query_group_num,
            head_dim=config.kv_channels,
            rms_norm_eps=config.layernorm_epsilon,
            max_position_embeddings=config.seq_length,
            # The official rotary base is 10000 * rope_ratio (chatglm2-6b-32k sets rope_ratio; chatglm2-6b has none).
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * config.rope_ratio,
                             "partial_rotary_factor": 0.5},
            pad_token_id=config.pad_token_id,
            eos_token_id=config.eos_token_id,
            attention_bias=True,
        )
    ).float().eval()
    q_rows = config.num_attention_heads * config.kv_channels
    kv_rows = config.multi_query_group_num * config.kv_channels
    mapped = {}
    for name, tensor in iter_tensors(checkpoint):
        tensor = tensor.float()
        name = name.replace("transformer.encoder.layers.", "model.layers.")
        if name.endswith("inv_freq"):
            continue
        if "query_key_value" in name:
            base = name.rsplit(".query_key_value.", 1)[0].replace("self_attention", "self_attn")
            suffix = name.rsplit(".", 1)[1]
            q, k, v = tensor.split((q_rows, kv_rows, kv_rows), dim=0)
            mapped.update({f"{base}.q_proj.{suffix}": q, f"{base}.k_proj.{suffix}": k, f"{base}.v_proj.{suffix}": v})
            continue
        name = (
            name.replace("transformer.embedding.word_embeddings", "model.embed_tokens")
            .replace("self_attention.dense", "self_attn.o_proj")
            .replace("mlp.dense_h_to_4h", "mlp.gate_up_proj")
            .replace("mlp.dense_4h_to_h", "mlp.down_proj")
            .replace("transformer.encoder.final_layernorm", "model.norm")
            .replace("transformer.output_layer", "lm_head")
        )
        mapped[name] = tensor
    missing, unexpected = glm.load_state_dict(mapped, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return glm


def test_forward_matches_float64_reference(tiny_checkpoint, tiny_fp32):
    config = read_config(tiny_checkpoint)
    state = dict(iter_tensors(tiny_checkpoint))
    ids = [5, 17, 300, 2, 999, 64, 12, 1000, 1003, 7]
    expected = reference_logits(state, config, ids)
    positions = torch.arange(len(ids))[None]
    got = tiny_fp32.model(torch.tensor([ids]), positions)[0].double()
    rel = (got - expected).norm() / expected.norm()
    assert rel < 1e-5, rel


def test_forward_matches_transformers_glm(tiny_checkpoint, tiny_fp32):
    glm = glm_oracle(tiny_checkpoint)
    ids = torch.tensor([[1001, 1003, 40, 41, 500, 13, 13, 77]])
    with torch.no_grad():
        expected = glm(ids).logits
    got = tiny_fp32.model(ids, torch.arange(ids.shape[1])[None])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_greedy_tokens_match_transformers_glm(tiny_checkpoint, tiny_fp32, tiny_tokenizer):
    from serve_app.engine.params import SamplingParams
    from serve_app.engine.sequential import generate

    glm = glm_oracle(tiny_checkpoint)
    prompt = tiny_tokenizer.build_chat_input("你好", [])
    ours = generate(tiny_fp32, prompt, SamplingParams(max_new_tokens=24, ignore_eos=True))
    with torch.no_grad():
        theirs = glm.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False)
    assert ours.token_ids == theirs[0, len(prompt) :].tolist()


def test_incremental_decode_equals_full_forward(tiny_fp32):
    config = tiny_fp32.config
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])
    full = tiny_fp32.model(ids, torch.arange(10)[None])
    cache = KVCache(config, num_blocks=3, block_size=16, dtype=torch.float32, device="cpu")
    slot = torch.tensor([2])
    steps = [tiny_fp32.model(ids[:, :4], torch.arange(4)[None], cache, slot)]
    for t in range(4, 10):
        steps.append(tiny_fp32.model(ids[:, t : t + 1], torch.tensor([[t]]), cache, slot))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_batched_decode_of_different_lengths_equals_single(tiny_fp32):
    """Two slots at different positions in one decode call give what each gives alone."""
    config = tiny_fp32.config
    a, b = [5, 6, 7, 8, 9, 10, 11], [20, 21, 22]
    cache = KVCache(config, num_blocks=2, block_size=16, dtype=torch.float32, device="cpu")
    tiny_fp32.model(torch.tensor([a[:-1]]), torch.arange(len(a) - 1)[None], cache, torch.tensor([0]))
    tiny_fp32.model(torch.tensor([b[:-1]]), torch.arange(len(b) - 1)[None], cache, torch.tensor([1]))
    batched = tiny_fp32.model(
        torch.tensor([[a[-1]], [b[-1]]]), torch.tensor([[len(a) - 1], [len(b) - 1]]), cache, torch.tensor([0, 1])
    )
    alone_a = tiny_fp32.model(torch.tensor([a]), torch.arange(len(a))[None])[:, -1]
    alone_b = tiny_fp32.model(torch.tensor([b]), torch.arange(len(b))[None])[:, -1]
    torch.testing.assert_close(batched[:, 0], torch.cat([alone_a, alone_b]), rtol=1e-5, atol=1e-5)


def test_logits_are_not_degenerate(tiny_fp32):
    logits = tiny_fp32.model(torch.tensor([[1001, 1003, 50]]), torch.arange(3)[None])[0, -1]
    top = logits.topk(2).values
    assert top[0] > top[1]  # no tie at the top
    assert logits.std() > 0.5


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precisions_load_and_run(tiny_checkpoint, tiny_fp32, precision):
    from serve_app.model.loader import load_model

    loaded = load_model(tiny_checkpoint, precision, "cpu")
    ids = torch.tensor([[1001, 1003, 5, 6, 7]])
    got = loaded.model(ids, torch.arange(5)[None])
    expected = tiny_fp32.model(ids, torch.arange(5)[None])
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()


def test_auto_precision_never_picks_half_on_cpu(tiny_checkpoint):
    from serve_app.model.loader import load_model

    loaded = load_model(tiny_checkpoint, "auto", "cpu")
    assert loaded.precision == "fp32" and loaded.dtype == torch.float32


# ---- the 32K family: rope_ratio -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_32k(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint as chatglm2-6b-32k's config.json describes its model: seq_length 32768 and a rope_ratio."""
    path = tmp_path_factory.mktemp("tiny-32k") / "checkpoint"
    shutil.copytree(tiny_checkpoint, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"seq_length": 32768, "rope_ratio": 16.0}))
    return path


def test_rope_ratio_matches_transformers_glm_far_apart(tiny_checkpoint, tiny_32k):
    """With rope_ratio the rotary base is 10000 * rope_ratio, as in the original modeling code: our forward equals
    transformers' GLM with that base at positions up to 32K apart (RoPE's scores depend on the distance between
    positions, so they are spread out), and differs from the base of chatglm2-6b there, so the check can fail."""
    from serve_app.model.loader import load_model

    assert read_config(tiny_32k).rope_ratio == 16.0
    model = load_model(tiny_32k, "fp32", "cpu")
    ids = torch.tensor([[1001, 1003, 40, 41, 500, 13, 13, 77]])
    positions = torch.tensor([[0, 1, 900, 4_000, 11_000, 19_500, 27_000, 32_700]])
    with torch.no_grad():
        expected = glm_oracle(tiny_32k)(ids, position_ids=positions).logits
        base_6b = glm_oracle(tiny_checkpoint)(ids, position_ids=positions).logits
    got = model.model(ids, positions)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got - base_6b).abs().max() > 1e-2
