"""The layout the README draws is the tree: every room and top-level module it names exists and
every one that exists is named, the rooms stay small, and the import rules between them hold (a
stage imports no other stage; the machinery imports no stage)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
MAX_TOP_MODULES = 12  # pipeline/'s top: the small pieces every room uses
MAX_ROOM_MODULES = 12
COMPOSITES = {"stages/demo.py"}  # beside the stages, running whole stages in turn (as stages/bench/ does)


def layout_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("## Layout and development", 1)[1].split("\n## ", 1)[0]


def modules(folder: Path) -> set[str]:
    return {p.stem for p in folder.glob("*.py") if p.name != "__init__.py"}


def named(line_start: str) -> set[str]:
    """The backquoted names on the README's layout line that starts with `line_start`, up to the next item."""
    section = layout_section()
    item = section.split(line_start, 1)[1].split("\n- ", 1)[0].split("\n  - ", 1)[0]
    return set(re.findall(r"`(\w+)`", item))


def test_the_readme_names_every_room_and_top_module_and_nothing_else():
    rooms = {p.name for p in (ROOT / "pipeline").iterdir() if (p / "__init__.py").is_file()}
    assert rooms == set(re.findall(r"`pipeline/(\w+)/`", layout_section()))
    assert modules(ROOT / "pipeline") == named("- `pipeline/`:")
    assert modules(ROOT / "stages") == named("- `stages/`:")
    assert modules(ROOT / "stages" / "bench") == named("- `stages/bench/`:")


def test_the_rooms_stay_small():
    assert len(modules(ROOT / "pipeline")) <= MAX_TOP_MODULES
    for room in (ROOT / "pipeline").iterdir():
        if (room / "__init__.py").is_file():
            assert len(modules(room)) <= MAX_ROOM_MODULES, room.name


def imported(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_a_stage_imports_no_other_stage_and_the_machinery_no_stage():
    for path in [*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("kernels/*.py")]:
        assert not {m for m in imported(path) if m.startswith("revq_pipe.stages")}, path
    for path in (ROOT / "stages").glob("*.py"):
        if str(path.relative_to(ROOT)) in COMPOSITES:
            continue
        stages = {m for m in imported(path) if m.startswith("revq_pipe.stages")}
        assert not stages, (path, stages)
