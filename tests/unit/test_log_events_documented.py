"""The README's log-event table lists every event the daemon emits, and nothing else."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LEVELS = {"debug", "info", "warning", "error", "exception", "critical", "msg"}


def events_in_code() -> set[str]:
    found = set()
    for package in ("supervisor", "actors"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in LEVELS and node.args
                        and isinstance(node.args[0], ast.Constant)
                        and isinstance(node.args[0].value, str)
                        and re.fullmatch(r"[a-z][a-z0-9_]*", node.args[0].value)
                        and "log" in ast.unparse(node.func.value).lower()):
                    found.add(node.args[0].value)
                # refuse("request_refused", exc): the API's one way to log a refusal
                if (isinstance(node, ast.Call) and ast.unparse(node.func).endswith("refuse")
                        and node.args and isinstance(node.args[0], ast.Constant)):
                    found.add(str(node.args[0].value))
    return found


def events_in_readme() -> set[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text[text.index("| event | fields | when |"):]
    table = table[:table.index("\n\n")]
    first_cells = [row.split("|")[1] for row in table.splitlines()[2:]]
    return {name for cell in first_cells for name in re.findall(r"`([a-z0-9_]+)`", cell)}


def test_the_readme_lists_every_event_and_only_those() -> None:
    code, readme = events_in_code(), events_in_readme()
    assert len(code) > 20  # the scan found the daemon's events
    assert [] == sorted(code - readme), "events missing from the README's table"
    assert [] == sorted(readme - code), "events in the README's table that nothing emits"
