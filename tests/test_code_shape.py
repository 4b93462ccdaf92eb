"""The code's shape as the project's standards set it: no function over 80 lines (a reader sees
one whole), no stage module over 300 lines (stages orchestrate; machinery lives in pipeline/)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
MAX_FUNCTION_LINES = 80
MAX_STAGE_LINES = 300


def project_modules() -> list[Path]:
    """The project's own modules: none under a hidden folder (.git, a venv such as CI's .ci-venv) or build/."""
    return [path for path in ROOT.rglob("*.py")
            if not any(part.startswith(".") or part == "build" for part in path.relative_to(ROOT).parts[:-1])]


def test_no_function_is_over_80_lines():
    long = []
    for path in project_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                where = (str(path.relative_to(ROOT)), node.name)
                if lines > MAX_FUNCTION_LINES:
                    long.append((*where, lines))
    assert not long


def test_no_stage_module_is_over_300_lines():
    stages = [*ROOT.glob("stages/*.py"), *ROOT.glob("stages/bench/*.py")]
    assert len(stages) > 10
    long = [(str(path.relative_to(ROOT)), n) for path in stages if (n := len(path.read_text().splitlines())) > MAX_STAGE_LINES]
    assert not long
