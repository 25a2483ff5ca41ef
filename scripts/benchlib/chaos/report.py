"""The chaos table: one row per scenario, backend and durability mode, summed over its runs.

Printed as text, written as markdown, and written into docs/RELIABILITY.md
between ``<!-- chaos:begin -->`` and ``<!-- chaos:end -->`` (the rest of that
document is prose kept by hand).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from scripts.benchlib.chaos.scenarios import Outcome
from scripts.benchlib.chaos.tally import Tally

BEGIN, END = "<!-- chaos:begin -->", "<!-- chaos:end -->"
COLUMNS = ("scenario", "backend", "durability", "load", "runs", "answered", "stored", "lost", "duplicated",
           "503", "recorded, unanswered", "failed checks")


@dataclass
class Row:
    scenario: str
    backend: str
    mode: str
    load: str = ""
    runs: int = 0
    tally: Tally = field(default_factory=Tally)
    failed: Counter = field(default_factory=Counter)  # failed check -> runs it failed in
    skipped: str = ""  # why the scenario could not run here
    errors: list[str] = field(default_factory=list)  # runs that crashed, and how

    def add(self, outcome: Outcome) -> None:
        self.runs += 1
        self.load = outcome.load  # the last run's (runs differ only in the SIGKILL's moment)
        self.tally += outcome.tally
        self.failed.update(check.name for check in outcome.checks if not check.passed)

    def cells(self) -> list[str]:
        if self.skipped:
            return [self.scenario, self.backend, self.mode, f"skipped: {self.skipped}", *[""] * 8]
        tally = self.tally
        failed = "; ".join(f"{name} ({runs}/{self.runs})" for name, runs in self.failed.items())
        failed = "; ".join(filter(None, [failed, *(f"error: {error}" for error in self.errors)])) or "none"
        return [self.scenario, self.backend, self.mode, self.load, str(self.runs + len(self.errors)),
                str(tally.answered), str(tally.stored), str(tally.lost), str(tally.duplicated), str(tally.refused),
                str(tally.unanswered_recorded), failed]


class Table:
    """Rows in the order their scenarios first ran."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, str], Row] = {}

    def row(self, scenario: str, backend: str, mode: str) -> Row:
        return self.rows.setdefault((scenario, backend, mode), Row(scenario, backend, mode))

    def add(self, outcome: Outcome) -> None:
        self.row(outcome.scenario, outcome.backend, outcome.mode).add(outcome)

    def markdown(self) -> str:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row.cells()) + " |"
                  for row in self.rows.values()]
        return "\n".join(lines)

    def text(self) -> str:
        """Fixed-width columns, the load and the failed checks last (they are long)."""
        order = [0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 3, 11]
        table = [[COLUMNS[i] for i in order]] + [[row.cells()[i] for i in order] for row in self.rows.values()]
        widths = [max(len(line[i]) for line in table) for i in range(len(order) - 2)]
        return "\n".join("  ".join([*(cell.ljust(width) for cell, width in zip(line[:-2], widths, strict=True)),
                                    *line[-2:]]) for line in table)


def section(table: Table, command: str, date: str, machine: str) -> str:
    """The generated part of docs/RELIABILITY.md: how it was made, then the table."""
    return "\n".join([BEGIN, "", f"Produced by `{command}` on {date}.", "", "```", machine, "```", "",
                      table.markdown(), "", END])


def write_into(document: Path, generated: str) -> None:
    """Replace the generated section of ``document`` (append one when it has none)."""
    text = document.read_text() if document.exists() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + generated + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + generated + "\n"
    document.write_text(text)
