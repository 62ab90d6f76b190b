"""Next-token choice for a whole batch on the model's device: greedy, temperature, top_k, nucleus (top_p), min_p.

Every row carries its own settings as tensors (`SamplingTensors`), and only the chosen ids leave the device.

Randomness is counter-based: a row's noise for vocabulary entry v is a hash of (seed, position, v) computed in
integer tensor ops, turned into Gumbel noise; the sampled token is argmax(logits / temperature + noise) over the
kept set (Gumbel-max, which draws exactly from softmax(logits / temperature) restricted to that set). So a
request's seed fixes its tokens whatever else shares the batch, and the noise is bit-identical on CPU and GPU (the
hash is integer arithmetic; only the final log may differ by an ulp between devices). Position here is the
absolute position of the token being chosen (prompt length + tokens generated so far).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from serve_app.engine.params import SamplingParams

MASK32 = 0xFFFFFFFF


class NonFiniteLogitsError(RuntimeError):
    """The model produced NaN or infinite logits; the request fails rather than emitting garbage."""


NON_FINITE_MESSAGE = "the model produced NaN/Inf logits (numerical overflow); the request was stopped"


def request_seed(params: SamplingParams) -> int:
    """The request's 64-bit noise seed: `params.seed` reduced mod 2**64 (any integer works), else a random one."""
    return params.seed % 2**64 if params.seed is not None else random.getrandbits(64)


def _mul32(x: Tensor, constant: int) -> Tensor:
    """(x * constant) mod 2**32 for int64 x in [0, 2**32), without ever overflowing int64 (16-bit halves)."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & MASK32


def mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash ("lowbias32", C. Wellons) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


# Sorted candidates examined for top_p/top_k before falling back to a full sort: the nucleus of a real model's
# distribution almost always closes well within this, and the noise is then hashed for these ids only.
CANDIDATES = 1024
OVERFLOW = -2  # a row whose nucleus did not close within the candidates: the caller samples it again in full


_VOCAB_HASH: dict[tuple[int, str], Tensor] = {}


def _vocab_hash(vocab: int, device: torch.device) -> Tensor:
    key = (vocab, str(device))
    if key not in _VOCAB_HASH:
        _VOCAB_HASH[key] = mix32(torch.arange(vocab, dtype=torch.int64, device=device) + 0x2545F491)
    return _VOCAB_HASH[key]


def row_keys(seed_lo: Tensor, seed_hi: Tensor, positions: Tensor) -> Tensor:
    """[B] int64 in [0, 2**32): one key per row from its seed halves and the position of the token to choose."""
    return mix32(mix32(mix32(seed_hi) ^ seed_lo) ^ (positions & MASK32))


def gumbel_noise(keys: Tensor, vocab: int, ids: Tensor | None = None) -> Tensor:
    """keys [B] -> Gumbel(0, 1) noise [B, vocab] fp32, a pure function of (key, vocabulary index).

    With ids [B, K], only those entries' noise [B, K] (the same values the full [B, vocab] holds there)."""
    table = _vocab_hash(vocab, keys.device)
    hashed = table[None, :] if ids is None else table[ids]
    bits = mix32(keys[:, None] ^ hashed)  # [B, vocab or K]
    uniform = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / 2**24)  # in (0, 1), never 0 or 1
    return -torch.log(-torch.log(uniform))


class TokenHistory:
    """Per-sequence token counts on the device, for the penalties: rows [max_rows + 1, vocab], the last a spare row
    that stays empty (rows without penalties read it). `counts` are generated tokens (OpenAI's penalties), `seen`
    the prompt's tokens (with the counts, what transformers' repetition penalty looks at). Allocated once: captured
    decode graphs read them by address."""

    def __init__(self, max_rows: int, vocab: int, device):
        self.spare = max_rows
        self.counts = torch.zeros(max_rows + 1, vocab, dtype=torch.int32, device=device)
        self.seen = torch.zeros(max_rows + 1, vocab, dtype=torch.bool, device=device)

    def load(self, row: int, prompt_ids: list[int], output_ids: list[int]) -> None:
        """Start row `row` for a sequence (new, or resumed after a preemption with its output so far)."""
        device = self.counts.device
        self.counts[row].zero_()
        self.seen[row].zero_()
        self.seen[row, torch.tensor(prompt_ids, dtype=torch.int64, device=device)] = True
        if output_ids:
            ids = torch.tensor(output_ids, dtype=torch.int64, device=device)
            self.counts[row].index_put_((ids,), torch.ones_like(ids, dtype=torch.int32), accumulate=True)

    def record(self, rows: list[int], ids: list[int]) -> None:
        """Count the tokens just chosen (one per row)."""
        if rows:
            device = self.counts.device
            index = (torch.tensor(rows, device=device), torch.tensor(ids, device=device))
            self.counts.index_put_(index, torch.ones(len(rows), dtype=torch.int32, device=device), accumulate=True)


@dataclass
class Penalties:
    """The penalties of a batch's rows [B]: which history row each reads and its three factors."""

    rows: Tensor  # int64 rows of TokenHistory (its spare row for rows without penalties)
    repetition: Tensor  # fp32, 1 = off
    presence: Tensor  # fp32, 0 = off
    frequency: Tensor  # fp32, 0 = off
    history: TokenHistory

    def apply(self, logits: Tensor) -> Tensor:
        """logits [B, V] fp32 with every row's penalties applied: repetition over the tokens seen (transformers'
        RepetitionPenaltyLogitsProcessor), then presence and frequency over the generated ones (OpenAI's)."""
        counts = self.history.counts[self.rows]  # [B, V]
        generated = counts > 0
        seen = self.history.seen[self.rows] | generated
        repetition = self.repetition[:, None]
        penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, penalized, logits)
        return logits - self.presence[:, None] * generated - self.frequency[:, None] * counts

    def select(self, rows: Tensor) -> Penalties:
        return Penalties(self.rows[rows], self.repetition[rows], self.presence[rows], self.frequency[rows],
                         self.history)

    @classmethod
    def build(cls, params: list[SamplingParams], rows: list[int | None], history: TokenHistory, device) -> Penalties:
        factors = torch.tensor([[p.repetition_penalty for p in params], [p.presence_penalty for p in params],
                                [p.frequency_penalty for p in params]], dtype=torch.float32)
        index = torch.tensor([history.spare if r is None else r for r in rows], dtype=torch.int64)
        if torch.device(device).type == "cuda":
            factors, index = factors.pin_memory(), index.pin_memory()
        factors, index = factors.to(device, non_blocking=True), index.to(device, non_blocking=True)
        return cls(index, factors[0], factors[1], factors[2], history)


@dataclass
class SamplingTensors:
    """Per-row settings on the device [B], plus what the host knows about the batch (which ops are needed)."""

    temperature: Tensor  # fp32; 1 for greedy rows (they take the argmax and never use it)
    top_p: Tensor  # fp32
    top_k: Tensor  # int64; vocab size where off
    min_p: Tensor  # fp32; 0 where off
    greedy: Tensor  # bool
    seed_lo: Tensor  # int64, low 32 bits of the seed
    seed_hi: Tensor  # int64, high 32 bits
    any_sampled: bool
    needs_sort: bool  # some row has top_p < 1, top_k or min_p set
    # [B, M] (token id, bias) per row added to the logits before anything else (logit_bias, and -inf on the stop ids
    # of a row short of its min_tokens), padded with (0, 0.0); None when no row has any
    bias_ids: Tensor | None = None
    bias_values: Tensor | None = None
    penalties: Penalties | None = None  # None when no row has any (the eager path then skips them)
    # int32 [B, ceil(V / 32)]: bit v of a row set where token v may be chosen (a grammar's mask, engine/structured.py;
    # all ones for rows without one); None when no row has a grammar
    allowed: Tensor | None = None

    def select(self, rows: Tensor) -> SamplingTensors:
        """The settings of some rows only."""
        biased = self.bias_ids is not None
        return SamplingTensors(self.temperature[rows], self.top_p[rows], self.top_k[rows], self.min_p[rows],
                               self.greedy[rows], self.seed_lo[rows], self.seed_hi[rows], self.any_sampled,
                               self.needs_sort, self.bias_ids[rows] if biased else None,
                               self.bias_values[rows] if biased else None,
                               self.penalties.select(rows) if self.penalties is not None else None,
                               self.allowed[rows] if self.allowed is not None else None)

    def allow(self, masks: list[bytes | None], device) -> None:
        """Set `allowed` from per-row bitmasks (None: every token), one host-to-device copy."""
        width = next(len(m) for m in masks if m is not None)
        host = torch.frombuffer(bytearray(b"".join(m if m is not None else b"\xff" * width for m in masks)),
                                dtype=torch.int32).view(len(masks), width // 4)
        if torch.device(device).type == "cuda":
            host = host.pin_memory()
        self.allowed = host.to(device, non_blocking=True)

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], vocab: int, device,
              suppress: list[list[int]] | None = None) -> SamplingTensors:
        """One host-to-device copy per dtype for the whole batch (and one more for the biases, when a row has some).
        `suppress[row]`: token ids that row may not choose now (its stop ids while it is short of min_tokens)."""
        floats = torch.tensor([[1.0 if p.greedy else p.temperature for p in params], [p.top_p for p in params],
                               [p.min_p for p in params]])
        ints = torch.tensor(
            [
                [p.top_k if p.top_k else vocab for p in params],
                [int(p.greedy) for p in params],
                [s & MASK32 for s in seeds],
                [s >> 32 for s in seeds],
            ],
            dtype=torch.int64,
        )
        if torch.device(device).type == "cuda":
            floats = floats.pin_memory().to(device, non_blocking=True)
            ints = ints.pin_memory().to(device, non_blocking=True)
        sampled = [p for p in params if not p.greedy]
        bias_ids, bias_values = _biases(params, suppress or [[] for _ in params], device)
        return cls(
            temperature=floats[0],
            top_p=floats[1],
            top_k=ints[0],
            min_p=floats[2],
            greedy=ints[1].bool(),
            seed_lo=ints[2],
            seed_hi=ints[3],
            any_sampled=bool(sampled),
            needs_sort=any(p.top_p < 1.0 or p.top_k or p.min_p > 0 for p in sampled),
            bias_ids=bias_ids,
            bias_values=bias_values,
        )


def _biases(params: list[SamplingParams], suppress: list[list[int]], device) -> tuple[Tensor | None, Tensor | None]:
    rows = [list(p.logit_bias) + [(token, float("-inf")) for token in banned] for p, banned in zip(params, suppress)]
    width = max(map(len, rows), default=0)
    if width == 0:
        return None, None
    ids = torch.tensor([[t for t, _ in row] + [0] * (width - len(row)) for row in rows], dtype=torch.int64)
    values = torch.tensor([[b for _, b in row] + [0.0] * (width - len(row)) for row in rows], dtype=torch.float32)
    if torch.device(device).type == "cuda":
        ids, values = ids.pin_memory(), values.pin_memory()
    return ids.to(device, non_blocking=True), values.to(device, non_blocking=True)


def unpack_allowed(allowed: Tensor, vocab: int) -> Tensor:
    """int32 [B, W] bitmasks -> bool [B, vocab]: bit v % 32 of word v // 32 (llguidance's layout)."""
    shifts = torch.arange(32, dtype=torch.int32, device=allowed.device)
    return ((allowed[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :vocab]


def nucleus_drop(sorted_logits: Tensor, top_p: Tensor, top_k: Tensor, log_norm: Tensor | None = None,
                 vocab: int | None = None, min_p: Tensor | None = None) -> Tensor:
    """sorted_logits [B, K] descending -> bool [B, K], True where a token falls outside top_k or the top_p nucleus.

    top_p applies to the distribution top_k leaves, renormalized over its k tokens, as transformers' TopK and TopP
    warpers (in that order) and vLLM do. A token is dropped when the mass before it already reaches top_p; the most
    likely token always stays (even for a top_p that rounds to 0 in fp32). min_p [B] (optional) also drops tokens
    less than min_p times as likely as the most likely one (transformers' MinPLogitsWarper, vLLM's min_p). K may be a
    prefix of a row of `vocab` tokens: log_norm [B, 1] is then the logsumexp of the whole row (see
    `nucleus_drop_checked`)."""
    return nucleus_drop_checked(sorted_logits, top_p, top_k, log_norm, vocab, min_p)[0]


def _drop_under(sorted_logits: Tensor, log_norm: Tensor, top_p: Tensor, outside_k: Tensor) -> Tensor:
    probs = (sorted_logits - log_norm).exp()
    return ((probs.cumsum(-1) - probs) >= top_p[:, None]) | outside_k


def nucleus_drop_checked(sorted_logits: Tensor, top_p: Tensor, top_k: Tensor, log_norm: Tensor | None = None,
                         vocab: int | None = None, min_p: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`nucleus_drop`, and bool [B]: whether the K candidates settle the row.

    A row whose k tokens are all among the K candidates (or that has no top_k: k = vocab, normalized by log_norm)
    is normalized exactly. One whose k reaches past them (K < k < vocab) is normalized by something between the
    candidates' own mass and the whole row's: where those two bounds drop the same tokens, so does the exact one;
    where they do not, the row is not settled and must be drawn again over the whole vocabulary."""
    num = sorted_logits.shape[-1]
    vocab = num if vocab is None else vocab
    if log_norm is None:
        log_norm = sorted_logits.logsumexp(-1, keepdim=True)
    rank = torch.arange(num, device=sorted_logits.device)
    outside_k = rank[None, :] >= top_k[:, None]
    if min_p is not None:  # relative to the most likely token, so unaffected by any renormalization; log(0) = -inf
        outside_k = outside_k | (sorted_logits < sorted_logits[:, :1] + min_p[:, None].log())
    in_k_norm = sorted_logits.masked_fill(outside_k, float("-inf")).logsumexp(-1, keepdim=True)
    all_in = (top_k <= num)[:, None]
    no_top_k = (top_k >= vocab)[:, None]
    upper = torch.where(all_in, in_k_norm, log_norm)  # exact, or the whole row's mass: at least the exact one
    lower = torch.where(no_top_k & ~all_in, log_norm, in_k_norm)  # exact, or the candidates' mass: at most it
    drop = _drop_under(sorted_logits, upper, top_p, outside_k)
    settled = (drop == _drop_under(sorted_logits, lower, top_p, outside_k)).all(-1)
    drop[:, 0] = False
    return drop, settled


def sample(logits: Tensor, settings: SamplingTensors, positions: Tensor, candidates: int | None = CANDIDATES) -> Tensor:
    """logits [B, V] fp32, positions [B] (of the tokens being chosen) -> ids [B] int64 on the same device.

    A row whose logits hold NaN/Inf gets -1 (the caller fails that request). For top_p/top_k only the `candidates`
    most likely tokens are examined (None: all); a row whose nucleus may reach past them gets OVERFLOW, and the
    caller samples it again with candidates=None (`sample_rows`). No host synchronisation inside."""
    finite = torch.isfinite(logits).all(-1)  # [B], of the model's own logits
    if settings.allowed is not None:  # a grammar's mask first: nothing after it may bring a banned token back
        logits = logits.masked_fill(~unpack_allowed(settings.allowed, logits.shape[-1]), float("-inf"))
    if settings.bias_ids is not None:  # before temperature, for greedy rows too (OpenAI's logit_bias)
        logits = logits.scatter_add(1, settings.bias_ids, settings.bias_values)
    if settings.penalties is not None:  # then the penalties, also before temperature (as transformers and vLLM)
        logits = settings.penalties.apply(logits)
    ids = logits.argmax(-1)  # greedy rows
    if settings.any_sampled:
        vocab = logits.shape[-1]
        scaled = logits / settings.temperature[:, None]
        keys = row_keys(settings.seed_lo, settings.seed_hi, positions)
        if settings.needs_sort:
            k = vocab if candidates is None else min(candidates, vocab)
            ordered, order = scaled.topk(k, dim=-1) if k < vocab else scaled.sort(-1, descending=True)  # [B, k]
            drop, settled = nucleus_drop_checked(ordered, settings.top_p, settings.top_k,
                                                 scaled.logsumexp(-1, keepdim=True), vocab, settings.min_p)
            scores = ordered.masked_fill(drop, float("-inf")) + gumbel_noise(keys, vocab, order)
            sampled = order.gather(-1, scores.argmax(-1, keepdim=True))[:, 0]
            if k < vocab:  # the last candidate still kept and top_k allows more (the nucleus may go further), or
                # a top_k past the candidates whose renormalized nucleus they cannot settle
                overflow = (~drop[:, -1] & (settings.top_k > k)) | ~settled
                sampled = torch.where(overflow, torch.full_like(sampled, OVERFLOW), sampled)
        else:
            sampled = (scaled + gumbel_noise(keys, vocab)).argmax(-1)
        ids = torch.where(settings.greedy, ids, sampled)
    return torch.where(finite, ids, torch.full_like(ids, -1))


def resample_overflow(ids: list[int], logits: Tensor, settings: SamplingTensors, positions: Tensor) -> list[int]:
    """Replace OVERFLOW ids (rare: nuclei wider than CANDIDATES) by a full-vocabulary draw. ids came from `sample`."""
    rows = [i for i, token in enumerate(ids) if token == OVERFLOW]
    if not rows:
        return ids
    index = torch.tensor(rows, device=logits.device)
    again = sample(logits[index], settings.select(index), positions[index], candidates=None).tolist()
    ids = list(ids)
    for row, token in zip(rows, again):
        ids[row] = token
    return ids


def choose_token(logits: Tensor, params: SamplingParams, seed: int = 0, position: int = 0) -> int:
    """One row: logits [vocab] fp32 -> next token id, as `sample` would choose it. Raises NonFiniteLogitsError."""
    settings = SamplingTensors.build([params], [seed], logits.shape[-1], logits.device)
    token = int(sample(logits[None], settings, torch.tensor([position], device=logits.device), candidates=None)[0])
    if token < 0:
        raise NonFiniteLogitsError(NON_FINITE_MESSAGE)
    return token
