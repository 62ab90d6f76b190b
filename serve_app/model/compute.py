"""The compute thread: one thread per process runs the model's torch work (loading, engine steps, one-at-a-time
generation), whichever thread asks for it.

Why one: PyTorch's CPU kernels parallelize with GNU OpenMP, which gives every thread that starts a parallel region a
worker pool of its own. Once a second thread has one (the model loaded on the caller's thread, then decoded on the
engine's), OpenMP counts more threads than cores and its workers stop spinning between regions; each of the thousands
of regions in a decode step then waits for a sleeping worker to wake. On the 2-core dev box the same decode ran
25-60% slower on a second thread than on the thread that loaded the model (docs/benchmarks.md, "One compute
thread"); with one thread doing both, it runs as fast as on the main thread. On a GPU it also keeps the thread-local
CUDA state (current device and stream, graph capture) in one place.

`run(fn)` calls fn there and waits; called from the compute thread itself it just calls fn (no deadlock).
`submit(fn)` queues fn and returns its Future. Jobs run one at a time in submission order, so a long one (loading a
6B checkpoint) holds up the others: one model per process, as a Serve replica has, is what this is built for.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_thread: threading.Thread | None = None


def _record_thread() -> None:
    global _thread
    _thread = threading.current_thread()


def _get_executor() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(1, thread_name_prefix="torch-compute", initializer=_record_thread)
        return _executor


def on_compute_thread() -> bool:
    return _thread is not None and threading.current_thread() is _thread


def submit(fn: Callable[..., T], *args, **kwargs) -> Future[T]:
    """Queue fn(*args, **kwargs) on the compute thread."""
    return _get_executor().submit(fn, *args, **kwargs)


def run(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs) on the compute thread; its result, or its exception re-raised here."""
    if on_compute_thread():
        return fn(*args, **kwargs)
    return submit(fn, *args, **kwargs).result()


def confined(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator: every call of fn runs on the compute thread (see `run`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return run(fn, *args, **kwargs)

    return wrapper
