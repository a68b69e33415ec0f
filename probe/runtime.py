"""CPU thread policy: how many torch threads a long job should use on a possibly shared machine.

On a small CPU that other jobs also use, OpenMP threads beyond the free cores spin against them
(measured on the 2-core machine: an organism build went from 3-5 s to 15 s per step with 2 threads
at load ~3; a CD-T discovery from ~50 s to 194 s; a demo scan that chose 2 threads at its start took
33 min 45 s once another job started, against 12 min 54 s idle). So the choice is not made once:
in automatic mode every forward through a `LoadedModel` (and every progress report of a scan or an
organism step) calls `poll()`, which checks, at most every `interval` seconds, how much CPU the
*other* processes used since the last check (the machine's busy time from /proc/stat minus this
process's own CPU time, so the job's own threads never count as load), and sets the calling
thread's torch threads to the cores they leave free (at least 1).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from probe.errors import ProbeError

MAX_THREADS_PER_CORE = 4  # more than this is never useful and makes OpenMP fail to create threads


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux /proc/stat), or None elsewhere."""
    try:
        with open("/proc/stat") as handle:
            fields = handle.readline().split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    busy = sum(ticks[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is in user)
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds this process (all its threads) has used."""
    times = os.times()
    return times.user + times.system


def threads_for(cores: int, others: float) -> int:
    """Threads that leave the cores other processes use (`others`, in cores) to them: all cores when
    they use under a quarter of one, one thread when they use most of the rest."""
    return max(1, min(cores, int(cores - others + 0.25)))


@dataclass
class AdaptiveThreads:
    """Re-decides the torch thread count from the other processes' recent CPU use.

    `check()` is cheap when called often: it only measures once `interval` seconds have passed.
    The readers are parameters so that tests can play a machine that becomes busy and idle again.
    """

    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    interval: float = 2.0
    clock: Callable[[], float] = time.monotonic
    busy_reader: Callable[[], float | None] = machine_busy_seconds
    own_reader: Callable[[], float] = own_cpu_seconds
    threads: int = 0
    others: float = 0.0
    changes: list[tuple[float, int, float]] = field(default_factory=list)  # (time, threads, others)
    started: float = 0.0  # clock time of start()
    _last: tuple[float, float, float] | None = None
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def sample(self) -> tuple[float, float, float] | None:
        busy = self.busy_reader()
        return None if busy is None else (self.clock(), busy, self.own_reader())

    def _decide(self, last: tuple[float, float, float], now: tuple[float, float, float]) -> None:
        wall = now[0] - last[0]
        if wall <= 0:
            return
        self.others = max(0.0, ((now[1] - last[1]) - (now[2] - last[2])) / wall)
        wanted = threads_for(self.cores, self.others)
        if wanted != self.threads:
            self.threads = wanted
            self.changes.append((now[0], wanted, round(self.others, 2)))

    def check(self) -> int:
        """Set the calling thread's torch threads if the window is over; returns the current choice."""
        last = self._last
        if last is not None and self.clock() - last[0] >= self.interval and self._guard.acquire(blocking=False):
            try:
                now = self.sample()
                if now is not None:
                    self._decide(last, now)
                    self._last = now
            finally:
                self._guard.release()
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return self.threads

    def start(self, settle: float = 0.3) -> int:
        """First decision from a short sample of the machine before the job starts working
        (all cores where /proc/stat cannot be read)."""
        self.threads = self.cores
        self.started = self.clock()
        first = self.sample()
        if first is not None:
            time.sleep(settle)
            now = self.sample()
            if now is not None:
                self._decide(first, now)
                self._last = now
        torch.set_num_threads(self.threads)
        return self.threads


def release_free_memory() -> bool:
    """Give the heap's free pages back to the system (glibc `malloc_trim`); False where unavailable.

    Long loops of large, differently sized tensors (Duo's training steps) leave glibc's heap
    fragmented: measured on SmolLM2, the resident set rose from 1.2 GB to 2.9 GB over two gate steps
    with ~1.2 GB in use; trimming after each step kept it at 1.2 GB between steps, at no measurable
    cost (95 s vs 98 s for five steps). A fixed mmap threshold would bound it too, but made the
    same steps 50 % slower (page faults on every fresh large tensor).
    """
    libc = _load_libc()
    return bool(libc) and bool(libc.malloc_trim(0))


_libc: ctypes.CDLL | bool | None = None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MAPPED_BLOCK_BYTES = 2 << 20  # allocations from 2 MiB up get their own mapping inside `large_blocks_mapped`
GROWN_THRESHOLD_BYTES = 32 << 20  # glibc's largest dynamic threshold on 64-bit, where it stands in a long torch run


def _load_libc() -> ctypes.CDLL | bool:
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
            _libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            _libc = False
    return _libc


@contextlib.contextmanager
def large_blocks_mapped(threshold: int = MAPPED_BLOCK_BYTES) -> Iterator[bool]:
    """For the block, glibc serves every allocation of `threshold` bytes or more with its own mapping, which
    goes back to the system when freed; yields whether that took effect (False off glibc).

    Why: a loop of long-prompt forwards whose prompts differ in length (retrieval's detection) frees and
    allocates MB-sized activations of ever other sizes, and glibc's heap kept them resident: retrieval's
    quick preset on SmolLM2 (one thread) peaked at 2.2 to 3.0 GB in five runs of the same code, with
    ~1.2 GB live. Mapped from 1 MiB up it peaked at 1.15 GB but ran ~10 % slower (page faults); from
    2 MiB up (the default) at 1.50 GB at unchanged speed (118 s, against 117-128 s); from 4 MiB up it did
    not help (2.7 GB). Not for the whole process: Duo's training allocates many fresh MB-sized tensors
    per step and ran 25 % slower mapped from 1 MiB. On exit the threshold is set to 32 MiB, where glibc's
    own adjustment leaves it in a long torch run (the first `mallopt` switches that adjustment off for
    the process). Process-wide while it lasts: other threads' allocations are mapped too (slower, never
    different)."""
    libc = _load_libc()
    if not libc or not libc.mallopt(M_MMAP_THRESHOLD, threshold):
        yield False
        return
    try:
        yield True
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, GROWN_THRESHOLD_BYTES)


_adaptive: AdaptiveThreads | None = None


def adaptive_policy() -> AdaptiveThreads | None:
    """The running automatic policy (None when threads were set explicitly)."""
    return _adaptive


def poll() -> None:
    """Let the automatic policy re-decide (cheap: a clock read between measurements).

    Called once per model forward and per progress report, not per module: a global module hook
    cost 1.6 us on each of the ~1,800 module calls of one SmolLM2 forward through the bridge, which
    made a busy-machine quick scan 11 % slower than a fixed single thread (13 min 54 s vs 12 min 29 s).
    """
    if _adaptive is not None:
        _adaptive.check()


def check_threads_request(requested: int) -> None:
    """A thread count outside 0..4 x cores is a clear error (OpenMP fails on huge counts, then crashes)."""
    limit = MAX_THREADS_PER_CORE * (os.cpu_count() or 1)
    if requested < 0 or requested > limit:
        raise ProbeError(f"--threads must be between 1 and {limit} on this machine (0 = automatic), not {requested}.")


def set_threads(requested: int | None) -> int:
    """Set torch's intra-op threads; returns the number used now.

    `None` or 0: automatic, re-decided while the job runs (see the module docstring); a number:
    exactly that many for the whole job.
    """
    global _adaptive
    if requested:
        check_threads_request(requested)
        _adaptive = None
        torch.set_num_threads(requested)
        return requested
    _adaptive = AdaptiveThreads()
    return _adaptive.start()
