"""Stopping a run when asked to (SIGTERM, a scheduler's pre-emption), at a batch boundary.

Ctrl-C raises KeyboardInterrupt wherever Python happens to be; every write is atomic, so the
run folder stays intact and a rerun resumes from the last finished epoch. A scheduler asks with
SIGTERM (``scancel``, ``scontrol requeue``, pre-emption; Slurm sends SIGKILL after KillWait)
and, through submitit, with USR2 before a time limit. Without a handler SIGTERM kills the
process before Python's cleanup, and submitit's job wrapper even ignores it (the cell trained
on until the SIGKILL). Here such a request is deferred to the next batch boundary while the
loop runs (:func:`check`, called at each one), so a checkpoint or record being written is
finished first and the process stops within one batch. Outside the loop (building the data)
there is no boundary to wait for, and the request acts at once.

A request raises :class:`StopRequested`, a KeyboardInterrupt: whatever handles Ctrl-C handles
it the same way (the CLI's "interrupted ... rerun to resume" line, a grid worker's exit). A
signal may instead be given an action (submitit's checkpoint-and-requeue for USR2), run at the
boundary in place of raising.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any


class StopRequested(KeyboardInterrupt):
    """A signal asked the run to stop; the last finished epoch is checkpointed."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signal_name}")


_pending: int | None = None  # the signal waiting for a batch boundary
_deferring = 0  # depth of at_batch_boundaries() blocks
_actions: dict[int, Callable[[], None]] = {}  # what a signal does instead of raising StopRequested


def _act(signum: int) -> None:
    global _pending
    _pending = None
    action = _actions.get(signum)
    if action is not None:
        action()
    raise StopRequested(signum)


def _handler(signum: int, frame: Any) -> None:
    global _pending
    if _deferring and _pending is None:
        _pending = signum  # finish the batch (and any write in progress) first
        return
    _act(signum)  # outside the loop, or asked twice: now


def check() -> None:
    """At a batch boundary: stop if a signal asked to (raises StopRequested, or runs the
    signal's action)."""
    if _pending is not None:
        _act(_pending)


def pending() -> str | None:
    """The name of the signal waiting for a batch boundary, if any."""
    return signal.Signals(_pending).name if _pending is not None else None


@contextlib.contextmanager
def at_batch_boundaries() -> Iterator[None]:
    """Inside this block a stop request waits for the next :func:`check` instead of
    interrupting whatever runs (the training loop, a checkpoint being written)."""
    global _deferring
    check()  # a request that came before the loop acts now
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1


@contextlib.contextmanager
def handled(*signums: int, actions: Mapping[int, Callable[[], None]] | None = None) -> Iterator[None]:
    """Handle ``signums`` as stop requests inside the block (previous handlers restored after
    it). ``actions[s]`` runs at the boundary instead of raising StopRequested for signal ``s``.
    Signal handlers belong to the main thread: elsewhere this does nothing."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in signums}
    saved_actions = dict(_actions)
    _actions.update(actions or {})
    for s in signums:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
        _actions.clear()
        _actions.update(saved_actions)
        _pending = None
