"""The thread policy: re-decided while a job runs, from the other processes' CPU use only."""

from __future__ import annotations

import os

import pytest
import torch

from probe import runtime
from probe.errors import ProbeError


class FakeMachine:
    """A clock, the machine's busy CPU seconds and this process's own, advanced by hand."""

    def __init__(self) -> None:
        self.now = 100.0
        self.busy = 1000.0
        self.own = 10.0

    def run(self, seconds: float, own_cores: float, other_cores: float) -> None:
        self.now += seconds
        self.own += own_cores * seconds
        self.busy += (own_cores + other_cores) * seconds

    def policy(self, cores: int = 2) -> runtime.AdaptiveThreads:
        return runtime.AdaptiveThreads(cores=cores, interval=2.0, clock=lambda: self.now,
                                       busy_reader=lambda: self.busy, own_reader=lambda: self.own)


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    runtime._adaptive = None
    torch.set_num_threads(before)


def test_threads_for_leaves_the_busy_cores_to_others():
    assert [runtime.threads_for(2, others) for others in (0.0, 0.2, 0.5, 1.0, 1.9, 3.0)] == [2, 2, 1, 1, 1, 1]
    assert runtime.threads_for(8, 2.0) == 6


def test_own_threads_never_count_as_load():
    """The scan's own two busy threads are not "another process": the choice stays at two cores
    (the old policy read the load average, which counts them)."""
    machine = FakeMachine()
    policy = machine.policy()
    policy._last = policy.sample()
    policy.threads = 2
    machine.run(3.0, own_cores=2.0, other_cores=0.0)
    assert policy.check() == 2 and policy.others == pytest.approx(0.0)


def test_a_machine_that_becomes_busy_mid_run_drops_to_one_thread_and_back():
    machine = FakeMachine()
    policy = machine.policy()
    policy._last = policy.sample()
    policy.threads = 2
    machine.run(3.0, own_cores=2.0, other_cores=0.0)
    assert policy.check() == 2 and torch.get_num_threads() == 2
    machine.run(3.0, own_cores=1.3, other_cores=0.7)  # a busy loop starts: it gets ~0.7 core against us
    assert policy.check() == 1 and torch.get_num_threads() == 1
    machine.run(1.0, own_cores=1.0, other_cores=0.0)  # within the interval: no new measurement
    assert policy.check() == 1
    machine.run(3.0, own_cores=1.0, other_cores=0.0)  # it ended
    assert policy.check() == 2 and torch.get_num_threads() == 2
    assert [threads for _, threads, _ in policy.changes] == [1, 2]


def test_every_forward_polls_in_automatic_mode(monkeypatch, tiny_gqa):
    """Analyzers need not cooperate: every forward through a LoadedModel polls the policy, on the
    thread that computes (torch's thread count is per calling thread under OpenMP)."""
    machine = FakeMachine()
    policy = machine.policy()
    monkeypatch.setattr(runtime, "AdaptiveThreads", lambda: policy)
    monkeypatch.setattr(runtime.time, "sleep", lambda seconds: machine.run(seconds, 0.0, 0.0))
    assert runtime.set_threads(0) == 2
    ids = tiny_gqa.encode("the capital of mary is")
    machine.run(3.0, own_cores=1.0, other_cores=1.0)
    tiny_gqa.logits(ids)
    assert torch.get_num_threads() == 1
    machine.run(3.0, own_cores=1.0, other_cores=0.0)
    tiny_gqa.hf_model(ids)  # a direct HF call polls too
    assert torch.get_num_threads() == 2
    runtime.set_threads(2)  # an explicit count switches the automatic policy off
    machine.run(3.0, own_cores=1.0, other_cores=1.0)
    tiny_gqa.logits(ids)
    assert runtime.adaptive_policy() is None and torch.get_num_threads() == 2


@pytest.mark.parametrize("requested", [-1, 100000])
def test_impossible_thread_counts_are_clear_errors(requested):
    with pytest.raises(ProbeError, match="--threads must be between 1 and"):
        runtime.set_threads(requested)


def test_large_blocks_mapped_sets_and_restores_the_mmap_threshold(monkeypatch):
    """Inside the block glibc maps allocations from MAPPED_BLOCK_BYTES up; on exit (also on an error) the
    threshold goes to 32 MiB; without glibc nothing is called and the block says so."""
    from probe import runtime

    calls: list[tuple[int, int]] = []

    class FakeLibc:
        def mallopt(self, parameter: int, value: int) -> int:
            calls.append((parameter, value))
            return 1

    monkeypatch.setattr(runtime, "_libc", FakeLibc())
    with pytest.raises(RuntimeError), runtime.large_blocks_mapped() as took:
        assert took is True and calls == [(runtime.M_MMAP_THRESHOLD, runtime.MAPPED_BLOCK_BYTES)]
        raise RuntimeError("inside")
    assert calls[-1] == (runtime.M_MMAP_THRESHOLD, runtime.GROWN_THRESHOLD_BYTES) and len(calls) == 2
    monkeypatch.setattr(runtime, "_libc", False)
    with runtime.large_blocks_mapped() as took:
        assert took is False
    assert len(calls) == 2


def test_inside_large_blocks_mapped_a_freed_block_leaves_the_resident_set():
    """On glibc, a freed 16 MiB tensor allocated inside the block is given back at once (its own mapping).
    In a fresh process: in a long one (the suite), free heap chunks would serve the block before a mapping."""
    import subprocess
    import sys

    script = """
import os, torch
from probe import runtime
def resident_mib():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
torch.ones(1 << 22); runtime.release_free_memory()  # let glibc's own threshold grow past 16 MiB first
with runtime.large_blocks_mapped() as took:
    if not took:
        print("skip"); raise SystemExit
    before = resident_mib()
    block = torch.ones(4 << 20)
    grown = resident_mib() - before
    del block
    print(grown, resident_mib() - before)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    if done.stdout.strip() == "skip":
        pytest.skip("not glibc")
    grown, left = (float(x) for x in done.stdout.split())
    assert grown > 12 and left < 4, (grown, left)
