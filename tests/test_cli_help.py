"""The command line as a user first meets it: help on every option, flags that look like flags,
preset-derived defaults, --version, and a start-up that imports nothing heavy."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import typer
from typer.testing import CliRunner

from revq_pipe.cli import app

runner = CliRunner()


def all_commands():
    """(words, click command) of every command, bench's sub-commands included."""
    root = typer.main.get_command(app)
    for name, command in root.commands.items():
        if hasattr(command, "commands"):  # a group (Typer vendors its own click: no isinstance)
            for sub_name, sub in command.commands.items():
                yield [name, sub_name], sub
        else:
            yield [name], command


def test_every_option_is_described_and_flags_show_no_value():
    for words, command in all_commands():
        text = runner.invoke(app, [*words, "--help"], terminal_width=200).stdout
        assert "<bool>" not in text, words
        for param in command.params:
            if param.name == "help":
                continue
            assert param.help, f"{' '.join(words)} {param.opts[0]} has no help"
            if param.param_type_name == "option" and param.is_flag:
                # the flag's line is the flag, then its description: no metavar between
                line = next(line for line in text.splitlines() if line.strip().startswith(param.opts[0] + " "))
                assert line.split(param.opts[0], 1)[1].strip().startswith(param.help[:20]), line


def test_fit_help_says_what_a_preset_fixes_and_shows_its_defaults():
    text = " ".join(runner.invoke(app, ["fit", "--help"], terminal_width=200).stdout.split())
    assert "A preset fixes the code dim d and the codes per token position K" in text
    assert "T = C*H*W/d follow from the store's latent shape" in text
    assert "tiny: d=4, K=128" in text and "512T_NC=16384: d=4, K=16384" in text
    assert "Epochs (default: the preset's; 512T_NC=16384: 100, 256T_NC=65536: 100, 256T_NC=262144: 100, tiny: 20)" in text
    assert "tiny: 64" in text  # the batch size


def test_the_choices_shown_are_the_registries():
    fit_help = " ".join(runner.invoke(app, ["fit", "--help"], terminal_width=200).stdout.split())
    assert "--rectifier vit|cnn|mlp|none" in fit_help
    export_help = " ".join(runner.invoke(app, ["export-tokens", "--help"], terminal_width=200).stdout.split())
    assert "--format zarr|wds|parquet|zarr+wds" in export_help


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"revq-pipe {version('revq-pipe')}"


def test_help_and_version_start_without_torch():
    # Each command imports its own stage when it runs; help and --version need none of them.
    code = ("import sys\nfrom revq_pipe.cli import app\n"
            "for args in (['--version'], ['fit', '--help'], ['export-tokens', '--help'], ['eval', '--help']):\n"
            "    try:\n        app(args)\n    except SystemExit:\n        pass\n"
            "heavy = [m for m in ('torch', 'zarr', 'diffusers', 'dask', 'pyarrow', 'matplotlib') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_from_revq_pipe_import_revq():
    from revq_pipe import ReVQ
    from revq_pipe.pipeline.model.revq import ReVQ as defined

    assert ReVQ is defined


def test_usage_lines_and_arguments_show_plain_names():
    for words, command in all_commands():
        text = runner.invoke(app, [*words, "--help"], terminal_width=80).stdout
        usage = text.splitlines()[0]
        assert "{" not in usage and "<" not in usage, usage
        for param in command.params:
            if param.param_type_name == "argument":
                row = next(line for line in text.splitlines() if line.strip().startswith(param.metavar))
                assert "<" not in row.split("  ")[0], row  # no `SOURCE <str>`
    assert runner.invoke(app, ["encode", "--help"]).stdout.startswith("Usage: revq-pipe encode [OPTIONS] SOURCE\n")
    assert "import-latents [OPTIONS] FILE...\n" in runner.invoke(app, ["import-latents", "--help"]).stdout


def test_the_command_lists_show_whole_descriptions_on_a_narrow_terminal():
    root = typer.main.get_command(app)
    for words, group in (([], root), (["bench"], root.commands["bench"])):
        text = runner.invoke(app, [*words, "--help"], terminal_width=80).stdout
        listing = " ".join(text.split("Commands:", 1)[1].split())
        assert "..." not in listing, listing
        for name, command in group.commands.items():
            if not hasattr(command, "commands"):  # a command: its docstring's whole first paragraph
                assert f"{name} {' '.join(command.help.split(chr(10) * 2)[0].split())}" in listing, name
