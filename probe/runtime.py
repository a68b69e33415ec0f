"""CPU thread policy: how many torch threads a long job should use on a possibly shared machine.

On a small CPU that other jobs also use, OpenMP threads beyond the free cores spin against them
(measured on the 2-core machine: an organism build went from 3-5 s to 15 s per step with 2 threads
at load ~3; a CD-T discovery from ~50 s to 194 s). So a job asks for all cores only when the
machine looks free.
"""

from __future__ import annotations

import os

import torch


def choose_threads(busy_load: float = 1.5) -> int:
    """All cores when the 1-minute load average is below `busy_load`, else one thread."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return cores
    return cores if load < busy_load else 1


def set_threads(requested: int | None) -> int:
    """Set torch's intra-op threads (`None` or 0: `choose_threads()`); returns the number used."""
    threads = requested if requested and requested > 0 else choose_threads()
    torch.set_num_threads(threads)
    return threads
