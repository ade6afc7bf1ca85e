"""The size limits of relay/ (docs/development.md, "Layers"): no module over 500 lines, no class over 300,
no function over 60, so that each piece can be read in one sitting. (The import layers are checked by
import-linter in `make lint` / `make test`; this file checks what it cannot.)"""

from __future__ import annotations

import ast
from pathlib import Path

RELAY = Path(__file__).resolve().parent.parent / "relay"
LIMITS = {"module": 500, "class": 300, "function": 60}


def sizes() -> list[tuple[str, str, int]]:
    """(kind, name, lines) of every module, class and function in relay/."""
    found = []
    for path in sorted(RELAY.rglob("*.py")):
        source = path.read_text()
        where = str(path.relative_to(RELAY.parent))
        found.append(("module", where, len(source.splitlines())))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                kind = "class"
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                kind = "function"
            else:
                continue
            assert node.end_lineno is not None
            found.append((kind, f"{where}:{node.lineno} {node.name}", node.end_lineno - node.lineno + 1))
    return found


def test_the_sizes_are_measured() -> None:
    found = sizes()
    kinds = {kind for kind, _, _ in found}
    assert kinds == {"module", "class", "function"}
    assert any(name.startswith("relay/jobs/job.py") and kind == "class" for kind, name, _ in found)
    assert len([1 for kind, _, _ in found if kind == "module"]) >= 40


def test_no_module_class_or_function_is_over_its_limit() -> None:
    over = [f"{kind} {name}: {lines} lines (limit {LIMITS[kind]})" for kind, name, lines in sizes()
            if lines > LIMITS[kind]]  # fmt: skip
    assert not over, "\n".join(over)
