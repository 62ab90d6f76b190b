"""The device check a replica runs before it serves: a few decode steps of its serving path against the eager
reference, on the same device, with the same weights.

- Serving path: the `ModelRunner` as the engine built it. On CUDA that is compiled flex attention over the paged
  cache's block tables, decode steps replayed from CUDA graphs (possibly of a compiled step), and the pool's quantized kernels.
- Reference: a second runner over a small cache of its own with slot-view attention, eager steps, and every
  quantized layer computed by dequantize + matmul (`quant.reference_kernels`).

Both run the same prompts (`rows` of them, `prompt_len` tokens) and then `steps` greedy decode steps, teacher-forced
with the serving path's ids so that both see identical inputs even where a near tie flips an argmax. The check
passes when every logit is within `bound` = TOLERANCE[dtype] x max(1, max |reference logit|) and every greedy id
agrees, except where the reference's own top-2 margin is within the bound (a legitimate tie).

The serving runner's first blocks are left holding the check's KV: the engine starts with no cached prefixes, so
nothing reads it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from serve_app.engine.params import SamplingParams
from serve_app.engine.runner import ModelRunner, Work
from serve_app.model.quant import QuantizedLinear, reference_kernels

# Allowed logit error relative to the largest reference logit, per compute dtype: reduction orders differ between
# the paths (cuBLAS / Triton split-K / flex against slot-view matmuls), which moves a half-precision logit by a
# few units of its last place per layer; a wrong slot, mask, nibble or scale moves it by its own size.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


class DeviceCheckFailed(RuntimeError):
    """The serving path disagrees with the reference on this device; the message names the path."""


@dataclass
class DeviceCheck:
    passed: bool
    path: str  # the serving path checked (ModelRunner.path)
    reference: str
    rows: int
    steps: int  # decode steps after the prefill
    max_abs_error: float
    bound: float
    greedy_agreement: float  # share of (row, step) greedy ids that agree
    seconds: float
    detail: str  # what failed, empty when passed

    def as_dict(self) -> dict:
        return asdict(self)


def tolerance(model: torch.nn.Module, dtype: torch.dtype) -> float:
    """TOLERANCE of the narrowest dtype the model computes in (quantized layers may run in their own, e.g. bf16 on
    CPU under an fp32 model)."""
    dtypes = {dtype} | {m.dtype for m in model.modules() if isinstance(m, QuantizedLinear)}
    return max(TOLERANCE.get(d, TOLERANCE[torch.float16]) for d in dtypes)


def _prompts(rows: int, length: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1234)
    return [torch.randint(3, vocab, (length,), generator=generator).tolist() for _ in range(rows)]


def _logits_of(runner: ModelRunner, work: list[Work]) -> torch.Tensor:
    """fp32 logits [rows, vocab] on the CPU of one step (every work item has a token due)."""
    return runner.step_logits(work)[1].float().cpu()


def run_device_check(runner: ModelRunner, *, rows: int = 4, steps: int = 4, prompt_len: int = 16) -> DeviceCheck:
    """Run the check (see the module docstring); never raises for a mismatch, only reports it."""
    start = time.perf_counter()
    loaded = runner.loaded
    rows = min(rows, runner.max_rows)
    steps = max(1, min(steps, runner.cache.max_positions - prompt_len - 1))
    tables = runner.cache.disjoint_tables(rows, prompt_len + steps + 1)
    rows = len(tables)
    greedy = SamplingParams()
    prompts = _prompts(rows, prompt_len, min(loaded.config.padded_vocab_size, 64000))
    reference = ModelRunner(loaded, rows, prompt_len + steps + 1, attention="slot-view", graphs=False)
    served: list[torch.Tensor] = []
    expected: list[torch.Tensor] = []
    inputs = [(p, 0) for p in prompts]  # per row: the tokens to run and the position of the first
    for step in range(steps + 1):
        got = _logits_of(runner, [Work(ids, tables[row], at, greedy) for row, (ids, at) in enumerate(inputs)])
        with reference_kernels(loaded.model):  # the reference's slot cache: row r in slot r
            want = _logits_of(reference, [Work(ids, row, at, greedy) for row, (ids, at) in enumerate(inputs)])
        served.append(got)
        expected.append(want)
        inputs = [([int(t)], prompt_len + step) for t in got.argmax(-1)]
    served_t, expected_t = torch.stack(served), torch.stack(expected)  # [steps + 1, rows, vocab]
    bound = tolerance(loaded.model, loaded.dtype) * max(1.0, expected_t.abs().max().item())
    finite = bool(torch.isfinite(served_t).all())
    error = (served_t - expected_t).abs().max().item() if finite else float("inf")
    top2 = expected_t.topk(2, dim=-1).values
    tie = (top2[..., 0] - top2[..., 1]) <= bound
    same = served_t.argmax(-1) == expected_t.argmax(-1)
    problems = []
    if not finite:
        problems.append("non-finite logits")
    elif error > bound:
        worst = (served_t - expected_t).abs().amax(-1)  # [steps + 1, rows]
        step, row = divmod(int(worst.argmax()), rows)
        where = "the prefill" if step == 0 else f"decode step {step}"
        problems.append(f"max logit error {error:.4g} > bound {bound:.4g} (at {where}, row {row})")
    if not (same | tie).all():
        problems.append(f"greedy ids differ at {int((~same & ~tie).sum())} of {same.numel()} (row, step) pairs")
    return DeviceCheck(
        passed=not problems, path=runner.path,
        reference="slot-view, eager, dequantize + matmul" if loaded.kernels else reference.path,
        rows=rows, steps=steps, max_abs_error=error, bound=bound,
        greedy_agreement=same.float().mean().item(), seconds=time.perf_counter() - start, detail="; ".join(problems),
    )
