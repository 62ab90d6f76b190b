"""LoRA applied unmerged and per row: one step batches rows of several adapters and of the base model.

Every linear LoRA can target (serve_app.model.adapters.LORA_MODULES) is wrapped in a `LoRALinear` holding, once an
adapter targets it, every slot's weights side by side: A [slots * rank, in] and B [out, slots * rank] (each adapter's
rank padded with zeros up to `rank`, its scale folded into B). A step then adds, for its N tokens,

    ((x @ A.T) * select) @ B.T        select [N, slots * rank]: 1 where the column belongs to the token's slot

one dense product over all slots instead of a loop over requests or adapters: the same shapes whatever mix of
adapters the batch has (a segmented kernel such as punica's would skip the other slots' columns; with a few slots of
low rank these columns cost ~slots * rank * (in + out) per token, a few percent of the base layer). Rows of the base
model have an all-zero `select`. A step with no LoRA row skips all of it (`LoRAState.select` is None).

The base layer can be anything with the nn.Linear call signature (dense, oneDNN-packed, int8/int4 weight-only), so
LoRA works over every precision. Slots are filled and cleared between steps, on the compute thread.
"""

from __future__ import annotations

import torch
from torch import nn

from serve_app.model.adapters import LORA_MODULES, LoRAAdapter, lora_shapes


class LoRAState:
    """The slots shared by a model's `LoRALinear` layers, and the current step's row selection."""

    def __init__(self, slots: int, rank: int, dtype: torch.dtype, device: torch.device):
        self.slots = slots
        self.rank = rank
        self.dtype = dtype
        self.device = device
        self.layers: dict[tuple[int, str], LoRALinear] = {}
        self.select: torch.Tensor | None = None
        # column -> slot id (1..slots; 0 is the base model)
        self._column_slot = torch.arange(1, slots + 1, device=device).repeat_interleave(rank)

    def begin(self, token_slots: torch.Tensor) -> None:
        """Before a step: token_slots [N] int64, each token's slot (0: base model)."""
        self.select = (token_slots[:, None] == self._column_slot[None, :]).to(self.dtype)

    def end(self) -> None:
        self.select = None

    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        """Put `adapter` in slot `slot` (1..slots), replacing whatever was there."""
        if not 1 <= slot <= self.slots:
            raise ValueError(f"LoRA slot {slot} outside 1..{self.slots}")
        if adapter.rank > self.rank:
            raise ValueError(f"rank {adapter.rank} exceeds this engine's max_lora_rank={self.rank}")
        self.clear(slot)
        for key, (a, b) in adapter.weights.items():
            self.layers[key].put(slot, a, b)

    def clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear(slot)


class LoRALinear(nn.Module):
    """`base(x)` plus the selected slots' low-rank updates (see the module docstring)."""

    def __init__(self, base: nn.Module, state: LoRAState, fan_in: int, fan_out: int):
        super().__init__()
        self.base = base
        self.state = state
        self.fan_in, self.fan_out = fan_in, fan_out
        self.lora_a: torch.Tensor | None = None  # [slots * rank, in], allocated when an adapter first targets it
        self.lora_b: torch.Tensor | None = None  # [out, slots * rank]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        select = self.state.select
        if select is None or self.lora_a is None:
            return y
        low = torch.nn.functional.linear(x.to(self.lora_a.dtype), self.lora_a) * select  # [N, slots * rank]
        return y + torch.nn.functional.linear(low, self.lora_b).to(y.dtype)

    def put(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        state = self.state
        if self.lora_a is None:
            width = state.slots * state.rank
            self.lora_a = torch.zeros(width, self.fan_in, dtype=state.dtype, device=state.device)
            self.lora_b = torch.zeros(self.fan_out, width, dtype=state.dtype, device=state.device)
        start = (slot - 1) * state.rank
        r = a.shape[0]
        self.lora_a[start : start + state.rank].zero_()
        self.lora_b[:, start : start + state.rank].zero_()
        self.lora_a[start : start + r] = a.to(self.lora_a)
        self.lora_b[:, start : start + r] = b.to(self.lora_b)

    def clear(self, slot: int) -> None:
        if self.lora_a is not None:
            start = (slot - 1) * self.state.rank
            self.lora_a[start : start + self.state.rank].zero_()
            self.lora_b[:, start : start + self.state.rank].zero_()

    @property
    def nbytes(self) -> int:
        return 0 if self.lora_a is None else (self.lora_a.numel() + self.lora_b.numel()) * self.lora_a.element_size()


def install_lora(model: nn.Module, slots: int, rank: int, dtype: torch.dtype, device: torch.device) -> LoRAState:
    """Wrap every LoRA-targetable linear of a ChatGLM2 model; returns the slots' shared state. One engine with
    adapters per model: installing again (a new engine on the same model) replaces the earlier slots."""
    sizes = lora_shapes(model.config)
    state = LoRAState(slots, rank, dtype, device)
    for index, layer in enumerate(model.transformer.encoder.layers):
        for module in LORA_MODULES:
            parent_name, child = module.split(".")
            parent = getattr(layer, parent_name)
            base = getattr(parent, child)
            if isinstance(base, LoRALinear):  # an earlier engine's on the same model: its slots end here
                base = base.base
            wrapped = LoRALinear(base, state, *sizes[module])
            setattr(parent, child, wrapped)
            state.layers[(index, module)] = wrapped
    return state
