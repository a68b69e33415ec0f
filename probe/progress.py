"""Progress reports: the one callback type every long-running call of the product takes.

`progress(fraction, message)`: `fraction` done in [0, 1] and a line saying what is running. Analyzers
report through it (`analyses.common` re-exports it), faces turn it into a bar or a printed line, and a
callback may raise to cancel the work. A mapper over items (`probe.parallel.map_items`) reports item
counts instead (`probe.parallel.CountCallback`, `on_count(done, total)`), which its caller turns into its
own `Progress` lines.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[float, str], None]


def no_progress(fraction: float, message: str) -> None:
    """The default progress callback: ignore."""
