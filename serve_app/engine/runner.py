"""One engine step on the model's device: every scheduled sequence's tokens in one packed forward, then sampling of
the whole batch there; only the chosen ids come back to the host (one synchronisation per step).

Decode-only steps replay a captured graph when the runner has them (CUDA, a bucket that fits); everything else,
and everything on CPU, runs eagerly. The runner's setup and its steps run on the process's compute thread
(serve_app.model.compute), whichever thread calls them, for OpenMP pools that stay fast and CUDA state that stays
on one thread. The engine's loop runs on that thread, so its steps are plain calls; a call from another thread (the
one-at-a-time path's steps) is handed over, ~75 us a step against decode steps of milliseconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from serve_app.engine.graphs import BUCKETS, Capture, CudaGraphCapture, DecodeGraphs, DecodeRows
from serve_app.engine.outputs import TokenLogprob
from serve_app.engine.params import SamplingParams, stop_ids
from serve_app.engine.sampling import Penalties, SamplingTensors, TokenHistory, resample_overflow, sample
from serve_app.model import compute
from serve_app.model.attention import FLEX_BLOCK, Span, as_table, make_backend, plan_step
from serve_app.model.chatglm2 import KVCache
from serve_app.model.loader import LoadedModel


@dataclass
class Work:
    """One sequence's share of a step: its next tokens, where they go, and how to choose the token after them."""

    token_ids: list[int]  # a prefill chunk, or the last generated token
    blocks: tuple[int, ...]  # the sequence's block table, at least up to this work's last position (an int: a slot)
    position: int  # position of token_ids[0]
    params: SamplingParams | None  # None when no token is due (a prefill chunk that does not end the prompt)
    seed: int = 0
    generated: int = 0  # tokens the sequence has generated so far (for min_tokens)
    penalty_row: int | None = None  # its row of the runner's TokenHistory (`load_history`), when it has penalties
    allowed: bytes | None = None  # a grammar's bitmask of the ids it may choose (engine/structured.py); None: any
    offset: int = 0  # positions of a P-tuning prefix before token 0 (attention.Span.offset)
    lora: int = 0  # its LoRA slot (model/lora.py), 0: the base model

    def __post_init__(self):
        self.blocks = as_table(self.blocks)


class ModelRunner:
    """Runs steps for the engine (and the one-at-a-time baseline) against one KV cache.

    `max_rows` sequences at most per step. Without `block_size` the cache is a slot cache: `max_rows` blocks of
    max_seq_len tokens, a sequence's table being its slot. With it, the cache is paged: `num_blocks` blocks of
    block_size tokens (default: as many as the slot cache would hold), each table at most max_seq_len long.

    `graphs`: capture decode steps per batch bucket. None = on CUDA only. `capture` replaces the CUDA graph recorder
    (tests pass one that re-runs the function, to check the bucket bookkeeping on CPU). `compile_decode`: compile
    each bucket's whole decode step (forward + sampling) before capturing it; needs graphs. `compile_backend`: the
    torch.compile backend for that and for the flex kernel (tests use "eager" or "aot_eager" to check the dynamo
    side quickly on CPU); `compile_flex`: compile flex_attention (default: on CUDA, where eager flex is unusable).
    """

    @compute.confined
    def __init__(
        self,
        loaded: LoadedModel,
        max_rows: int,
        max_seq_len: int,
        *,
        block_size: int | None = None,
        num_blocks: int | None = None,
        attention: str = "auto",
        graphs: bool | None = None,
        capture: Capture | None = None,
        buckets: tuple[int, ...] = BUCKETS,
        compile_decode: bool = False,
        compile_flex: bool | None = None,
        compile_backend: str = "inductor",
        lora=None,
    ):
        self.loaded = loaded
        self.device = loaded.device
        self.attention = make_backend(attention, self.device, compile=compile_flex, backend=compile_backend)
        use_graphs = graphs if graphs is not None else self.device.type == "cuda"
        if compile_decode and not use_graphs:
            raise ValueError("compile_decode compiles the captured decode step: it needs decode graphs")
        self.max_rows = max_rows
        if block_size is None:  # a slot cache: the flex backend reads whole key blocks, so slots are a number of them
            block_size = -(-max_seq_len // FLEX_BLOCK) * FLEX_BLOCK if self.attention.name == "flex" else max_seq_len
            num_blocks, width = max_rows, 1
        else:
            if self.attention.name == "flex" and block_size % FLEX_BLOCK:
                raise ValueError(f"the flex backend needs a block_size that is a multiple of {FLEX_BLOCK}")
            width = -(-max_seq_len // block_size)
            num_blocks = num_blocks if num_blocks is not None else max_rows * width
        self.cache = KVCache(loaded.config, num_blocks, block_size, dtype=loaded.dtype, device=self.device,
                             scratch=use_graphs, table_width=width)
        self.history = TokenHistory(max_rows, loaded.config.padded_vocab_size, self.device)
        self.lora = lora  # model/lora.py's slots, when the model has LoRA layers installed
        self.graphs = None
        if use_graphs:
            capture = capture or CudaGraphCapture()
            self.graphs = DecodeGraphs(loaded.model, self.cache, self.attention, self.device, capture, max_rows,
                                       self.history, buckets,
                                       compile_step=compile_decode, compile_backend=compile_backend)

    @property
    def path(self) -> str:
        """The decode path in words: attention backend, graphs or eager, compiled or not, quantized kernels."""
        parts = [self.attention.name + (" (compiled)" if getattr(self.attention, "compiled", False) else "")]
        if self.graphs is not None:
            parts.append("decode graphs" + (" of the compiled step" if self.graphs.compile_step else ""))
        else:
            parts.append("eager")
        parts.append("+".join(sorted(self.loaded.kernels)) or "dense")
        return ", ".join(parts)

    @compute.confined
    def warmup(self) -> dict:
        """Compile and capture everything a decode step can need now, before any request (on CUDA: flex for every
        row bucket, every bucket's graph per sampling variant). Returns {"seconds", "buckets", "graphs"}."""
        start = time.perf_counter()
        report: dict = {"buckets": [], "graphs": 0}
        if self.graphs is not None:
            report["graphs"] = self.graphs.capture_all()["graphs"]
            report["buckets"] = list(self.graphs.buckets)
        elif getattr(self.attention, "compiled", False):
            report["buckets"] = self.attention.warmup(self.cache, self.loaded.config.num_attention_heads,
                                                      self.loaded.dtype, self.max_rows)
        report["seconds"] = time.perf_counter() - start
        return report

    @compute.confined
    def load_history(self, row: int, prompt_ids: list[int], output_ids: list[int]) -> None:
        """Give a sequence with penalties history row `row` (before its first step, and again after a preemption)."""
        self.history.load(row, prompt_ids, output_ids)

    @compute.confined
    def write_prefix(self, blocks: list[int], kv: torch.Tensor) -> None:
        """Write a P-tuning prefix's KV (kv [layers, 2, L, kv_heads, D], model/adapters.py) into positions [0, L) of
        the table `blocks`, in the cache's dtype (keys as they are: a prefix's keys are not rotated)."""
        size = self.cache.block_size
        length = kv.shape[2]
        kv = kv.to(self.device, self.cache.k[0].dtype)
        for layer in range(len(self.cache.k)):
            for index, block in enumerate(blocks):
                part = slice(index * size, min((index + 1) * size, length))
                count = part.stop - part.start
                self.cache.k[layer][:, block, :count] = kv[layer, 0, part].transpose(0, 1)
                self.cache.v[layer][:, block, :count] = kv[layer, 1, part].transpose(0, 1)

    @compute.confined
    def load_lora(self, slot: int, adapter) -> None:
        """Put a LoRA adapter in slot `slot` of the model's LoRA layers (between steps: this runs on the compute
        thread)."""
        self.lora.load(slot, adapter)

    @compute.confined
    def clear_lora(self, slot: int) -> None:
        self.lora.clear(slot)

    @compute.confined
    def copy_kv(self, copies: list[tuple[int, int, int]]) -> None:
        """Copy the KV of the first `count` positions of block `src` into block `dst`, per (src, dst, count)."""
        self.cache.copy_positions(copies)

    @compute.confined
    def step(self, work: list[Work]) -> list[int | None]:
        """Per work item: the chosen id, -1 when its logits were NaN/Inf, None when no token was due."""
        return self._step(work)[0]

    @compute.confined
    def step_logits(self, work: list[Work]):
        """`step`'s ids, and the fp32 logits [R, vocab] of the R items with a token due (None when none is)."""
        ids, logits, _ = self._step(work)
        return ids, logits

    @compute.confined
    def step_logprobs(self, work: list[Work]) -> tuple[list[int | None], list[TokenLogprob | None]]:
        """`step`'s ids, and per item the chosen token's `TokenLogprob` where its params ask for logprobs."""
        ids, _, logprobs = self._step(work)
        return ids, logprobs

    def _step(self, work: list[Work]):
        due = [w for w in work if w.params is not None]
        if not due:
            self._forward(work)
            return [None] * len(work), None, [None] * len(work)
        eos = self.loaded.config.eos_token_id
        suppress = [sorted(stop_ids(w.params, eos)) if w.generated < w.params.min_tokens else [] for w in due]
        settings = SamplingTensors.build(
            [w.params for w in due], [w.seed for w in due], self.loaded.config.padded_vocab_size, self.device, suppress
        )
        if any(w.penalty_row is not None for w in due):
            settings.penalties = Penalties.build([w.params for w in due], [w.penalty_row for w in due],
                                                 self.history, self.device)
        if any(w.allowed is not None for w in due):
            settings.allow([w.allowed for w in due], self.device)
        # Grammar masks are not among the captured variants: such steps run eagerly (README, "Structured output").
        # Nor are adapters' rows (prefix offsets, LoRA slots): such steps run eagerly too (README, "Adapters").
        decode_only = (all(len(w.token_ids) == 1 and w.params is not None and not w.offset and not w.lora
                           for w in work) and settings.allowed is None)
        if decode_only and self.graphs is not None and self.graphs.bucket(len(work)) is not None:
            rows = DecodeRows([w.token_ids[0] for w in work], [w.blocks for w in work], [w.position for w in work])
            ids, logits, sample_positions = self.graphs.run(rows, settings)
            ids = ids.tolist()
        else:
            logits, sample_positions = self._forward(work)
            ids = sample(logits, settings, sample_positions).tolist()  # the step's one device-to-host copy
        ids = resample_overflow(ids, logits, settings, sample_positions)
        counted = [(w.penalty_row, t) for w, t in zip(due, ids) if w.penalty_row is not None and t >= 0]
        self.history.record([row for row, _ in counted], [t for _, t in counted])
        logprobs = iter(token_logprobs(logits, [w.params.logprobs for w in due], ids))
        chosen = iter(ids)
        return ([next(chosen) if w.params is not None else None for w in work], logits,
                [next(logprobs) if w.params is not None else None for w in work])

    def _forward(self, work: list[Work]):
        """Eager packed forward: (logits [R, vocab] of the rows with a token due, their next positions [R])."""
        spans, tokens, rows, start = [], [], [], 0
        for w in work:
            spans.append(Span(start, len(w.token_ids), w.blocks, w.position, w.offset))
            tokens += w.token_ids
            start += len(w.token_ids)
            if w.params is not None:
                rows.append(start - 1)
        plan = plan_step(spans, tokens, self.cache.block_size, self.device, rows, self.cache.table_width)
        lora = self.lora if any(w.lora for w in work) else None
        if lora is not None:
            slots = [w.lora for w in work for _ in w.token_ids]
            lora.begin(torch.tensor(slots, dtype=torch.int64).to(self.device, non_blocking=True))
        try:
            logits = self.loaded.model.forward_packed(plan, self.cache, self.attention)
        finally:
            if lora is not None:
                lora.end()
        # A due row's token goes one past the last position just run (its noise is keyed by that rotary position).
        return logits, plan.positions[plan.logit_rows] + 1


def token_logprobs(logits, wanted: list[int | None], ids: list[int]) -> list[TokenLogprob | None]:
    """Per row: None, or (where `wanted[row]` is k, not None) the chosen id's log-probability and the k most likely
    ids' under log_softmax(logits[row]), the model's raw distribution. One device-to-host copy for all rows."""
    rows = [i for i, (k, token) in enumerate(zip(wanted, ids)) if k is not None and token >= 0]
    out: list[TokenLogprob | None] = [None] * len(ids)
    if not rows:
        return out
    device = logits.device
    logprobs = logits[torch.tensor(rows, device=device)].float().log_softmax(-1)
    chosen = logprobs.gather(1, torch.tensor([ids[i] for i in rows], device=device)[:, None])
    k = max(wanted[i] for i in rows)
    values, order = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    packed = torch.cat([chosen, values, order.to(values.dtype)], dim=1).tolist()  # ids < 2**24: exact in fp32
    for row, line in zip(rows, packed):
        top = wanted[row]
        out[row] = TokenLogprob(line[0], [(int(token), value) for token, value in
                                          zip(line[1 + k:1 + k + top], line[1:1 + top])])
    return out
