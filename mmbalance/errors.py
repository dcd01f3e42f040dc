"""User-facing errors.

Every problem a researcher can cause from the command line (a typo in a method name, a data
root that is not there, a bad ``--set`` value) raises :class:`MMBalanceError` with one
paragraph that names the problem and the fix. The CLI prints that paragraph and exits
non-zero instead of dumping a traceback; programming errors keep their tracebacks.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping


class MMBalanceError(Exception):
    """A problem with the user's input, explained in one paragraph.

    ``choices`` is the part of the paragraph that lists the valid choices (every config key,
    every method): a grid with many bad cells prints each cell's ``short`` problem on its own
    line and each distinct ``choices`` once, instead of the same long list per cell.
    """

    def __init__(self, message: str = "", *, choices: str = "") -> None:
        super().__init__(f"{message}\n{choices}" if choices else message)
        self.short = message
        self.choices = choices


class ConfigError(MMBalanceError):
    """Unknown configuration key or bad value."""


class DataError(MMBalanceError):
    """Missing or malformed data on disk."""


class UnsupportedError(MMBalanceError):
    """A method refuses a setting its paper does not define (e.g. OGM-GE with 3 modalities)."""


class TrainingDiverged(MMBalanceError):
    """The training loss became NaN or infinite: the run cannot go on (a tuning trial counts it
    as a bad configuration; a grid reports the cell as failed)."""

    def __init__(self, message: str, epoch: int) -> None:
        super().__init__(message)
        self.epoch = epoch


def _plain(word: str) -> str:
    """A name without case, hyphens or underscores: ``OGM-GE``, ``ogm_ge`` and ``ogmge`` agree."""
    return re.sub(r"[^a-z0-9]", "", word.lower())


def closest(word: str, choices: Iterable[str], aliases: Mapping[str, str] | None = None) -> str | None:
    """The choice ``word`` most likely means, or None. ``aliases`` maps other names to choices
    (``ogm_ge`` -> ``ogm``): an alias spelled any way wins over a merely similar name, so the
    paper's name of a method suggests that method, not the one whose letters happen to be closer."""
    names = list(choices)
    aliases = dict(aliases or {})
    plain = _plain(word)
    for alias, name in aliases.items():
        if _plain(alias) == plain:
            return name
    for name in names:
        if _plain(name) == plain:
            return name
    close = difflib.get_close_matches(word, names + list(aliases), n=1)
    return aliases.get(close[0], close[0]) if close else None


def did_you_mean(word: str, choices: Iterable[str], aliases: Mapping[str, str] | None = None) -> str:
    """A ' Did you mean X?' suffix when a close match exists, else ''."""
    close = closest(word, choices, aliases)
    return f" Did you mean '{close}'?" if close else ""

