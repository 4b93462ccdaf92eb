"""`bench search` on the CPU at a tiny shape: it runs every method, agrees, and reports."""

import pytest
import torch
from typer.testing import CliRunner

from revq_pipe.cli import app
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.reporting.benchmarking import compare_with_baseline
from revq_pipe.pipeline.reporting.bench_options import BENCH_PRESETS, parse_shape
from revq_pipe.stages.bench.search import bench_search


def test_bench_runs_every_method_and_they_agree():
    result = bench_search("3,16,200,4", device="cpu")
    assert result.all_agree
    assert result.shape.pairs == 3 * 16 * 200
    assert all(t.seconds > 0 for t in result.timings) and result.sgemm_flops > 0
    report = result.report()
    for needle in ("nearest_code (this project)", "vmap(cdist+min", "baddbmm + argmin", "fp32 SGEMM", "vs ref", "all agree: yes"):
        assert needle in report


def test_cli_bench_search_prints_the_table():
    done = CliRunner().invoke(app, ["bench", "search", "--shape", "2,8,64,8", "--device", "cpu"])
    assert done.exit_code == 0, done.output
    assert "Gpairs/s" in done.output and "all agree: yes" in done.output


def test_presets_are_the_paper_search_shapes():
    shapes = {name: parse_shape(name) for name in BENCH_PRESETS}
    assert (shapes["512T_NC=16384"].groups, shapes["512T_NC=16384"].queries, shapes["512T_NC=16384"].codes, shapes["512T_NC=16384"].dim) == (512, 256, 16384, 4)
    assert (shapes["256T_NC=262144"].groups, shapes["256T_NC=262144"].queries, shapes["256T_NC=262144"].codes, shapes["256T_NC=262144"].dim) == (256, 128, 262144, 8)
    assert shapes["256T_NC=65536"].queries == 256


@pytest.mark.parametrize("shape", ["1,2,3", "1,2,x,4", "0,2,3,4", "1,2,3,65", "tiny"])
def test_bad_shapes_are_user_errors(shape):
    with pytest.raises(UserError):
        parse_shape(shape)


def test_cli_refuses_a_preset_on_the_cpu():
    done = CliRunner().invoke(app, ["bench", "search", "--shape", "256T_NC=262144", "--device", "cpu"])
    assert done.exit_code == 2
    assert "small --shape" in done.output


def test_baseline_comparison_accepts_rounding_and_catches_a_farther_answer():
    x = torch.tensor([[[0.0], [1.0]]])
    codebooks = torch.tensor([[[0.1], [0.2], [0.9]]])
    right = torch.tensor([[0, 2]])
    wrong = torch.tensor([[1, 2]])
    line, ok = compare_with_baseline("baseline", x, codebooks, right, wrong)
    assert ok and "1 of 2 indices differ" in line
    line, ok = compare_with_baseline("baseline", x, codebooks, wrong, right)
    assert not ok and "FARTHER" in line
    assert compare_with_baseline("baseline", x, codebooks, right, right.clone())[1]
