"""Errors as each kind of caller meets them: a `UserError` is a `ValueError`; its message names the
Python parameters it is about, and the command line shows its own flags there instead."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from revq_pipe.cli import _flags_for, app
from revq_pipe.cli import export_tokens as export_tokens_command
from revq_pipe.pipeline.errors import UserError, as_command_line
from revq_pipe.stages.export_tokens import export_tokens

ROOT = Path(__file__).parents[1]
# Flags that are no parameter of ours: torchrun's.
OTHER_PROGRAMS_FLAGS = {"--nproc-per-node"}


def test_a_user_error_is_a_value_error():
    with pytest.raises(ValueError, match="`format=nope`"):
        export_tokens("run", "store.zarr", "out.zarr", format="nope")


def test_the_command_line_shows_flags_where_a_message_names_parameters():
    flags = {"image_size": ("--image-size", False), "overwrite": ("--overwrite", True), "store": ("STORE", False)}
    assert as_command_line("`image_size=7` is not a multiple of 32", flags) == "--image-size 7 is not a multiple of 32"
    assert as_command_line("pass `overwrite=True` to replace it", flags) == "pass --overwrite to replace it"
    assert as_command_line("`store=x.zarr` holds no latents", flags) == "STORE x.zarr holds no latents"
    assert as_command_line("`store` is empty", flags) == "STORE is empty"
    # what the command does not know stays as written: a dict key, a command in backquotes
    assert as_command_line("no `latents` array; run `revq-pipe stats x`", flags) == \
        "no `latents` array; run `revq-pipe stats x`"


def test_python_callers_see_parameters_and_cli_users_see_flags(tmp_path):
    store = "memory://latents.zarr"  # refused for --cluster before anything is read
    with pytest.raises(UserError) as python_error:
        export_tokens("run", store, str(tmp_path / "t.zarr"), cluster="local:1")
    assert str(python_error.value).startswith(f"`store={store}` is in this process's memory")
    cli = CliRunner().invoke(app, ["export-tokens", "run", store, "--out", str(tmp_path / "t.zarr"),
                                   "--cluster", "local:1"])
    assert cli.exit_code == 2 and f"error: STORE {store} is in this process's memory" in cli.output

    with pytest.raises(UserError, match="unknown `format=nope`: use one of zarr, wds, parquet, zarr\\+wds"):
        export_tokens("run", "s.zarr", str(tmp_path / "t.zarr"), format="nope")
    cli = CliRunner().invoke(app, ["export-tokens", "run", "s.zarr", "--out", str(tmp_path / "t.zarr"),
                                   "--format", "nope"])
    assert cli.exit_code == 2 and "error: unknown --format nope: use one of" in cli.output


def test_the_flags_come_from_the_commands_own_parameters():
    flags = _flags_for(export_tokens_command)
    assert flags["store"] == ("STORE", False) and flags["format"] == ("--format", False)
    assert flags["overwrite"] == ("--overwrite", True) and flags["shard_size"] == ("--shard-size", False)
    # a message may advise another command's option: fit's, from export-tokens
    assert flags["resume"] == ("--resume", True)
    assert as_command_line("run the same fit with `resume=True`", flags) == "run the same fit with --resume"


def raised_messages(path: Path) -> list[tuple[int, str]]:
    """(line, text) of the string parts of every `raise UserError(...)` message in the module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and getattr(node.exc.func, "id", "") == "UserError":
            for part in ast.walk(node.exc.args[0]) if node.exc.args else []:
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    found.append((node.lineno, part.value))
    return found


def test_messages_raised_in_pipeline_and_the_stages_name_parameters_not_flags():
    modules = [*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("stages/**/*.py")]
    flags = [(str(path.relative_to(ROOT)), line, flag) for path in modules for line, text in raised_messages(path)
             for flag in re.findall(r"--[a-z][a-z-]*", text) if flag not in OTHER_PROGRAMS_FLAGS]
    assert not flags
