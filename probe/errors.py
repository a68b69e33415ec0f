"""User-facing errors: every mistake a user can make maps to one of these, with the fix in its text.

The CLI and the app print `str(error)` for a `ProbeError` instead of a traceback.
"""


class ProbeError(Exception):
    """Base class for errors caused by user input or a missing setup step."""


class AssetMissingError(ProbeError):
    """An offline asset (model weights, data) is not in the cache, or is corrupt."""


class AssetCorruptError(AssetMissingError):
    """An offline asset is in the cache but its bytes (or its marker) differ from what was verified."""


class UnknownModelError(ProbeError):
    """A model spec that the registry does not know."""


class HeadError(ProbeError):
    """A head address that cannot be parsed or does not exist in the model."""


class PromptTooLongError(ProbeError):
    """A prompt that does not fit in the model's context window."""


class InterventionError(ProbeError):
    """An intervention that cannot be applied as specified."""
