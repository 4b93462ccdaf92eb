"""The bench commands' shared parts: the paper's reference search and the timers' contracts."""

import torch

from revq_pipe.pipeline.reporting.benchmarking import mean_seconds, reference_search, seconds_per_call


def test_reference_search_finds_the_nearest_code_and_its_unsquared_distance():
    gen = torch.Generator().manual_seed(0)
    x, codebooks = torch.randn(5, 7, 3, generator=gen), torch.randn(5, 11, 3, generator=gen)  # odd G: a lone last chunk
    indices, distances = reference_search(x, codebooks)
    brute = ((x[:, :, None, :] - codebooks[:, None, :, :]) ** 2).sum(-1)
    assert torch.equal(indices, brute.argmin(dim=-1))
    torch.testing.assert_close(distances, brute.min(dim=-1).values.sqrt(), rtol=1e-4, atol=1e-5)


def test_mean_seconds_times_the_asked_number_of_calls_not_a_time_budget():
    """bench fit's --steps: a fast call is made 7 times (and Timer's 2 warm-up calls), not thousands."""
    calls = []
    assert mean_seconds(lambda: calls.append(1), 7) >= 0
    assert len(calls) == 7 + 2


def test_timers_keep_this_process_thread_count():
    """torch's Timer runs on one thread unless told otherwise: CPU figures would be one core's."""
    threads = torch.get_num_threads()
    seen = []
    torch.set_num_threads(2)
    try:
        seconds_per_call(lambda: seen.append(torch.get_num_threads()), torch.device("cpu"))
        mean_seconds(lambda: seen.append(torch.get_num_threads()), 2)
    finally:
        torch.set_num_threads(threads)
    assert seen and set(seen) == {2}
