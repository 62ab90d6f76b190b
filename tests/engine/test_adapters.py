"""Adapters in the engine, against independent references:

- P-tuning v2: transformers' GlmForCausalLM (the ChatGLM2 tensors mapped onto it) given the prefix as its past keys
  and values, the prompt's position ids from 0 and an attention mask of ones over the prefix: the original code's
  semantics, computed by another implementation.
- LoRA: adapters written by peft itself (`get_peft_model(...).save_pretrained`), and the reference is peft's
  `merge_and_unload()` of the same weights into the base model, run without a cache.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from serve_app.engine.engine import Engine, EngineConfig
from serve_app.engine.errors import InvalidRequest
from serve_app.engine.params import SamplingParams
from serve_app.model.adapters import AdapterError, read_adapter, write_ptuning
from serve_app.model.checkpoint import read_config
from serve_app.model.loader import load_model

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

PROMPTS = ([1001, 1003, 40, 41, 500, 13], [1001, 1003, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 300, 301],
           [1001, 1003] + list(range(100, 170)))
NEW = 12


def greedy(n: int = NEW) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


async def collect(engine: Engine, prompt, adapter=None, params=None):
    return [t async for d in engine.generate(prompt, params or greedy(), adapter=adapter) for t in d.token_ids]


def run_all(engine: Engine, jobs):
    """jobs: (prompt, adapter) pairs run concurrently (one batch); their ids in order."""
    async def main():
        return await asyncio.gather(*(collect(engine, prompt, adapter) for prompt, adapter in jobs))

    return asyncio.run(main())


@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    """A model of its own: an engine with adapters wraps its linears."""
    return load_model(tiny_checkpoint, "fp32", "cpu")


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, tiny_checkpoint):
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("adapters")
    config = read_config(tiny_checkpoint)
    raw = json.loads((tiny_checkpoint / "config.json").read_text())
    write_ptuning(root / "pt", config, raw, pre_seq_len=24, seed=1)
    write_ptuning(root / "pt-proj", config, raw, pre_seq_len=64, prefix_projection=True, seed=2)
    for name, modules, extra in (("lora-attn", ["query_key_value", "dense"], {}),
                                 ("lora-all", ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
                                  {"use_rslora": True, "alpha_pattern": {"dense_4h_to_h": 4}})):
        model = load_model(tiny_checkpoint, "fp32", "cpu", pack_cpu_linears=False).model
        torch.manual_seed(len(name))
        peft_model = get_peft_model(model, LoraConfig(r=8 if "all" in name else 4, lora_alpha=16,
                                                      target_modules=modules, init_lora_weights=False, **extra))
        with torch.no_grad():  # peft's default init is large for a 128-wide model: keep the update a nudge
            for param_name, param in peft_model.named_parameters():
                if "lora_B" in param_name:
                    param.mul_(0.05)
        peft_model.save_pretrained(root / name)
    return root


def glm_with_prefix_greedy(tiny_checkpoint, kv: torch.Tensor, prompt: list[int], n: int) -> list[int]:
    """transformers' GLM fed the prefix as past KV [layers, 2, L, G, D], positions from 0, greedy."""
    from transformers import DynamicCache

    from tests.model.test_chatglm2 import glm_oracle

    glm = glm_oracle(tiny_checkpoint)
    length = kv.shape[2]
    cache = DynamicCache()
    for layer in range(kv.shape[0]):
        cache.update(kv[layer, 0].transpose(0, 1)[None].float(), kv[layer, 1].transpose(0, 1)[None].float(), layer)
    ids, out = list(prompt), []
    with torch.no_grad():
        feed = torch.tensor([ids])
        for step in range(n):
            start = len(ids) - feed.shape[1]
            logits = glm(input_ids=feed, past_key_values=cache, use_cache=True,
                         position_ids=torch.arange(start, len(ids))[None],
                         attention_mask=torch.ones(1, length + len(ids), dtype=torch.long)).logits
            token = int(logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
            feed = torch.tensor([[token]])
    return out


def merged_greedy(tiny_checkpoint, adapter_path, prompt: list[int], n: int) -> list[int]:
    """peft's merged weights (merge_and_unload), run on the whole sequence without a cache, greedy."""
    from peft import PeftModel

    model = load_model(tiny_checkpoint, "fp32", "cpu", pack_cpu_linears=False).model
    merged = PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
    ids = list(prompt)
    for _ in range(n):
        logits = merged(torch.tensor([ids]), torch.arange(len(ids))[None], last_only=True)
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def base_greedy(base, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(base.model(torch.tensor([ids]), torch.arange(len(ids))[None], last_only=True)[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def engine(base, adapters_dir):
    engine = Engine(base, EngineConfig(max_batch_size=8, block_size=16, max_seq_len=512, max_adapters=4,
                                       max_lora_rank=8, prefill_chunk=64))
    for name in ("pt", "pt-proj", "lora-attn", "lora-all"):
        engine.add_adapter(name, read_adapter(adapters_dir / name, base.config))
    yield engine
    asyncio.run(engine.shutdown())


@pytest.fixture(scope="module")
def references(tiny_checkpoint, adapters_dir, base):
    config = read_config(tiny_checkpoint)
    out = {}
    for prompt_index, prompt in enumerate(PROMPTS):
        for name in ("pt", "pt-proj"):
            kv = read_adapter(adapters_dir / name, config).kv
            out[name, prompt_index] = glm_with_prefix_greedy(tiny_checkpoint, kv, prompt, NEW)
        for name in ("lora-attn", "lora-all"):
            out[name, prompt_index] = merged_greedy(tiny_checkpoint, adapters_dir / name, prompt, NEW)
        out[None, prompt_index] = base_greedy(base, prompt, NEW)
    return out


@pytest.mark.parametrize("name", ["pt", "pt-proj", "lora-attn", "lora-all"])
def test_each_adapter_alone_gives_the_reference_ids(engine, references, name):
    for index, prompt in enumerate(PROMPTS):
        assert run_all(engine, [(prompt, name)])[0] == references[name, index], (name, index)
    # The adapter changes the output (the check above is not the base model's ids by chance).
    assert any(references[name, i] != references[None, i] for i in range(len(PROMPTS)))


def test_a_batch_mixing_adapters_and_the_base_gives_each_row_its_own(engine, references):
    jobs = [(prompt, name) for name in (None, "pt", "pt-proj", "lora-attn", "lora-all")
            for prompt in PROMPTS[:2]]
    got = run_all(engine, jobs)
    for (prompt, name), ids in zip(jobs, got):
        assert ids == references[name, PROMPTS.index(prompt)], name


def test_prefix_blocks_are_shared_and_cached_per_adapter(engine):
    """A prompt's blocks are found again under the adapter that computed them, never under another or the base."""
    prompt = [1001, 1003] + list(range(400, 450))  # 52 tokens: 3 full blocks of 16, seen by no other test
    hits = engine.pool.hits
    first = run_all(engine, [(prompt, "pt")])[0]
    assert engine.pool.hits == hits  # nothing cached yet for it (the prefix's own blocks are shared, not hits)
    assert run_all(engine, [(prompt, "pt")])[0] == first
    assert engine.pool.hits > hits  # its own earlier blocks
    # The base model first: then each LoRA adapter meets the same tokens at the same positions, cached under another
    # salt, and must find none of them.
    for other in (None, "lora-attn", "lora-all"):
        hits = engine.pool.hits
        run_all(engine, [(prompt, other)])
        assert engine.pool.hits == hits, other
    assert engine.stats().adapters == {"pt": "ptuning", "pt-proj": "ptuning", "lora-attn": "lora", "lora-all": "lora"}


def test_base_output_is_unchanged_by_adapters_loaded_beside_it(engine, references):
    assert run_all(engine, [(p, None) for p in PROMPTS]) == [references[None, i] for i in range(len(PROMPTS))]


def test_unknown_adapter_is_refused_and_nothing_else_breaks(engine, references):
    with pytest.raises(InvalidRequest, match="not loaded"):
        engine.generate(PROMPTS[0], greedy(), adapter="nope")
    assert run_all(engine, [(PROMPTS[0], "pt")])[0] == references["pt", 0]


def test_unload_waits_for_running_requests_then_frees_the_blocks(base, adapters_dir, references):
    engine = Engine(base, EngineConfig(max_batch_size=4, block_size=16, max_seq_len=256, max_adapters=2,
                                       max_lora_rank=8))
    try:
        free = engine.pool.available
        engine.add_adapter("pt", read_adapter(adapters_dir / "pt", base.config))
        assert engine.pool.available == free - 2  # 24 positions in blocks of 16

        async def main():
            stream = engine.generate(PROMPTS[0], greedy(), adapter="pt")
            first = await stream.__anext__()
            engine.remove_adapter("pt")  # in use: kept for this one, gone from the list
            assert engine.adapters() == {}
            rest = [t async for d in stream for t in d.token_ids]
            return first.token_ids + rest

        assert asyncio.run(main()) == references["pt", 0]
        assert engine.pool.available == free and engine.adapters() == {}
        # Loading two LoRA adapters fills the slots; a third is refused by name.
        engine.add_adapter("a", read_adapter(adapters_dir / "lora-attn", base.config))
        engine.add_adapter("b", read_adapter(adapters_dir / "lora-all", base.config))
        with pytest.raises(AdapterError, match="max_adapters=2"):
            engine.add_adapter("c", read_adapter(adapters_dir / "pt", base.config))
        engine.remove_adapter("a")
        engine.add_adapter("c", read_adapter(adapters_dir / "lora-attn", base.config))  # reuses the freed slot
        assert run_all(engine, [(PROMPTS[1], "c")])[0] == references["lora-attn", 1]
    finally:
        asyncio.run(engine.shutdown())


def test_bad_adapters_fail_clearly(tmp_path, tiny_checkpoint, adapters_dir):
    import shutil

    config = read_config(tiny_checkpoint)
    raw = json.loads((tiny_checkpoint / "config.json").read_text())
    with pytest.raises(AdapterError, match="neither"):
        read_adapter(tmp_path, config)
    write_ptuning(tmp_path / "layers", config, dict(raw, num_layers=3), pre_seq_len=4)
    with pytest.raises(AdapterError, match="num_layers=3"):
        read_adapter(tmp_path / "layers", config)
    bad = tmp_path / "shape"
    write_ptuning(bad, config, raw, pre_seq_len=4)
    (bad / "config.json").write_text(json.dumps(dict(raw, pre_seq_len=5)))
    with pytest.raises(AdapterError, match="shape"):
        read_adapter(bad, config)
    truncated = tmp_path / "truncated"
    shutil.copytree(adapters_dir / "lora-attn", truncated)
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="cannot be read"):
        read_adapter(truncated, config)
    dora = tmp_path / "dora"
    shutil.copytree(adapters_dir / "lora-attn", dora)
    settings = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(dict(settings, use_dora=True)))
    with pytest.raises(AdapterError, match="use_dora"):
        read_adapter(dora, config)
    small = read_config(tiny_checkpoint)
    from dataclasses import replace

    with pytest.raises(AdapterError, match="lora_A"):
        read_adapter(adapters_dir / "lora-attn", replace(small, hidden_size=64))


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_lora_over_quantized_base_layers(tiny_checkpoint, adapters_dir, precision):
    """Over int8/int4 weight-only layers LoRA adds its update per row: a batch mixing it with the base model gives
    each row what it gives alone, and its rows differ from the base's."""
    quantized = load_model(tiny_checkpoint, precision, "cpu")
    engine = Engine(quantized, EngineConfig(max_batch_size=4, block_size=16, max_seq_len=256, max_adapters=1,
                                            max_lora_rank=8))
    try:
        engine.add_adapter("all", read_adapter(adapters_dir / "lora-all", quantized.config))
        alone = [run_all(engine, [(PROMPTS[0], name)])[0] for name in (None, "all")]
        assert run_all(engine, [(PROMPTS[0], None), (PROMPTS[0], "all")]) == alone
        assert alone[0] != alone[1]
    finally:
        asyncio.run(engine.shutdown())
