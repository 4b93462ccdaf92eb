"""Run the Triton search kernels under Triton's interpreter on saved cases (a child process).

Triton decides between interpreter and compiler when it is first imported, so the interpreter
tests run this script in a fresh process with TRITON_INTERPRET=1 in its environment; the test
process itself, and every other test, stay compiled/eager.

Usage: python interpreter_runner.py CASES_IN RESULTS_OUT
CASES_IN is a torch.save'd list of dicts with x, codebooks, counts (or None) and target_programs;
RESULTS_OUT receives, per case, a dict per method ("screen", "exact") with the kernels' indices,
sq_dists and counts, plus which implementation the public `nearest_code` picked in this
environment and its own answer.
"""

import sys

import torch


def main(cases_path: str, results_path: str) -> None:
    """Search every saved case with the interpreted Triton kernels and save the answers."""
    from revq_pipe.kernels.nearest_code import implementation_for, nearest_code
    from revq_pipe.kernels.triton_search import INTERPRETED, METHODS, nearest_code_triton

    if not INTERPRETED:
        raise SystemExit("triton was not imported under TRITON_INTERPRET=1")
    results = []
    for case in torch.load(cases_path):
        result = {}
        for method in METHODS:
            counts = None if case["counts"] is None else case["counts"].clone()
            indices, sq_dists = nearest_code_triton(
                case["x"], case["codebooks"], counts=counts, method=method, target_programs=case["target_programs"]
            )
            result[method] = {"indices": indices, "sq_dists": sq_dists, "counts": counts}
        result["implementation"] = implementation_for(case["x"])
        result["public_indices"] = nearest_code(case["x"], case["codebooks"])[0]
        results.append(result)
    torch.save(results, results_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
