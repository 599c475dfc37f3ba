"""The one exception type a user is meant to see.

Library code raises :class:`UserError` for anything the person running charlstm can fix (a missing
file, a bad option, a foreign checkpoint). Its message is a single line that names the problem and
the fix; the CLI prints it to stderr and exits with its `exit_code`, without a traceback: 2, or 3
for a distributed job's `PeerFailure` (docs/errors.md lists every exit status). Anything else that
escapes is a bug in charlstm, shows its traceback and exits with 1.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, reported as one line naming the problem and the fix."""

    exit_code = 2


class CheckpointError(UserError):
    """A checkpoint or run folder that cannot be loaded safely."""


class TrainingStopped(Exception):
    """Raised inside training when a signal asked it to stop; carries the process exit code."""

    def __init__(self, signal_name: str, exit_code: int) -> None:
        super().__init__(f"stopped by {signal_name}")
        self.signal_name = signal_name
        self.exit_code = exit_code


class NonFiniteLoss(UserError):
    """Training produced a NaN or infinite loss or gradient more often than allowed."""
