"""User-facing errors.

Every problem a researcher can cause from the command line (a typo in a method name, a data
root that is not there, a bad ``--set`` value) raises :class:`MMBalanceError` with one
paragraph that names the problem and the fix. The CLI prints that paragraph and exits
non-zero instead of dumping a traceback; programming errors keep their tracebacks.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MMBalanceError(Exception):
    """A problem with the user's input, explained in one paragraph."""


class ConfigError(MMBalanceError):
    """Unknown configuration key or bad value."""


class DataError(MMBalanceError):
    """Missing or malformed data on disk."""


class UnsupportedError(MMBalanceError):
    """A method refuses a setting its paper does not define (e.g. OGM-GE with 3 modalities)."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' Did you mean X?' suffix when a close match exists, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""
