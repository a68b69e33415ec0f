"""The safety analyzer's error: bad input, reported to the user as one message."""

from __future__ import annotations

from probe.errors import ProbeError


class SafetyError(ProbeError):
    """Bad input to the safety-heads analysis (empty prompt set, unknown template, ...)."""
