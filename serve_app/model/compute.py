"""The compute thread: one thread per process runs the model's torch work (loading, engine steps, one-at-a-time
generation), whichever thread asks for it.

Why one: PyTorch's CPU kernels parallelize with GNU OpenMP, which gives every thread that starts a parallel region a
worker pool of its own. Once a second thread has one (the model loaded on the caller's thread, then decoded on the
engine's), OpenMP counts more threads than cores and its workers stop spinning between regions; each of the thousands
of regions in a decode step then waits for a sleeping worker to wake. On the 2-core dev box the same decode ran
25-60% slower on a second thread than on the thread that loaded the model (docs/benchmarks.md, "One compute
thread"); with one thread doing both, it runs as fast as on the main thread. On a GPU it also keeps the thread-local
CUDA state (current device and stream, graph capture) in one place.

Two kinds of work share the thread:

- Jobs. `run(fn)` calls fn there and waits; called from the compute thread itself it just calls fn (no deadlock).
  `submit(fn)` queues fn and returns its Future. Jobs run one at a time in submission order, so a long one (loading
  a 6B checkpoint) holds up everything else: one model per process, as a Serve replica has, is what this is for.
- Loops. `serve(step)` makes the thread itself call `step()` again and again while it reports more work, between
  jobs (one job, then one step of each loop with work, and so on), and sleep on a condition variable when no loop
  has work and no job is queued; `Loop.wake()` says that there may be work again. The engine's scheduling loop is
  one: a step is a plain call on this thread, with no Future and no thread switch.
"""

from __future__ import annotations

import atexit
import functools
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")

logger = logging.getLogger(__name__)

_cond = threading.Condition()  # guards everything below; the compute thread sleeps on it
_jobs: deque[tuple[Future, Callable, tuple, dict]] = deque()
_loops: list[Loop] = []
_thread: threading.Thread | None = None
_exiting = False


class Loop:
    """A step function that the compute thread calls while it has work (see `serve`)."""

    def __init__(self, step: Callable[[], bool], name: str):
        self._step = step
        self.name = name
        self._ready = True  # call step at the next turn; guarded by _cond
        self._stop = False
        self.stopped: Future[None] = Future()  # done once the thread will not call step again

    def wake(self) -> None:
        """There may be work: call step at the thread's next turn (from any thread)."""
        with _cond:
            self._ready = True
            _cond.notify()

    def stop(self) -> None:
        """Call step no more, after the one running now if any; `stopped` is done then (from any thread)."""
        with _cond:
            self._stop = self._ready = True
            _cond.notify()

    @property
    def alive(self) -> bool:
        return not self.stopped.done() and _thread is not None and _thread.is_alive()


def _start() -> None:
    """_cond held. The compute thread, once."""
    global _thread
    if _exiting:
        raise RuntimeError("the compute thread has stopped: the interpreter is exiting")
    if _thread is None:
        _thread = threading.Thread(target=_main, name="torch-compute", daemon=True)
        _thread.start()


def _main() -> None:
    while True:
        try:
            if not _turn():
                return
        except Exception:  # a fault in the thread's own bookkeeping must not leave every later job waiting forever
            logger.exception("compute thread turn failed; carrying on")


def _turn() -> bool:
    """One job if one is queued, then one step of each loop with work; False when the thread is to end. A function
    of its own so that nothing it ran (a result, an argument, a stopped loop and its engine) stays referenced while
    the thread sleeps."""
    with _cond:
        while not (_exiting or _jobs or any(loop._ready for loop in _loops)):
            _cond.wait()
        if _exiting:
            return False
        job = _jobs.popleft() if _jobs else None
        due = [loop for loop in _loops if loop._ready]
        for loop in due:
            if loop._stop:
                _loops.remove(loop)
            loop._ready = False  # a wake() from now on calls step again
    if job is not None:
        future, fn, args, kwargs = job
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)
    for loop in due:
        if loop._stop:
            _end(loop)
            continue
        try:
            more = loop._step()
        except BaseException as exc:  # the loop's own handling failed: it ends, the thread carries on
            logger.exception("compute loop %s failed; it is stopped", loop.name)
            with _cond:
                _loops.remove(loop)
            _end(loop, exc)
            continue
        if more:
            with _cond:
                loop._ready = True
    return True


def _end(loop: Loop, error: BaseException | None = None) -> None:
    """The loop is out of _loops: drop its step (and whatever the step holds, such as an engine) and say so."""
    loop._step = None
    if error is None:
        loop.stopped.set_result(None)
    else:
        loop.stopped.set_exception(error)


@atexit.register
def _exit() -> None:
    """At interpreter exit: let the job or step running now finish (as the executor this replaces did), then stop;
    what is still queued never runs."""
    global _exiting
    with _cond:
        _exiting = True
        _cond.notify()
        thread = _thread
    if thread is not None and thread is not threading.current_thread():
        thread.join()


def on_compute_thread() -> bool:
    return _thread is not None and threading.current_thread() is _thread


def submit(fn: Callable[..., T], *args, **kwargs) -> Future[T]:
    """Queue fn(*args, **kwargs) on the compute thread."""
    future: Future[T] = Future()
    with _cond:
        _start()
        _jobs.append((future, fn, args, kwargs))
        _cond.notify()
    return future


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


def serve(step: Callable[[], bool], name: str = "loop") -> Loop:
    """Have the compute thread call `step()` from now on, between jobs, until `Loop.stop()`.

    step returns True when it may have more to do at once (it is called again at the next turn) and False when it
    has nothing to do until someone calls `wake()`. A step that raises stops its loop (`stopped` holds the error)."""
    loop = Loop(step, name)
    with _cond:
        _start()
        _loops.append(loop)
        _cond.notify()
    return loop
