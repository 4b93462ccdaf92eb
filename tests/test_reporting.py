"""One way to report: the `revq_pipe` logger's one stderr handler, bars beside it, plain tables."""

import logging

import pytest
from rich.table import Table
from tqdm import tqdm
from typer.testing import CliRunner

from revq_pipe.cli import app
from revq_pipe.pipeline.reporting.console import TABLE_WIDTH, StderrHandler, console_reporting, setup_logging, table_text


@pytest.fixture
def package_logger():
    """The `revq_pipe` logger without handlers, put back as it was afterwards."""
    logger = logging.getLogger("revq_pipe")
    handlers, level = logger.handlers[:], logger.level
    logger.handlers = []
    yield logger
    logger.handlers, logger.level = handlers, level


def test_setting_up_twice_leaves_one_handler_and_prints_each_record_once(package_logger, capsys):
    setup_logging()
    setup_logging()
    assert len(package_logger.handlers) == 1
    logging.getLogger("revq_pipe.stages.somewhere").info("resuming after epoch 3")
    logging.getLogger("revq_pipe.kernels").debug("not shown at the default level")
    assert capsys.readouterr().err == "resuming after epoch 3\n"  # the bare message, as before


def test_a_record_during_a_progress_bar_gets_a_line_of_its_own(package_logger, capsys):
    with console_reporting():
        with tqdm(total=4, disable=False) as bar:  # the tests' TQDM_DISABLE would hide it
            bar.update(1)
            logging.getLogger("revq_pipe.stages.encode").warning("3 images skipped")
            bar.update(1)
    err = capsys.readouterr().err
    assert "it/s" in err  # the bar was drawn on the same stream
    # Without the redirect the message would follow the bar's text on its line ("...it/s]3 images").
    assert "3 images skipped" in err.replace("\r", "\n").splitlines()
    assert package_logger.handlers and all(isinstance(h, StderrHandler) for h in package_logger.handlers)


def test_commands_run_twice_in_one_process_do_not_duplicate_the_handler(package_logger):
    for _ in range(2):
        done = CliRunner().invoke(app, ["stats", "no-such-store.zarr"])
        assert done.exit_code == 2 and "error:" in done.stderr
    assert len(package_logger.handlers) == 1 and isinstance(package_logger.handlers[0], StderrHandler)
    assert package_logger.level == logging.INFO


def test_tables_are_plain_text_of_a_fixed_width():
    table = Table(title="numbers")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("PSNR", "31.20 dB")
    table.add_row("a reason long enough to wrap " * 8, "skipped")
    text = table_text(table)
    assert "\x1b[" not in text and not text.endswith("\n")
    assert max(len(line) for line in text.splitlines()) == TABLE_WIDTH
    assert "31.20 dB" in text and text.splitlines()[0].strip() == "numbers"


def test_a_shown_progress_bar_still_obeys_tqdm_disable():
    """tqdm reads TQDM_* when it is imported, so each case is a fresh interpreter."""
    import os
    import subprocess
    import sys

    def disabled(show: bool, tqdm_disable: str | None) -> bool:
        env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
        env.update({"TQDM_DISABLE": tqdm_disable} if tqdm_disable else {})
        code = ("import io; from revq_pipe.pipeline.reporting.console import progress_bar; "
                f"print(progress_bar({show}, total=3, file=io.StringIO()).disable)")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return out.stdout.strip() == "True"

    assert disabled(False, None) and not disabled(True, None)
    assert disabled(True, "1")
