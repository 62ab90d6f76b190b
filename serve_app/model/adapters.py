"""Fine-tuned variants of a base ChatGLM2 read from their own files: P-tuning v2 prefixes and peft LoRA adapters.

Which kind a directory holds is read from its files (docs: ../shared/reference/chatglm2.md, section 8):

- P-tuning v2, as the official `ptuning/` code saves it: `config.json` (the base config plus `pre_seq_len` and
  `prefix_projection`) and `pytorch_model.bin` with only `transformer.prefix_encoder.*`. The prefix encoder is
  evaluated here, once, in fp32 (the official deployment keeps it in fp32), giving the prefix's keys and values for
  every layer: `PrefixAdapter.kv` [num_layers, 2, pre_seq_len, kv_heads, kv_channels]. Layer i's keys are the
  encoder's columns 2i, its values 2i+1; the keys are used as they are (not rotated), as the original code uses them
  as past keys.
- LoRA, as peft saves it: `adapter_config.json` (`peft_type: LORA`) and `adapter_model.safetensors` (or `.bin`) with
  `lora_A` [r, in] and `lora_B` [out, r] per target module. The scale `lora_alpha / r` (`/ sqrt(r)` with rslora, both
  per module through `rank_pattern` / `alpha_pattern`) is folded into B here, so the layer adds `B (A x)`.

Weights are read as tensors only (`torch.load(weights_only=True)`, safetensors), never as code. Everything that does
not match the base model (a layer count, a shape, a module ChatGLM2 has no LoRA slot for, a peft option this server
does not implement) raises `AdapterError` naming the adapter and the reason.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from serve_app.model.checkpoint import ChatGLM2Config

PREFIX_KEYS = ("transformer.prefix_encoder.embedding.weight",)
PROJECTION_KEYS = ("transformer.prefix_encoder.trans.0.weight", "transformer.prefix_encoder.trans.0.bias",
                   "transformer.prefix_encoder.trans.2.weight", "transformer.prefix_encoder.trans.2.bias")
# The modules LoRA can target, by the name peft's `target_modules` matches (a module whose name ends with it).
LORA_MODULES = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?transformer\.encoder\.layers\.(\d+)\.("
                       + "|".join(re.escape(m) for m in LORA_MODULES) + r")\.lora_([AB])(?:\.[\w-]+)?\.weight$")
# peft options that change what the adapter computes and that this server does not implement: option -> the value
# that leaves it off.
_UNSUPPORTED_LORA = {"fan_in_fan_out": False, "use_dora": False, "bias": "none", "modules_to_save": None,
                     "lora_bias": False, "layer_replication": None, "target_parameters": None,
                     "trainable_token_indices": None, "alora_invocation_tokens": None}


def lora_shapes(config: ChatGLM2Config) -> dict[str, tuple[int, int]]:
    """(in, out) features of each module of LORA_MODULES on a model of `config`."""
    return {"self_attention.query_key_value": (config.hidden_size, config.qkv_rows),
            "self_attention.dense": (config.num_attention_heads * config.kv_channels, config.hidden_size),
            "mlp.dense_h_to_4h": (config.hidden_size, 2 * config.ffn_hidden_size),
            "mlp.dense_4h_to_h": (config.ffn_hidden_size, config.hidden_size)}


class AdapterError(ValueError):
    """An adapter that cannot be served on this base model (unreadable, of an unknown kind, or mismatched)."""


@dataclass
class PrefixAdapter:
    """A P-tuning v2 prefix: its KV for every layer, computed once."""

    path: Path
    kv: torch.Tensor  # [num_layers, 2, pre_seq_len, kv_heads, kv_channels], fp32
    digest: bytes  # of the weights: sequences of the same prefix share KV blocks
    prefix_projection: bool = False
    kind: str = "ptuning"

    @property
    def pre_seq_len(self) -> int:
        return self.kv.shape[2]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


@dataclass
class LoRAAdapter:
    """LoRA weights per (layer, module): (A [r, in], B [out, r] with the scale folded in), fp32."""

    path: Path
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    digest: bytes
    kind: str = "lora"
    modules: tuple[str, ...] = field(default=())

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.weights.values())

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


Adapter = PrefixAdapter | LoRAAdapter


def read_adapter(path: Path | str, config: ChatGLM2Config) -> Adapter:
    """The adapter in directory `path` for a base model of `config` (see the module docstring)."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter {path}: not a directory")
    try:
        if (path / "adapter_config.json").is_file():
            return _read_lora(path, config)
        if (path / "config.json").is_file():
            return _read_ptuning(path, config)
    except AdapterError:
        raise
    except Exception as exc:  # a truncated file, bad JSON, a pickle that is not plain tensors
        raise AdapterError(f"adapter {path}: cannot be read ({type(exc).__name__}: {exc})") from exc
    raise AdapterError(f"adapter {path}: neither a P-tuning v2 checkpoint (config.json with pre_seq_len) nor a peft "
                       "adapter (adapter_config.json)")


def _digest(kind: str, tensors: dict[str, torch.Tensor]) -> bytes:
    digest = hashlib.blake2b(kind.encode(), digest_size=16)
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.digest()


def _read_ptuning(path: Path, config: ChatGLM2Config) -> PrefixAdapter:
    raw = json.loads((path / "config.json").read_text())
    pre_seq_len = raw.get("pre_seq_len")
    if not isinstance(pre_seq_len, int) or pre_seq_len < 1:
        raise AdapterError(f"adapter {path}: config.json has no pre_seq_len, so it is not a P-tuning v2 checkpoint")
    for name in ("num_layers", "kv_channels", "multi_query_group_num", "hidden_size"):
        if name in raw and raw[name] != getattr(config, name):
            raise AdapterError(f"adapter {path}: its {name}={raw[name]} does not match the base model's "
                               f"{getattr(config, name)}")
    weights = path / "pytorch_model.bin"
    if not weights.is_file():
        raise AdapterError(f"adapter {path}: pytorch_model.bin is missing")
    state = {k: v.float() for k, v in torch.load(weights, map_location="cpu", weights_only=True).items()}
    projection = bool(raw.get("prefix_projection", False))
    expected = PREFIX_KEYS + (PROJECTION_KEYS if projection else ())
    if missing := [k for k in expected if k not in state]:
        raise AdapterError(f"adapter {path}: pytorch_model.bin lacks {', '.join(missing)}")
    if extra := sorted(set(state) - set(expected)):
        raise AdapterError(f"adapter {path}: unexpected tensor(s) {', '.join(extra[:3])} (a P-tuning v2 checkpoint "
                           "holds only transformer.prefix_encoder.*)")
    width = config.num_layers * 2 * config.kv_heads * config.kv_channels
    embedding = state[PREFIX_KEYS[0]]
    if projection:
        # The official PrefixEncoder with projection: Embedding(pre_seq_len, width), Linear(width, hidden), Tanh,
        # Linear(hidden, width).
        shapes = {PREFIX_KEYS[0]: (pre_seq_len, width),
                  PROJECTION_KEYS[0]: (config.hidden_size, width), PROJECTION_KEYS[1]: (config.hidden_size,),
                  PROJECTION_KEYS[2]: (width, config.hidden_size), PROJECTION_KEYS[3]: (width,)}
    else:
        shapes = {PREFIX_KEYS[0]: (pre_seq_len, width)}
    for name, shape in shapes.items():
        if tuple(state[name].shape) != shape:
            raise AdapterError(f"adapter {path}: {name} has shape {tuple(state[name].shape)}, expected {shape} for "
                               f"pre_seq_len={pre_seq_len} on this base model")
    with torch.no_grad():
        if projection:  # trans.0 (Linear), Tanh, trans.2 (Linear), in fp32
            hidden = torch.tanh(embedding @ state[PROJECTION_KEYS[0]].T + state[PROJECTION_KEYS[1]])
            out = hidden @ state[PROJECTION_KEYS[2]].T + state[PROJECTION_KEYS[3]]
        else:
            out = embedding
    kv = out.view(pre_seq_len, config.num_layers, 2, config.kv_heads, config.kv_channels).permute(1, 2, 0, 3, 4)
    return PrefixAdapter(path, kv.contiguous(), _digest("ptuning", state), projection)


def _pattern_value(patterns: dict, module_name: str, default):
    """peft's rank_pattern / alpha_pattern: the value of the first key that matches the end of the module's name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _read_lora(path: Path, config: ChatGLM2Config) -> LoRAAdapter:
    raw = json.loads((path / "adapter_config.json").read_text())
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"adapter {path}: peft_type {raw.get('peft_type')!r} is not served (only LORA)")
    for option, off in _UNSUPPORTED_LORA.items():
        if raw.get(option, off) not in (off, [], {}):
            raise AdapterError(f"adapter {path}: {option}={raw[option]!r} is not supported")
    if (path / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(path / "adapter_model.safetensors")
    elif (path / "adapter_model.bin").is_file():
        state = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise AdapterError(f"adapter {path}: adapter_model.safetensors (or .bin) is missing")
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise AdapterError(f"adapter {path}: tensor {key!r} is not a LoRA weight of a ChatGLM2 module this "
                               f"server applies LoRA to ({', '.join(m.rsplit('.', 1)[1] for m in LORA_MODULES)})")
        layer, module, part = int(match[1]), match[2], match[3]
        if layer >= config.num_layers:
            raise AdapterError(f"adapter {path}: {key} is for layer {layer}; the base model has {config.num_layers}")
        pairs.setdefault((layer, module), {})[part] = tensor.float()
    if not pairs:
        raise AdapterError(f"adapter {path}: no LoRA weights in it")
    sizes = lora_shapes(config)
    weights = {}
    for (layer, module), parts in sorted(pairs.items()):
        name = f"transformer.encoder.layers.{layer}.{module}"
        if set(parts) != {"A", "B"}:
            raise AdapterError(f"adapter {path}: {name} has lora_{''.join(parts)} without its pair")
        a, b = parts["A"], parts["B"]
        fan_in, fan_out = sizes[module]
        r = a.shape[0]
        if a.shape != (r, fan_in) or b.shape != (fan_out, r):
            raise AdapterError(f"adapter {path}: {name} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                               f"this base model needs [r, {fan_in}] and [{fan_out}, r]")
        declared = _pattern_value(raw.get("rank_pattern"), name, raw.get("r"))
        if declared is not None and declared != r:
            raise AdapterError(f"adapter {path}: {name} has rank {r}, its adapter_config.json says {declared}")
        alpha = _pattern_value(raw.get("alpha_pattern"), name, raw.get("lora_alpha", 8))
        scale = alpha / math.sqrt(r) if raw.get("use_rslora") else alpha / r
        weights[(layer, module)] = (a.contiguous(), (b * scale).contiguous())
    return LoRAAdapter(path, weights, _digest("lora", state), modules=tuple(sorted({m for _, m in weights})))


# ---- writing adapters (the CPU demo's; tests write LoRA with peft itself) ------------------------------------------

DEMO_ADAPTERS = ("ptuning", "ptuning-projection", "lora", "lora-all")


def write_demo_adapter(path: Path | str, kind: str, checkpoint: Path | str) -> Path:
    """A random adapter of `kind` (DEMO_ADAPTERS) for the checkpoint in `checkpoint`, written aside and renamed into
    place (replicas that start together may race; the first wins). Nothing is written when `path` exists."""
    import shutil
    import uuid

    from serve_app.model.checkpoint import read_config

    path = Path(path)
    if path.exists():
        return path
    config = read_config(checkpoint)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    seed = int.from_bytes(hashlib.blake2b(path.name.encode(), digest_size=4).digest(), "little")
    if kind.startswith("ptuning"):
        raw = json.loads((Path(checkpoint) / "config.json").read_text())
        write_ptuning(tmp, config, raw, pre_seq_len=32, prefix_projection=kind == "ptuning-projection", seed=seed)
    else:
        modules = ("query_key_value", "dense") + (("dense_h_to_4h", "dense_4h_to_h") if kind == "lora-all" else ())
        write_lora(tmp, config, modules, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_ptuning(path: Path | str, config: ChatGLM2Config, base_config_json: dict, pre_seq_len: int = 16,
                  prefix_projection: bool = False, seed: int = 0, scale: float = 1.0) -> Path:
    """A random P-tuning v2 checkpoint in the official layout (config.json + pytorch_model.bin of the prefix encoder)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    width = config.num_layers * 2 * config.kv_heads * config.kv_channels
    hidden = config.hidden_size

    def rand(*shape):
        return (torch.randn(*shape, generator=generator) * scale).float()

    if prefix_projection:
        state = {PREFIX_KEYS[0]: rand(pre_seq_len, width),
                 PROJECTION_KEYS[0]: rand(hidden, width) / math.sqrt(width), PROJECTION_KEYS[1]: rand(hidden) * 0.1,
                 PROJECTION_KEYS[2]: rand(width, hidden) / math.sqrt(hidden), PROJECTION_KEYS[3]: rand(width) * 0.1}
    else:
        state = {PREFIX_KEYS[0]: rand(pre_seq_len, width)}
    torch.save(state, path / "pytorch_model.bin")
    raw = dict(base_config_json, pre_seq_len=pre_seq_len, prefix_projection=prefix_projection)
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    return path


def write_lora(path: Path | str, config: ChatGLM2Config, modules: tuple[str, ...] = ("query_key_value",),
               r: int = 8, alpha: int = 16, seed: int = 0, scale: float = 0.05) -> Path:
    """A random LoRA adapter in peft's layout (adapter_config.json + adapter_model.safetensors), B nonzero."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    sizes = lora_shapes(config)
    full = {m.rsplit(".", 1)[1]: m for m in LORA_MODULES}
    state = {}
    for layer in range(config.num_layers):
        for module in modules:
            fan_in, fan_out = sizes[full[module]]
            key = f"base_model.model.transformer.encoder.layers.{layer}.{full[module]}"
            state[f"{key}.lora_A.weight"] = torch.randn(r, fan_in, generator=generator) / math.sqrt(fan_in)
            state[f"{key}.lora_B.weight"] = torch.randn(fan_out, r, generator=generator) * scale
    save_file(state, path / "adapter_model.safetensors")
    raw = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
           "target_modules": list(modules), "fan_in_fan_out": False, "bias": "none", "use_rslora": False,
           "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None}
    (path / "adapter_config.json").write_text(json.dumps(raw, indent=2))
    return path
