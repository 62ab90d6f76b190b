"""`load_model`: an official checkpoint directory -> a ready ChatGLM2ForCausalLM at the asked precision and device.

The module is built on the meta device and checkpoint tensors are assigned one at a time, quantizing the four block
linears on the fly for int8/int4 (or taking the official pre-quantized tensors as they are), so the weights are never
held twice. On a GPU each tensor is moved first and quantized there, one layer at a time (no fp16 copy of the model
is ever held), and the allocator's cache is emptied once loading is done, so what the process holds afterwards is
the weights.
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


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, attr)
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
    else:
        setattr(module, attr, tensor)


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

    quant_kernel (auto | triton | native | dequant) picks the quantized layers' kernel (serve_app.model.quant); a
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
    one at a time on `device` at `precision`; `source` names where they came from in errors and in the result."""
    checkpoint = source
    torch_device = resolve_device(device)
    precision, dtype = resolve_precision(precision, config, torch_device)
    bits = {"int8": 8, "int4": 4}.get(precision, 0)
    # Embedding and output layer stay fp16 in quantized models, as officially (also on CPU: the output layer is a
    # memory-bound GEMV there, as fast in fp16 as in fp32, and fp32 copies would cost 2 GB more for the 6B model).
    side_dtype = torch.float16 if bits else dtype
    if torch_device.type == "cpu":
        kernel_dtype = CPU_KERNEL_DTYPE
    else:
        kernel_dtype = torch.bfloat16 if quant_kernel == "native" and bits == 4 else dtype

    with torch.device("meta"):
        model = ChatGLM2ForCausalLM(config)
    shapes = expected_shapes(config)
    pending_quantized: dict[str, dict[str, torch.Tensor]] = {}
    seen: set[str] = set()

    def install_quantized(layer: str, stored: torch.Tensor, scale: torch.Tensor) -> None:
        parent_name, _, child = layer.rpartition(".")
        old = model.get_submodule(layer)
        bias = old.bias if getattr(old, "bias", None) is not None and old.bias.device.type != "meta" else None
        new = quant.QuantizedLinear.from_official(
            stored, scale, bits, dtype=kernel_dtype, device=torch_device, bias=bias,
            kernel=quant_kernel, allow_fallback=allow_kernel_fallback,
        )
        setattr(model.get_submodule(parent_name), child, new)

    for name, tensor in tensors:
        if name.endswith("rotary_pos_emb.inv_freq"):
            continue  # derivable from the config
        layer = name.rpartition(".")[0]
        if config.quantization_bit and name.endswith(".weight_scale"):
            pending_quantized.setdefault(layer, {})["scale"] = tensor
            seen.add(name)
        elif name not in shapes:
            raise CheckpointError(f"unexpected tensor {name!r} in {checkpoint}: is this a ChatGLM2 checkpoint?")
        elif is_quantized_weight(name) and config.quantization_bit:
            out_features, in_features = shapes[name]
            packed_in = in_features // 2 if config.quantization_bit == 4 else in_features
            if tuple(tensor.shape) != (out_features, packed_in) or tensor.dtype != torch.int8:
                raise CheckpointError(
                    f"{name}: expected int8 {[out_features, packed_in]} for quantization_bit="
                    f"{config.quantization_bit}, found {tensor.dtype} {list(tensor.shape)}"
                )
            pending_quantized.setdefault(layer, {})["weight"] = tensor
        else:
            if tuple(tensor.shape) != shapes[name]:
                raise CheckpointError(
                    f"{name}: shape {list(tensor.shape)} disagrees with config.json (expected {list(shapes[name])})"
                )
            if is_quantized_weight(name) and bits:
                # On the target device: a GPU quantizes a layer in milliseconds and only ever holds this one fp16
                # tensor; on CPU this is a no-op move.
                weight = tensor.to(device=torch_device, dtype=torch.float16)  # [out, in]
                q, scale = quant.quantize_rows(weight, bits)  # int8 [out, in], fp16 [out]
                install_quantized(layer, quant.pack_int4(q) if bits == 4 else q, scale)
                del weight, q, scale
            else:
                target = side_dtype if name.startswith(("transformer.embedding", "transformer.output_layer")) else dtype
                module = model.get_submodule(layer)
                if isinstance(module, quant.QuantizedLinear):  # the qkv bias arrived after its weight
                    module.bias = tensor.to(device=torch_device, dtype=dtype)
                else:
                    # copy=True: never keep a view of the memory-mapped shard (the file may change later).
                    _set_tensor(model, name, tensor.to(device=torch_device, dtype=target, copy=True))
        seen.add(name)
        pending = pending_quantized.get(layer)
        if pending is not None and len(pending) == 2:
            install_quantized(layer, pending["weight"], pending["scale"])
            del pending_quantized[layer]

    missing = [name for name in shapes if name not in seen and not name.endswith("inv_freq")]
    if config.quantization_bit:
        missing += [f"{layer}.{'weight' if 'weight' not in parts else 'weight_scale'}" for layer, parts in pending_quantized.items()]
    if missing:
        raise CheckpointError(f"{checkpoint} lacks tensor(s): {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    model.eval()
    dense = pack_linears(model) if torch_device.type == "cpu" and pack_cpu_linears else {}
    trim_allocator(torch_device)
    kernels = Counter(m.kernel_name for m in model.modules() if isinstance(m, quant.QuantizedLinear))
    return LoadedModel(model, config, checkpoint, precision, dtype, torch_device, dict(sorted(kernels.items())),
                       {path: n for path, n in dense.items() if n})
