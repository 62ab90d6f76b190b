"""Dense linears on CPU through oneDNN, each weight reordered once at load into the blocked layout its GEMM reads.

This is what torch.compile's freezing pass does to linears on CPU (`mkldnn._reorder_linear_weight` +
`mkldnn._linear_pointwise`), without compiling anything. `F.linear` on the plain [out, in] weight goes to MKL's
sgemm, which is slow at the row counts a decode step has: on the 2-core dev box, the small preset's decode step at
batch 16 takes half the time packed, batch 1 up to a quarter less (docs/benchmarks.md, "CPU decode: packed linears and
one compute thread"). Results differ from MKL's in the last bits (fp32 sums in another order), as any other BLAS's
would.

fp32 linears are packed as they are, and bf16 ones where oneDNN has bf16 kernels for this CPU. fp16 linears (the
output layer of quantized models, fp16 as officially) have no fast CPU GEMM at all: `F.linear` in fp16 runs one GEMV
per row (6B output layer: 22 ms at 1 row, 144 ms at 8, 311 ms at 16), so where oneDNN has bf16 kernels they are
packed as bf16 (27, 32 and 42 ms; same bytes, 3 fewer mantissa bits: logits move by ~1e-2 where quantization moves
them far more) and otherwise left as they are, with a warning. Quantized layers are serve_app.model.quant's.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Row count the blocked layout is chosen for: a decode batch. Measured 1/16/128 on 1, 16 and 512 rows: 16 was best or
# within noise of best at each.
BATCH_HINT = 16


def packable(dtype: torch.dtype) -> bool:
    """Whether this build and CPU have a oneDNN GEMM for weights of `dtype`."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


class PackedLinear(nn.Module):
    """`nn.Linear` with its weight held as oneDNN's blocked copy (the plain weight is not kept)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.dtype:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
        # An fp16 linear packed as bf16: fp16 in, fp16 out, as the module it replaced.
        y = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed_weight, self.bias, "none", [], "")
        return y.to(x.dtype)

    def dense_weight(self) -> torch.Tensor:
        """The plain [out, in] weight, reordered back (for tests and inspection, not for compute)."""
        return self.packed_weight.to_dense()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}, packed=oneDNN"


def pack_linears(model: nn.Module) -> dict[str, int]:
    """Replace every CPU `nn.Linear` whose dtype oneDNN handles by a `PackedLinear`, in place.

    Returns the count of dense linears per path: "onednn-packed" (packed in their own dtype), "onednn-packed-bf16"
    (fp16 ones packed as bf16) and "aten" (left as they were), and warns about the last (a build without oneDNN, a
    CPU without oneDNN's bf16 kernels).
    """
    counts = {"onednn-packed": 0, "onednn-packed-bf16": 0, "aten": 0}
    unpacked: set[torch.dtype] = set()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child.weight.device.type != "cpu":
                continue
            dtype = child.weight.dtype
            if packable(dtype):
                setattr(parent, name, PackedLinear.from_linear(child))
                counts["onednn-packed"] += 1
            elif dtype == torch.float16 and packable(torch.bfloat16):
                bias = None if child.bias is None else child.bias.to(torch.bfloat16)
                setattr(parent, name, PackedLinear(child.weight.to(torch.bfloat16), bias))
                counts["onednn-packed-bf16"] += 1
            else:
                counts["aten"] += 1
                unpacked.add(dtype)
    slow = unpacked & {torch.float32, torch.bfloat16, torch.float16}
    if slow:
        logger.warning(
            "dense %s linears run through F.linear, not oneDNN's packed GEMM (oneDNN available: %s): expect CPU "
            "decode steps 1.5-2x slower (fp16: 5-7x slower at 8-16 rows)",
            ", ".join(sorted(str(d) for d in slow)), torch.backends.mkldnn.is_available(),
        )
    return counts
