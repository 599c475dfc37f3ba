"""Run the `charlstm` CLI with a disk writer that stops half-way through a write, for the tests.

`atomic._write_all` is the single place charlstm's bytes reach the disk. This wrapper replaces
it so that a chosen write puts down half its bytes (flushed and fsynced, as a real slow disk would
leave them), creates the file named by ``CHARLSTM_TEST_MARKER`` and waits. The test then acts at a
moment it knows to be inside a save:

``CHARLSTM_TEST_PAUSE=write:N``   pause in the N-th write of the process (the test SIGKILLs it);
``CHARLSTM_TEST_PAUSE=stopping``  pause in the first write after a stop signal arrived, until the
                                  file ``<marker>.go`` exists (the test sends a second SIGINT
                                  first).

Usage: python _pause_in_save.py <charlstm arguments>
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from charlstm import atomic
from charlstm.cli import main

_original = atomic._write_all
_calls = 0


def _stop_requested() -> bool:
    guard = getattr(signal.getsignal(signal.SIGINT), "__self__", None)
    return getattr(guard, "requested", None) is not None


def _pausing_write(fh, data: bytes) -> None:
    global _calls
    _calls += 1
    mode = os.environ["CHARLSTM_TEST_PAUSE"]
    marker = Path(os.environ["CHARLSTM_TEST_MARKER"])
    pause = (mode == f"write:{_calls}") or (mode == "stopping" and _stop_requested())
    if not pause or marker.exists():
        return _original(fh, data)
    half = len(data) // 2
    fh.write(data[:half])
    fh.flush()
    os.fsync(fh.fileno())
    marker.write_text(str(fh.name))
    go = marker.with_name(marker.name + ".go")
    deadline = time.monotonic() + 60
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    fh.write(data[half:])
    fh.flush()
    os.fsync(fh.fileno())


atomic._write_all = _pausing_write

if __name__ == "__main__":
    sys.argv[0] = "charlstm"
    main()
