"""The `--json` vocabulary of docs/cli.md ("JSON field names") as the
tests read it (no tests here): the documented fields of each command, and
the check that an output has exactly those."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).parents[2] / "docs" / "cli.md"
# Names that say nothing of what they name: never a field.
VAGUE = {"id", "name", "address", "email"}


def documented() -> dict[str, set[str]]:
    """command -> its field paths, from the table under "## JSON field names"."""
    section = DOC.read_text().split("## JSON field names", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`relay "):
            table[cells[0].strip("`").removeprefix("relay ")] = set(re.findall(r"`([^`]+)`", cells[1]))
    return table


def paths(value, prefix: str = "") -> tuple[set[str], set[str]]:
    """The field paths of a JSON value (`a`, `a.b`, `a[].b`; `a{}` for a map
    whose keys are data), and the paths of the lists that were empty."""
    found, empty = set(), set()
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{prefix}{key}"
            found.add(path)
            sub, sub_empty = paths(item, path + ".")
            found |= sub
            empty |= sub_empty
    elif isinstance(value, list):
        if not value and prefix:
            empty.add(prefix[:-1])
        for item in value:
            sub, sub_empty = paths(item, prefix[:-1] + "[].")
            found |= sub
            empty |= sub_empty
    return found, empty


def expected(documented_paths: set[str], empty: set[str]) -> set[str]:
    """The documented paths, less those inside lists that were empty here
    and with a map's (`x{}`) data keys left unchecked."""
    return {p.removesuffix("{}") for p in documented_paths
            if not any(p.startswith(e + "[].") for e in empty)}


def check(command: str, output: dict | list, table: dict[str, set[str]]) -> None:
    found, empty = paths(output)
    maps = {p.removesuffix("{}") for p in table[command] if p.endswith("{}")}
    found = {p for p in found if not any(p.startswith(m + ".") for m in maps)}
    assert found == expected(table[command], empty), command
    assert not {p.rsplit(".", 1)[-1] for p in found} & VAGUE, command
