"""`load_model`: an official checkpoint directory -> a ready ChatGLM2ForCausalLM at the asked precision and device.

The module is built on the meta device and checkpoint tensors are assigned one at a time, each by the rule its name
maps to (`install_rules`): the four block linears are quantized on the fly for int8/int4 (or the official pre-quantized
tensors taken as they are), so the weights are never held twice. On a GPU each tensor is moved first and quantized
there, one layer at a time (no fp16 copy of the model is ever held), and the allocator's cache is emptied once loading
is done, so what the process holds afterwards is the weights.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from serve_app.model import compute, quant
from serve_app.model.chatglm2 import ChatGLM2ForCausalLM
from serve_app.model.checkpoint import (
    ChatGLM2Config,
    CheckpointError,
    expected_shapes,
    is_quantized_weight,
    iter_tensors,
    read_config,
)
from serve_app.model.cpu_linear import pack_linears

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8", "int4")
DEVICES = ("auto", "cpu", "cuda")  # the config's choices (resolve_device also takes "cuda:N")
_FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Quantized layers multiply in bf16 on CPU whatever the model's dtype: PyTorch's weight-only kernels are SIMD there only
# for bf16 activations (7-15x faster than fp32). The rounding this adds is far below the quantization error; norms,
# attention and the residual stream keep the model's dtype. On GPU they compute in the model's dtype (fp16, as the
# official code does), except PyTorch's tinygemm int4 kernel (kernel "native"), which takes bf16 only.
CPU_KERNEL_DTYPE = torch.bfloat16


@dataclass
class LoadedModel:
    model: ChatGLM2ForCausalLM
    config: ChatGLM2Config
    checkpoint: Path
    precision: str  # resolved: fp32 | bf16 | fp16 | int8 | int4
    dtype: torch.dtype  # activation dtype
    device: torch.device
    kernels: dict[str, int] = field(default_factory=dict)  # quantized layers per kernel name; empty when not quantized
    dense_kernels: dict[str, int] = field(default_factory=dict)  # unquantized linears per path (cpu_linear.pack_linears)

    def weight_bytes(self) -> int:
        """Bytes held by parameters and buffers (quantized weights at their packed size)."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    def memory_bytes(self) -> dict[str, int]:
        """What this process holds now: weights, plus the CUDA allocator's figures on a GPU or the RSS on CPU."""
        held = {"weights": self.weight_bytes()}
        if self.device.type == "cuda":
            held |= {
                "allocated": torch.cuda.memory_allocated(self.device),
                "reserved": torch.cuda.memory_reserved(self.device),
                "peak_allocated": torch.cuda.max_memory_allocated(self.device),
                "peak_reserved": torch.cuda.max_memory_reserved(self.device),
            }
        else:
            held["resident"] = _resident_bytes()
        return held


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * 4096
    except OSError:  # not Linux
        return 0


def trim_allocator(device: torch.device) -> None:
    """Give back what loading freed: the CUDA cache, or glibc's free lists on CPU (quantizing leaves ~GBs there)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA device is available")
    return torch.device(device)


def resolve_precision(precision: str, config: ChatGLM2Config, device: torch.device) -> tuple[str, torch.dtype]:
    """(weights precision, activation dtype). `auto` never picks half precision on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    stored_bits = config.quantization_bit
    if precision == "auto":
        precision = {4: "int4", 8: "int8"}.get(stored_bits, "fp16" if device.type == "cuda" else "fp32")
    if stored_bits and precision != f"int{stored_bits}":
        raise CheckpointError(
            f"this checkpoint is pre-quantized to int{stored_bits}; it can only be served as int{stored_bits} "
            f"(asked for {precision}); point the pool at the full-precision checkpoint instead"
        )
    if precision in _FLOAT_DTYPES:
        return precision, _FLOAT_DTYPES[precision]
    # Quantized layers compute in fp16 on GPU and fp32 on CPU, where half matmuls are slow or missing.
    return precision, torch.float16 if device.type == "cuda" else torch.float32


# How build_model installs a checkpoint tensor: the rule its name maps to in `install_rules`, the method of
# _Installer of that name.
RULES = (
    "skip",  # derivable from the config: the rotary inv_freq (a checkpoint may leave it out)
    "dense",  # a parameter in the model's dtype: norms, and every weight and bias of an unquantized model
    "side",  # the embedding and the output layer of a quantized model: fp16, as officially
    "quantize",  # a block linear's weight quantized on the fly into a QuantizedLinear
    "bias",  # a quantized block linear's bias: onto its QuantizedLinear, or held for it until its weight comes
    "packed",  # a pre-quantized block linear's official weight (int8; int4 packed two per byte) ...
    "scale",  # ... and its fp16 scale [out]: the layer is installed once both have come
)


def install_rules(config: ChatGLM2Config, bits: int) -> dict[str, str]:
    """Checkpoint tensor name -> its rule (RULES) for a model of `config` loaded at `bits` (0: not quantized; a
    pre-quantized checkpoint is loaded at its own): every tensor the checkpoint holds, in the official order."""
    rules: dict[str, str] = {}
    for name in expected_shapes(config):
        if name == "transformer.rotary_pos_emb.inv_freq":
            rules[name] = "skip"
        elif is_quantized_weight(name) and config.quantization_bit:
            rules[name], rules[f"{name}_scale"] = "packed", "scale"
        elif is_quantized_weight(name) and bits:
            rules[name] = "quantize"
        elif bits and name.startswith(("transformer.embedding.", "transformer.output_layer.")):
            rules[name] = "side"
        elif bits and name.endswith(".bias") and is_quantized_weight(name.removesuffix("bias") + "weight"):
            rules[name] = "bias"
        else:
            rules[name] = "dense"
    return rules


class _Installer:
    """Puts checkpoint tensors into a model built on the meta device, one at a time, by the rule of each name."""

    def __init__(self, model: nn.Module, config: ChatGLM2Config, device: torch.device, dtype: torch.dtype, bits: int,
                 kernel_dtype: torch.dtype, quant_kernel: str, allow_kernel_fallback: bool):
        self.model, self.device, self.dtype, self.bits = model, device, dtype, bits
        self.kernel_dtype, self.quant_kernel, self.allow_fallback = kernel_dtype, quant_kernel, allow_kernel_fallback
        self.shapes = expected_shapes(config)
        self.pending: dict[str, dict[str, torch.Tensor]] = {}  # pre-quantized layer -> its weight or its scale

    def skip(self, name: str, tensor: torch.Tensor) -> None:
        """Nothing to install: the model derives it from the config."""

    def dense(self, name: str, tensor: torch.Tensor) -> None:
        self._set(name, self._checked(name, tensor), self.dtype)

    def side(self, name: str, tensor: torch.Tensor) -> None:
        # fp16 also on CPU: the output layer is a memory-bound GEMV there, as fast in fp16 as in fp32, and fp32 copies
        # would cost 2 GB more for the 6B model.
        self._set(name, self._checked(name, tensor), torch.float16)

    def quantize(self, name: str, tensor: torch.Tensor) -> None:
        # On the target device: a GPU quantizes a layer in milliseconds and only ever holds this one fp16 tensor; on
        # CPU this is a no-op move.
        weight = self._checked(name, tensor).to(device=self.device, dtype=torch.float16)  # [out, in]
        q, scale = quant.quantize_rows(weight, self.bits)  # int8 [out, in], fp16 [out]
        self._install_quantized(name.rpartition(".")[0], quant.pack_int4(q) if self.bits == 4 else q, scale)

    def bias(self, name: str, tensor: torch.Tensor) -> None:
        module = self.model.get_submodule(name.rpartition(".")[0])
        if isinstance(module, quant.QuantizedLinear):  # it arrived after its weight
            module.bias = self._checked(name, tensor).to(device=self.device, dtype=self.dtype, copy=True)
        else:
            self.dense(name, tensor)

    def packed(self, name: str, tensor: torch.Tensor) -> None:
        out_features, in_features = self.shapes[name]
        packed_in = in_features // 2 if self.bits == 4 else in_features
        if tuple(tensor.shape) != (out_features, packed_in) or tensor.dtype != torch.int8:
            raise CheckpointError(
                f"{name}: expected int8 {[out_features, packed_in]} for quantization_bit="
                f"{self.bits}, found {tensor.dtype} {list(tensor.shape)}"
            )
        self._pend(name.rpartition(".")[0], "weight", tensor)

    def scale(self, name: str, tensor: torch.Tensor) -> None:
        self._pend(name.rpartition(".")[0], "scale", tensor)

    def _checked(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if tuple(tensor.shape) != self.shapes[name]:
            raise CheckpointError(
                f"{name}: shape {list(tensor.shape)} disagrees with config.json (expected {list(self.shapes[name])})"
            )
        return tensor

    def _set(self, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
        module_name, _, attr = name.rpartition(".")
        module = self.model.get_submodule(module_name)
        # copy=True: never keep a view of the memory-mapped shard (the file may change later).
        tensor = tensor.to(device=self.device, dtype=dtype, copy=True)
        if isinstance(getattr(module, attr), nn.Parameter):
            setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
        else:
            setattr(module, attr, tensor)

    def _pend(self, layer: str, part: str, tensor: torch.Tensor) -> None:
        pending = self.pending.setdefault(layer, {})
        pending[part] = tensor
        if len(pending) == 2:
            del self.pending[layer]
            self._install_quantized(layer, pending["weight"], pending["scale"])

    def _install_quantized(self, layer: str, stored: torch.Tensor, scale: torch.Tensor) -> None:
        parent_name, _, child = layer.rpartition(".")
        old = self.model.get_submodule(layer)
        bias = old.bias if getattr(old, "bias", None) is not None and old.bias.device.type != "meta" else None
        new = quant.QuantizedLinear.from_official(
            stored, scale, self.bits, dtype=self.kernel_dtype, device=self.device, bias=bias,
            kernel=self.quant_kernel, allow_fallback=self.allow_fallback,
        )
        setattr(self.model.get_submodule(parent_name), child, new)


def load_model(
    checkpoint: Path | str,
    precision: str = "auto",
    device: str = "auto",
    *,
    quant_kernel: str = "auto",
    allow_kernel_fallback: bool = False,
    pack_cpu_linears: bool = True,
) -> LoadedModel:
    """Build ChatGLM2 from an official checkpoint directory without holding two copies of its weights.

    quant_kernel (one of quant.QUANT_KERNELS) picks the quantized layers' kernel (serve_app.model.quant); a
    layer whose kernel cannot run or fails its load-time check raises quant.KernelUnavailable unless
    allow_kernel_fallback. On CPU the other linears get oneDNN's packed GEMM (serve_app.model.cpu_linear) unless
    pack_cpu_linears is False. Raises CheckpointError for a missing file, a wrong model_type, a missing or unexpected
    tensor, or a shape that disagrees with config.json.
    """
    checkpoint = Path(checkpoint)
    config = read_config(checkpoint)
    return build_model(config, iter_tensors(checkpoint), checkpoint, precision, device, quant_kernel=quant_kernel,
                       allow_kernel_fallback=allow_kernel_fallback, pack_cpu_linears=pack_cpu_linears)


@compute.confined  # see serve_app.model.compute: the thread that loads is the thread that computes
def build_model(
    config: ChatGLM2Config,
    tensors: Iterable[tuple[str, torch.Tensor]],
    source: Path,
    precision: str = "auto",
    device: str = "auto",
    *,
    quant_kernel: str = "auto",
    allow_kernel_fallback: bool = False,
    pack_cpu_linears: bool = True,
) -> LoadedModel:
    """The model of `config` from (name, tensor) pairs in checkpoint order (a checkpoint's, or random ones), installed
    one at a time on `device` at `precision`, each by the rule its name maps to (install_rules); `source` names where
    they came from in errors and in the result."""
    checkpoint = source
    torch_device = resolve_device(device)
    precision, dtype = resolve_precision(precision, config, torch_device)
    bits = {"int8": 8, "int4": 4}.get(precision, 0)
    if torch_device.type == "cpu":
        kernel_dtype = CPU_KERNEL_DTYPE
    else:
        kernel_dtype = torch.bfloat16 if quant_kernel == "native" and bits == 4 else dtype

    with torch.device("meta"):
        model = ChatGLM2ForCausalLM(config)
    rules = install_rules(config, bits)
    installer = _Installer(model, config, torch_device, dtype, bits, kernel_dtype, quant_kernel, allow_kernel_fallback)
    seen: set[str] = set()
    for name, tensor in tensors:
        if name not in rules:
            raise CheckpointError(f"unexpected tensor {name!r} in {checkpoint}: is this a ChatGLM2 checkpoint?")
        getattr(installer, rules[name])(name, tensor)
        seen.add(name)
    missing = [name for name, rule in rules.items() if name not in seen and rule != "skip"]
    if missing:
        more = " ..." if len(missing) > 5 else ""
        raise CheckpointError(f"{checkpoint} lacks tensor(s): {', '.join(missing[:5])}{more}")
    model.eval()
    dense = pack_linears(model) if torch_device.type == "cpu" and pack_cpu_linears else {}
    trim_allocator(torch_device)
    kernels = Counter(m.kernel_name for m in model.modules() if isinstance(m, quant.QuantizedLinear))
    return LoadedModel(model, config, checkpoint, precision, dtype, torch_device, dict(sorted(kernels.items())),
                       {path: n for path, n in dense.items() if n})
