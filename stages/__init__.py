"""One module per stage (encode, fit, export_tokens, decode, evaluate): each a plain function
callable without the CLI, which orchestrates `revq_pipe.pipeline` and imports no other stage. The
composite commands (demo, bench_quality, bench_encode) run whole stages in turn; bench_search and
bench_fit time the kernels and the training step."""
