"""The README's "## Configuration" table documents every setting of server/config.py, and only those."""

from __future__ import annotations

import re
from pathlib import Path

from server.config import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def configuration_rows() -> dict[str, tuple[str, str]]:
    """{VARIABLE: (default, meaning)} from the table under "## Configuration"."""
    section = README.read_text().split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`([A-Z][A-Z0-9_]*)`", cells[0]) if len(cells) == 3 else None
        if match:
            assert match.group(1) not in rows, f"{match.group(1)} is documented twice"
            rows[match.group(1)] = (cells[1], cells[2])
    return rows


def test_every_setting_is_documented() -> None:
    rows = configuration_rows()
    settings = {name.upper() for name in Settings.model_fields}
    missing = sorted(settings - set(rows))
    assert not missing, f"settings missing from the README's Configuration table: {missing}"
    assert not set(rows) - settings, f"README documents settings that do not exist: {sorted(set(rows) - settings)}"


def test_every_row_says_its_default_and_meaning() -> None:
    for name, (default, meaning) in configuration_rows().items():
        assert default and meaning, f"{name}: empty default or meaning"


def test_plain_number_defaults_match_the_code() -> None:
    """A default written as a bare number is the one server/config.py has (the others are prose: `models/default`)."""
    checked = 0
    for name, (default, _) in configuration_rows().items():
        number = re.fullmatch(r"`(-?\d+(?:\.\d+)?)`", default)
        if number:
            assert float(number.group(1)) == float(Settings.model_fields[name.lower()].default), name
            checked += 1
    assert checked > 20
