"""How many ops (and, on CUDA, kernel launches) one decode step dispatches: one step of a `ModelRunner` under
torch.profiler, after warm-up.

What is counted (one `ModelRunner.step_logits` call: plan building, copy-in, forward, sampling, the ids' copy back):

- `ops`: *top-level dispatched ops*. An op is a profiler event named `namespace::name` (`aten::mul`,
  `mkldnn::_linear_pointwise`, `chatglm2::weight_only_matmul`, ...); it is top-level when no other op is among its
  ancestors (Python frames and `record_function` labels in between do not count), so `aten::linear` counts once, not
  again for the `aten::addmm` it calls. That is what the model's Python code asks the dispatcher for, and on an
  eager CUDA step it is roughly one kernel launch each (views launch nothing, some ops launch several).
  `aten_ops` are those in the `aten::` namespace.
- `ops_per_layer`: `ops / num_layers`, the naive average over the whole step. `block_ops` is the exact figure: the
  ops issued inside each `GLMBlock`'s forward (the profiler's Python tracer names each module call
  `nn.Module: GLMBlock_<n>`), listed per layer; `outside_blocks` is the rest (plan, embedding, block mask, final
  norm, output layer, sampling). A compiled step or a replayed CUDA graph makes no module calls: both are then
  None.
- `mask_builds`: calls of `attention.decode_block_mask` (the flex backend's block mask) during the step, and
  `mask_ops` the top-level ops they issued: the mask is built once per step by `FlexSlotAttention.prepare`, so neither
  depends on the number of layers (both are 0 for the other backends and inside a compiled or replayed step).
- CUDA only (None on CPU): `launches`, the host's kernel-launch calls (`cudaLaunchKernel*`, `cuLaunchKernel*`,
  `cudaLaunchCooperativeKernel*`) plus one per `cudaGraphLaunch` (a replayed graph is one launch, however many
  kernels it holds; `graph_launches` counts those); `copies`, the `cudaMemcpy*`/`cudaMemset*` calls;
  `device_kernels`, the kernels the device ran (kernels inside a replayed graph included, as CUPTI reports them;
  memcpy/memset activity excluded).

The step is profiled on the process's compute thread (serve_app.model.compute), where the runner runs it: the
profiler records the thread that starts it. A `schedule` of one warm-up step and one active step keeps the
profiler's own start-up out of the window. Profiling with Python stacks slows the step down; the counts, not the
times, are the point.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from serve_app.engine.graphs import CudaGraphCapture
from serve_app.engine.params import SamplingParams
from serve_app.engine.runner import ModelRunner, Work
from serve_app.model import compute

OP_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*::[A-Za-z0-9_.]+$")  # aten::mul, mkldnn::_linear_pointwise, ...
BLOCK_EVENT = re.compile(r"^nn\.Module: GLMBlock_(\d+)$")  # the Python tracer's event for one block's forward
MASK_FUNCTION = "decode_block_mask"  # serve_app.model.attention: the flex block mask, built by the backend's prepare
MASK_EVENT = re.compile(r"\(\d+\): " + MASK_FUNCTION + r"$")  # the tracer's "path/attention.py(302): decode_block_mask"
# CUDA runtime/driver calls, as kineto names them (some with a version suffix, e.g. cudaLaunchKernelExC_v11060).
KERNEL_LAUNCH = re.compile(r"^(cudaLaunchKernel|cudaLaunchKernelExC|cuLaunchKernel|cuLaunchKernelEx"
                           r"|cudaLaunchCooperativeKernel|cudaLaunchCooperativeKernelMultiDevice)(_v\d+)?$")
GRAPH_LAUNCH = re.compile(r"^(cudaGraphLaunch|cuGraphLaunch)(_v\d+)?$")
COPY_CALL = re.compile(r"^(cuda|cu)(Memcpy|Memset)\w*$")
DEVICE_COPY = re.compile(r"^(Memcpy|Memset)\b")  # device activity of copies and fills, not kernels


@dataclass
class LaunchCount:
    """One decode step of `rows` rows on one path (see the module docstring for every count's definition)."""

    rows: int
    path: str  # ModelRunner.path
    step: str  # what ran: "eager", "graph replay (bucket B)", or on CPU "graph function, re-run (bucket B)"
    device: str
    num_layers: int
    ops: int
    aten_ops: int
    ops_per_layer: float  # ops / num_layers
    block_ops: list[int] | None  # top-level ops inside each GLMBlock's forward, per layer
    outside_blocks: int | None  # ops - sum(block_ops)
    mask_builds: int
    mask_ops: int
    launches: int | None = None
    graph_launches: int | None = None
    copies: int | None = None
    device_kernels: int | None = None
    top_ops: list[tuple[str, int]] = field(default_factory=list)  # top-level op names by count, most frequent first

    @property
    def block_ops_mean(self) -> float | None:
        return sum(self.block_ops) / len(self.block_ops) if self.block_ops else None

    @property
    def launches_per_layer(self) -> float | None:
        return None if self.launches is None else self.launches / self.num_layers

    def to_dict(self) -> dict:
        out = asdict(self)
        out["top_ops"] = [list(pair) for pair in self.top_ops]
        out["block_ops_mean"] = self.block_ops_mean
        out["launches_per_layer"] = self.launches_per_layer
        return out


def random_model(preset: str, precision: str = "auto", device: str = "auto", *, layers: int | None = None,
                 pack_cpu_linears: bool = True):
    """demo.random_model(preset), or with `layers` the preset's shapes with that many layers (random weights)."""
    from serve_app.model import demo
    from serve_app.model.loader import build_model, resolve_device

    if layers is None:
        return demo.random_model(preset, precision, device, pack_cpu_linears=pack_cpu_linears)
    if preset not in demo.PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(demo.PRESETS)}")
    config = replace(demo.preset_config(preset, demo.PRESETS[preset][1]), num_layers=layers)
    tensors = demo.random_tensors(config, 0, resolve_device(device))
    return build_model(config, tensors, Path(f"random-{preset}-{layers}-layers"), precision, device,
                       pack_cpu_linears=pack_cpu_linears)


def decode_work(rows: int, context: int, sampled: bool = False) -> list[Work]:
    """A decode step of `rows` sequences in slots 0..rows-1, each at position `context` (its KV is whatever the
    cache holds there: the counts do not depend on the values). Greedy, or temperature + top_p with `sampled`."""
    params = SamplingParams(temperature=0.8, top_p=0.9) if sampled else SamplingParams()
    return [Work([5 + row], row, context, params, seed=row) for row in range(rows)]


def count_step(runner: ModelRunner, rows: int, *, context: int = 64, sampled: bool = False, warmup_steps: int = 2,
               full_warmup: bool = False, top: int = 10) -> LaunchCount:
    """Warm up (`runner.warmup()` first with `full_warmup`; then `warmup_steps` runs of the same step, which compile
    and capture what it needs), then profile exactly one decode step of `rows` rows at position `context`."""
    if rows > runner.max_rows:
        raise ValueError(f"{rows} rows need {rows} KV slots; the runner has {runner.max_rows}")
    if context + 1 > runner.cache.max_positions:
        raise ValueError(f"position {context} does not fit the runner's {runner.cache.max_positions}-token slots")
    work = decode_work(rows, context, sampled)
    if full_warmup:
        runner.warmup()
    for _ in range(warmup_steps):
        runner.step_logits(work)
    cuda = runner.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _init_profiler(activities)
    events = compute.run(_profile_one_step, runner, work, activities, cuda)
    bucket = runner.graphs.bucket(rows) if runner.graphs is not None else None
    if bucket is None:
        step = "eager"
    elif isinstance(runner.graphs.capture, CudaGraphCapture):
        step = f"graph replay (bucket {bucket})"
    else:  # an injected capture (CPU): the step re-runs the function a graph would record
        step = f"graph function, re-run (bucket {bucket})"
    return summarize(events, rows=rows, path=runner.path, step=step, device=str(runner.device),
                     num_layers=runner.loaded.config.num_layers, cuda=cuda, top=top)


def summarize(events, *, rows: int, path: str, step: str, device: str, num_layers: int, cuda: bool,
              top: int = 10) -> LaunchCount:
    """The counts of one profiled step from its `profile.events()`."""
    ops: list = []
    names: Counter[str] = Counter()
    blocks: Counter[int] = Counter()
    mask_builds = mask_ops = 0
    launches = graph_launches = copies = device_kernels = 0
    for event in events:
        name = event.name
        if _on_device(event):
            device_kernels += _is_kernel(event)
            continue
        if MASK_EVENT.search(name):
            mask_builds += 1
        elif KERNEL_LAUNCH.match(name):
            launches += 1
        elif GRAPH_LAUNCH.match(name):
            graph_launches += 1
        elif COPY_CALL.match(name):
            copies += 1
        if not _is_op(event):
            continue
        block, under_mask, nested = None, False, False
        parent = event.cpu_parent
        while parent is not None:
            if _is_op(parent):
                nested = True
                break
            found = BLOCK_EVENT.match(parent.name)
            if found and block is None:
                block = int(found.group(1))
            under_mask = under_mask or bool(MASK_EVENT.search(parent.name))
            parent = parent.cpu_parent
        if nested:
            continue
        ops.append(event)
        names[name] += 1
        if block is not None:
            blocks[block] += 1
        mask_ops += under_mask
    block_ops = [blocks[n] for n in range(num_layers)] if blocks else None
    return LaunchCount(
        rows=rows, path=path, step=step, device=device, num_layers=num_layers,
        ops=len(ops), aten_ops=sum(n for op, n in names.items() if op.startswith("aten::")),
        ops_per_layer=len(ops) / num_layers, block_ops=block_ops,
        outside_blocks=len(ops) - sum(block_ops) if block_ops is not None else None,
        mask_builds=mask_builds, mask_ops=mask_ops,
        launches=launches + graph_launches if cuda else None, graph_launches=graph_launches if cuda else None,
        copies=copies if cuda else None, device_kernels=device_kernels if cuda else None,
        top_ops=names.most_common(top),
    )


def _activity(event) -> str:
    """Kineto's activity type ("cpu_op", "python_function", "kernel", "gpu_memcpy", "cuda_sync", ...); "" if unknown."""
    return (getattr(event, "activity_type", None) or "").lower()


def _is_op(event) -> bool:
    activity = _activity(event)
    return (not activity or activity == "cpu_op") and bool(OP_NAME.match(event.name))


def _on_device(event) -> bool:
    device_type = getattr(event, "device_type", None)
    return device_type is not None and device_type != torch.autograd.DeviceType.CPU


def _is_kernel(event) -> bool:
    """A kernel that ran on the device: not a copy, fill, synchronization or annotation on the device's timeline."""
    activity = _activity(event)
    return activity == "kernel" if activity else not DEVICE_COPY.match(event.name)


def _profile_one_step(runner: ModelRunner, work: list[Work], activities, cuda: bool):
    """On the compute thread: one step under warm-up, one recorded; the recorded step's events."""
    one_step = schedule(wait=0, warmup=1, active=1, repeat=1)
    with profile(activities=activities, with_stack=True, schedule=one_step) as prof:
        for _ in range(2):
            runner.step_logits(work)
            if cuda:
                torch.cuda.synchronize(runner.device)  # every kernel of the step finished inside its window
            prof.step()
    return _events(prof)


@dataclass
class _Event:
    """What `summarize` reads of a profiler event (a FunctionEvent has the same attributes, less start and end)."""

    name: str
    device_type: object
    activity_type: str
    start: int
    end: int
    cpu_parent: _Event | None = None


# Profiler bookkeeping that `profile.events()` leaves out too (torch.autograd.profiler_util._filter_name).
_HIDDEN = {"[memory]", "[OutOfMemory]", "profiler::_record_function_enter", "profiler::_record_function_enter_new",
           "profiler::_record_function_exit", "aten::is_leaf", "aten::output_nr", "aten::_version"}


def _events(prof) -> list:
    """The recorded step's events with their CPU parents, read straight from kineto's results: `prof.events()`
    builds the same tree but takes ~60 us an event in Python, seconds for the Python tracer's tens of thousands.
    Parents as there: per thread, the innermost enclosing interval (async events get none)."""
    results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if results is None:  # another torch: the documented (slower) way
        return prof.events()
    cpu = torch.autograd.DeviceType.CPU
    events, threads = [], {}
    for raw in results.events():
        name = raw.name()
        if name in _HIDDEN or getattr(raw, "is_hidden_event", lambda: False)():
            continue
        event = _Event(name, raw.device_type(), raw.activity_type(), raw.start_ns(), raw.end_ns())
        events.append(event)
        if event.device_type == cpu and raw.start_thread_id() == raw.end_thread_id():
            threads.setdefault(raw.start_thread_id(), []).append(event)
    for thread_events in threads.values():
        thread_events.sort(key=lambda e: (e.start, -e.end))
        stack: list[_Event] = []
        for event in thread_events:
            while stack and (event.start >= stack[-1].end or event.end > stack[-1].end):
                stack.pop()
            if stack:
                event.cpu_parent = stack[-1]
            stack.append(event)
    return events


_initialized: set[tuple] = set()


def _init_profiler(activities) -> None:
    """Start kineto once on this (the caller's) thread with the same activities, before the compute thread profiles:
    kineto expects its first start on the thread that registered its client (else it prints an error and skips
    that client's set-up)."""
    key = tuple(sorted(str(a) for a in activities))
    if key in _initialized:
        return
    with profile(activities=activities):
        pass
    _initialized.add(key)


def markdown_table(counts: list[LaunchCount]) -> str:
    """One row per (path, rows): the counts that compare paths; the top ops follow the table."""
    def fmt(value, digits: int = 1) -> str:
        if value is None:
            return "-"
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    head = ["path", "step", "rows", "ops", "aten ops", "ops/layer", "ops in a block", "outside blocks",
            "mask builds", "mask ops", "launches", "launches/layer", "graph launches", "copies", "device kernels"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in counts:
        block = c.block_ops_mean
        cells = [c.path, c.step, c.rows, c.ops, c.aten_ops, c.ops_per_layer, block, c.outside_blocks,
                 c.mask_builds, c.mask_ops, c.launches, c.launches_per_layer, c.graph_launches, c.copies,
                 c.device_kernels]
        lines.append("| " + " | ".join(fmt(v) for v in cells) + " |")
    lines.append("")
    for c in counts:
        ops = ", ".join(f"{name} {n}" for name, n in c.top_ops)
        lines.append(f"- top ops, {c.path}, {c.rows} rows: {ops}")
    return "\n".join(lines)
