"""What the relay's Python is doing: CPU samples, tasks and threads, the heap.

These are the Python counterparts of derper's ``/debug/pprof`` pages.  The
CPU profiler samples the interrupted frame on ``SIGPROF`` (``setitimer``
fires it per CPU time consumed, so an idle relay takes no samples) and
writes collapsed stacks, the text format flamegraph.pl, inferno and
speedscope open.  Everything here reads the interpreter's state; nothing
changes the relay's behaviour, except that ``tracemalloc`` slows allocation
while it traces.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
import threading
import traceback
import tracemalloc
from collections import Counter
from types import FrameType

SAMPLE_INTERVAL = 0.01
"""Seconds of CPU time between samples: 100 Hz, as pprof's default."""

MAX_PROFILE_SECONDS = 120
"""A profile request longer than this is probably a typo."""

HEAP_TOP = 30
"""Allocation sites and object types listed by the heap summary."""


def frame_label(frame: FrameType) -> str:
    """``function (file:line)``; a collapsed-stack frame may not contain ``;``."""
    code = frame.f_code
    return f"{code.co_qualname} ({code.co_filename}:{code.co_firstlineno})".replace(";", ":")


def stack_of(frame: FrameType | None) -> tuple[str, ...]:
    """The labels of ``frame`` and its callers, outermost first."""
    labels = []
    while frame is not None:
        labels.append(frame_label(frame))
        frame = frame.f_back
    return tuple(reversed(labels))


def collapse(samples: Counter[tuple[str, ...]]) -> str:
    """Collapsed-stack text: ``outer;inner;leaf count`` per line, busiest first."""
    return "".join(f"{';'.join(stack)} {count}\n" for stack, count in samples.most_common() if stack)


class ProfilerBusyError(RuntimeError):
    """Another CPU profile is being taken; there is one SIGPROF timer per process."""


class CpuProfiler:
    """Samples the main thread's Python stack on SIGPROF for a while."""

    def __init__(self) -> None:
        self.samples: Counter[tuple[str, ...]] = Counter()
        self._running = False

    def _on_sample(self, signum: int, frame: FrameType | None) -> None:
        self.samples[stack_of(frame)] += 1

    async def profile(self, seconds: float) -> str:
        """Sample for ``seconds`` of wall time; returns collapsed stacks."""
        if self._running:
            raise ProfilerBusyError("a CPU profile is already being taken; try again when it is done")
        self._running = True
        self.samples = Counter()
        previous = signal.signal(signal.SIGPROF, self._on_sample)
        signal.setitimer(signal.ITIMER_PROF, SAMPLE_INTERVAL, SAMPLE_INTERVAL)
        try:
            await asyncio.sleep(seconds)
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0, 0)
            signal.signal(signal.SIGPROF, previous)
            self._running = False
        return collapse(self.samples)


def task_dump() -> str:
    """Every asyncio task with its stack, then every thread's: the goroutine page's peer."""
    out: list[str] = []
    tasks = sorted(asyncio.all_tasks(), key=lambda task: task.get_name())
    out.append(f"{len(tasks)} asyncio tasks\n")
    for task in tasks:
        state = "done" if task.done() else "pending"
        out.append(f"\ntask {task.get_name()!r} ({state}): {task.get_coro()!r}\n")
        for frame in task.get_stack():
            code = frame.f_code
            out.append(f"    {code.co_filename}:{frame.f_lineno} in {code.co_qualname}\n")
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    frames = sys._current_frames()
    out.append(f"\n{len(frames)} threads\n")
    for ident, frame in frames.items():
        out.append(f"\nthread {names.get(ident, ident)!r}:\n")
        out.extend(traceback.format_stack(frame))
    return "".join(out)


def object_counts(top: int = HEAP_TOP) -> list[tuple[str, int]]:
    """The most numerous types among objects the garbage collector tracks."""
    counts = Counter(type(obj).__qualname__ for obj in gc.get_objects())
    return counts.most_common(top)


def heap_summary(*, stop: bool = False) -> str:
    """tracemalloc's top allocation sites (tracing starts on the first call), and object counts."""
    out: list[str] = []
    if stop:
        tracemalloc.stop()
        out.append("tracemalloc stopped.\n")
    elif not tracemalloc.is_tracing():
        tracemalloc.start()
        out.append(
            "tracemalloc started now: reload for the allocations made since "
            "(it slows allocation while on; ?stop=1 stops it).\n"
        )
    else:
        snapshot = tracemalloc.take_snapshot()
        current, peak = tracemalloc.get_traced_memory()
        out.append(f"traced: {current} bytes now, {peak} at peak\n\ntop {HEAP_TOP} allocation sites:\n")
        for stat in snapshot.statistics("lineno")[:HEAP_TOP]:
            out.append(f"{stat.size:>12} B {stat.count:>8} blocks  {stat.traceback}\n")
    out.append("\nobjects tracked by the garbage collector, by type:\n")
    out.extend(f"{count:>10}  {name}\n" for name, count in object_counts())
    return "".join(out)


def collect_garbage() -> str:
    """derper's /debug/gc, for Python's collector: a full collection, and what it found."""
    before = sum(stat["collected"] for stat in gc.get_stats())
    found = gc.collect()
    after = sum(stat["collected"] for stat in gc.get_stats())
    return f"running GC...\nDone: {found} unreachable objects, {after - before} collected.\n"
