"""Stopping cleanly when the cluster asks: SIGUSR1 (slurm's warning before a time limit, passed on by the batch
script) or SIGTERM (preemption, ``scancel``) only sets a flag; the trainer asks :func:`stop_agreed` at every step
boundary, writes a checkpoint and raises :class:`Preempted`, and ``cpt`` exits with :data:`EXIT_CODE` so that a
requeued job (``cpt run RECIPE --auto-resume``) continues from that checkpoint. Ctrl-C (SIGINT) does the same
the first time; a second Ctrl-C stops at once (``KeyboardInterrupt``), without a checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
from typing import Iterator

# EX_TEMPFAIL from sysexits.h: a temporary failure, run the same command again later.
EXIT_CODE = 75
SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

_received: list[str] = []
log = logging.getLogger(__name__)


class Preempted(Exception):
    """Raised by the trainer after it wrote the checkpoint a stop signal asked for; not an error."""


def _note(signum: int, frame) -> None:
    name = signal.Signals(signum).name
    if name == "SIGINT":
        if "SIGINT" in _received:
            raise KeyboardInterrupt
        log.warning("Ctrl-C: stopping after this step with a checkpoint; press Ctrl-C again to stop now without one")
    _received.append(name)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """While active, SIGUSR1, SIGTERM and a first SIGINT ask for a stop at the next step instead of killing the
    process; a second SIGINT raises ``KeyboardInterrupt``.

    Outside it (data preparation, model loading) the signals keep their usual effect: nothing is lost by
    dying before the first step. Signal handlers can only be set in the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = {sig: signal.signal(sig, _note) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def received() -> str | None:
    """The first stop signal this process received inside :func:`stop_signals` (e.g. ``"SIGUSR1"``), or None."""
    return _received[0] if _received else None


def stop_agreed(accelerator) -> bool:
    """Whether any rank received a stop signal. Every rank calls this at the same step boundary, so all of them
    stop at the same step even when the signal reaches them at different times (no rank is left in a collective).
    """
    if accelerator.num_processes == 1:
        return bool(_received)
    import torch

    flag = torch.tensor([1.0 if _received else 0.0], device=accelerator.device)
    return accelerator.reduce(flag, "sum").item() > 0


@contextlib.contextmanager
def forwarded_to(process: subprocess.Popen) -> Iterator[None]:
    """While a child ``cpt`` process runs, pass SIGUSR1 and SIGTERM on to it instead of dying, so that it can
    checkpoint and exit with :data:`EXIT_CODE` (``cpt sweep`` runs each grid point this way). SIGINT is passed
    on only to a child in another process group: one in ours got the terminal's Ctrl-C itself, and a second
    copy would read as the second Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame):
        with contextlib.suppress(ProcessLookupError):  # it has just ended
            if signum != signal.SIGINT or os.getpgid(process.pid) != os.getpgrp():
                process.send_signal(signum)
    previous = {sig: signal.signal(sig, forward) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
