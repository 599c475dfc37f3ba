"""The reliability suite's summary: the tally of what it tried, printed at the end of the run.

Every test here tries to break one of charlstm's guarantees (crash-safe checkpoints, exact resume,
graceful signals, numerical faults, safe loading, full disks, hostile input) and records what it
tried in `tests.helpers.TALLY`. At the end of the run the tally is printed as the figures the README
quotes: kills survived, resumes identical, hostile files rejected, bad inputs handled. The counts
are collected as the tests run, so a skipped or deselected test simply tries nothing. (The suite's
fixtures are those of tests/conftest.py.)
"""

from __future__ import annotations

from tests.helpers import TALLY

SUMMARY = (
    ("kills", "kills survived"),
    ("resumes", "resumes identical"),
    ("hostile", "hostile files rejected"),
    ("bad_inputs", "bad inputs handled"),
)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not any(TALLY.tried.values()):
        return
    tr = terminalreporter
    tr.section("charlstm reliability")
    for kind, label in SUMMARY:
        line = f"{label}: {TALLY.held[kind]}/{TALLY.tried[kind]}"
        if kind == "bad_inputs" and TALLY.tried[kind]:
            line += (
                f" ({TALLY.notes['bad_inputs_valid']} gave a valid result, "
                f"{TALLY.notes['bad_inputs_refused']} a one-line UserError)"
            )
        if kind == "kills" and TALLY.tried[kind]:
            line += (
                f" ({TALLY.notes['kills_mid_write']} of them during a write; "
                f"{TALLY.notes['steps_lost']} saved steps lost)"
            )
        tr.write_line(line)
