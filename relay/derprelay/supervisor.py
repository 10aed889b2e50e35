"""``derp-relay --workers N``: N processes that are one relay, and the parent that watches them.

One asyncio process uses one core.  With N workers the parent binds N
listening sockets to the DERP port and N UDP sockets to the STUN port, all with
``SO_REUSEPORT`` so the kernel spreads connections and datagrams over them,
makes a Unix socketpair for every pair of workers (``derprelay.workerlinks``),
and forks; each worker keeps its own sockets and closes the rest, so the
relay's key, certificate and ports are the parent's, resolved once.

The parent only supervises.  SIGTERM or SIGINT to it is passed to every
worker, each sends ``Restarting`` to its clients, and the relay exits 0 once
all have.  A worker that dies any other way takes the relay down with it:
the parent stops the others (their clients get ``Restarting``) and exits 1,
and the kubelet (or systemd) restarts the pod.  Restarting one worker in
place would keep the other workers' clients connected, but it needs fresh
socketpairs handed to running workers; one restart policy, the
orchestrator's, is simpler to get right.  A worker whose parent is gone
notices its lifeline pipe close and stops too.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .listener import bind_sockets

log = logging.getLogger("derprelay.supervisor")

WORKER_STOP_TIMEOUT = 15.0
"""Seconds workers get to say Restarting and exit before they are killed."""

_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}


# --- how many workers --------------------------------------------------------------


def cpu_max_cores(cpu_max: str) -> float | None:
    """cgroup v2 ``cpu.max`` (``"150000 100000"`` or ``"max 100000"``) as cores; None: no quota."""
    quota, _, period = cpu_max.strip().partition(" ")
    if quota == "max" or not period:
        return None
    return int(quota) / int(period)


def cfs_quota_cores(quota_us: str, period_us: str) -> float | None:
    """cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` as cores; None: no quota (-1)."""
    quota = int(quota_us.strip())
    return None if quota <= 0 else quota / int(period_us.strip())


def cgroup_cpu_quota(proc_self_cgroup: str, root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The tightest CPU quota, in cores, on this process's cgroup or any parent of it.

    ``proc_self_cgroup`` is the text of ``/proc/self/cgroup``.  A container
    sees its own cgroup at the root of the mount while ``/proc/self/cgroup``
    may name the host's path, so the walk goes up to the mount's root.
    """
    quotas: list[float] = []
    for line in proc_self_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2, the unified hierarchy
            mounts = [root]
        elif "cpu" in controllers.split(","):
            mounts = [root / controllers, root / "cpu"]
        else:
            continue
        for mount in mounts:
            directory = mount / path.lstrip("/")
            while True:
                found = _read_quota(directory, v2=controllers == "")
                if found is not None:
                    quotas.append(found)
                if directory == mount or mount not in directory.parents:
                    break
                directory = directory.parent
    return min(quotas, default=None)


def _read_quota(directory: Path, *, v2: bool) -> float | None:
    try:
        if v2:
            return cpu_max_cores((directory / "cpu.max").read_text())
        return cfs_quota_cores(
            (directory / "cpu.cfs_quota_us").read_text(), (directory / "cpu.cfs_period_us").read_text()
        )
    except (OSError, ValueError):
        return None


def workers_for(cpus: int, quota: float | None) -> int:
    """Workers for ``cpus`` usable CPUs under a quota of ``quota`` cores (nearest, halves up, ≥ 1)."""
    count = cpus if quota is None else min(cpus, math.floor(quota + 0.5))
    return max(1, count)


def default_workers() -> int:
    """One worker per core this process may use: its CPU affinity, capped by its cgroup quota."""
    try:
        proc_self_cgroup = Path("/proc/self/cgroup").read_text()
    except OSError:
        proc_self_cgroup = ""
    return workers_for(len(os.sched_getaffinity(0)), cgroup_cpu_quota(proc_self_cgroup))


# --- the shared sockets -------------------------------------------------------------


@dataclass
class SharedSockets:
    """Every worker's listening sockets, bound to the same ports."""

    derp: list[socket.socket]
    stun: list[socket.socket | None]
    derp_port: int
    stun_port: int

    def all(self) -> list[socket.socket]:
        return [*self.derp, *(s for s in self.stun if s is not None)]


def bind_shared(host: str, port: int, stun_port: int | None, count: int) -> SharedSockets:
    """Bind ``count`` DERP (TCP) and STUN (UDP) sockets each to one port; port 0 picks one for all."""
    derp = bind_sockets(host, port, socket.SOCK_STREAM, count)
    stun: list[socket.socket | None] = [None] * count
    bound_stun = 0
    if stun_port is not None:
        try:
            stun = list(bind_sockets(host, stun_port, socket.SOCK_DGRAM, count))
        except OSError:
            for sock in derp:
                sock.close()
            raise
        first = stun[0]
        assert first is not None
        bound_stun = first.getsockname()[1]
    return SharedSockets(derp, stun, derp[0].getsockname()[1], bound_stun)


# --- forking and watching --------------------------------------------------------------


@dataclass
class WorkerSetup:
    """What one worker process starts with."""

    index: int
    count: int
    derp_socket: socket.socket
    stun_socket: socket.socket | None
    links: dict[int, socket.socket]
    """This worker's end of the socketpair to each other worker, by that worker's index."""
    lifeline: int
    """Read end of a pipe the parent holds open: end of file means the parent is gone."""
    ready: int
    """Write one byte here once serving."""


def run_workers(
    count: int,
    shared: SharedSockets,
    body: Callable[[WorkerSetup], int],
    on_ready: Callable[[list[int]], None],
) -> int:
    """Fork ``count`` workers running ``body``; supervise them; the relay's exit code.

    ``on_ready`` runs in the parent with the workers' pids once every worker
    serves.  ``body`` runs in each child and returns its exit code.
    """
    pairs = {
        (a, b): socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for a, b in itertools.combinations(range(count), 2)
    }
    pair_ends = [end for pair in pairs.values() for end in pair]
    lifeline_read, lifeline_write = os.pipe()
    ready_read, ready_write = os.pipe()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    pids: dict[int, int] = {}
    try:
        for index in range(count):
            links = {
                other: pairs[min(index, other), max(index, other)][0 if index < other else 1]
                for other in range(count)
                if other != index
            }
            setup = WorkerSetup(
                index, count, shared.derp[index], shared.stun[index], links, lifeline_read, ready_write
            )
            pid = os.fork()
            if pid == 0:
                keep = {setup.derp_socket, setup.stun_socket, *links.values()}
                for sock in [*shared.all(), *pair_ends]:
                    if sock not in keep:
                        sock.close()
                os.close(lifeline_write)
                os.close(ready_read)
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                _child(body, setup)
            pids[pid] = index
    finally:
        for sock in [*shared.all(), *pair_ends]:
            sock.close()
        os.close(lifeline_read)
        os.close(ready_write)
    try:
        return _supervise(pids, ready_read, on_ready)
    finally:
        os.close(lifeline_write)
        os.close(ready_read)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _child(body: Callable[[WorkerSetup], int], setup: WorkerSetup) -> None:
    """Run a worker and leave the process without unwinding into the parent's stack."""
    code = 1
    try:
        code = body(setup)
    except BaseException:
        log.exception("worker %d failed", setup.index)
    finally:
        logging.shutdown()
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


class _Supervision:
    """The parent's view of its workers while it waits for them."""

    def __init__(self, pids: dict[int, int]) -> None:
        self.live = dict(pids)
        self.exit_code = 0
        self.stop_deadline: float | None = None

    def stop_all(self, why: str) -> None:
        if self.stop_deadline is not None:
            return
        log.info("stopping %d workers: %s", len(self.live), why)
        self.stop_deadline = time.monotonic() + WORKER_STOP_TIMEOUT
        for pid in self.live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def reap(self, starting: bool) -> None:
        while self.live:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.live.clear()
                return
            if pid == 0:
                return
            index = self.live.pop(pid, None)
            if index is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if code == 0:
                self.stop_all(f"worker {index} stopped")
                continue
            how = f"exit status {code}" if code > 0 else f"signal {signal.Signals(-code).name}"
            log.error("worker %d (pid %d) died: %s", index, pid, how)
            if self.exit_code == 0:
                self.exit_code = 2 if starting and code == 2 else 1  # 2: it said why (a config error)
            self.stop_all(f"worker {index} died; exiting {self.exit_code} to be restarted")


def _supervise(pids: dict[int, int], ready_read: int, on_ready: Callable[[list[int]], None]) -> int:
    os.set_blocking(ready_read, False)
    state = _Supervision(pids)
    ready = 0
    while state.live:
        if ready < len(pids):
            with contextlib.suppress(BlockingIOError):
                ready += len(os.read(ready_read, len(pids)))
            if ready == len(pids) and state.stop_deadline is None:
                on_ready(list(pids))
        waiting = ready < len(pids) or state.stop_deadline is not None
        info = signal.sigtimedwait(_SIGNALS, 0.05 if waiting else 1.0)
        if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
            state.stop_all(f"got {signal.Signals(info.si_signo).name}")
        state.reap(starting=ready < len(pids))
        if state.stop_deadline is not None and time.monotonic() > state.stop_deadline:
            for pid in state.live:
                log.error("worker pid %d did not stop in %gs; killing it", pid, WORKER_STOP_TIMEOUT)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            state.stop_deadline = math.inf
    return state.exit_code
