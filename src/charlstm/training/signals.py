"""Ctrl-C and SIGTERM in training: finish the step, save, then stop with the shell's exit code."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import ClassVar, Self

from charlstm.errors import TrainingStopped


class SignalGuard:
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps.

    The first signal asks the run to stop after the current step; signals that arrive while the
    final checkpoint is being written are ignored, so a second Ctrl-C cannot interrupt the save
    (which is atomic anyway: the previous file stays until the new one is complete).
    """

    CODES: ClassVar[dict[signal.Signals, int]] = {signal.SIGINT: 130, signal.SIGTERM: 143}

    def __init__(self, log: Callable[[str], None]) -> None:
        self.requested: signal.Signals | None = None
        self.log = log
        self._old: dict = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in self.CODES:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested is None:
            self.requested = signal.Signals(signum)
            self.log(f"\n{self.requested.name}: finishing this step and saving; please wait")
        else:
            self.log(f"\n{signal.Signals(signum).name}: already saving, the checkpoint is safe")

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def stop_error(self) -> TrainingStopped:
        assert self.requested is not None
        return TrainingStopped(self.requested.name, self.CODES[self.requested])
