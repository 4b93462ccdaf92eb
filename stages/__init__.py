"""One module per stage (encode, fit, export_tokens, decode, evaluate, import_latents,
import_checkpoint): each a plain function callable without the CLI, which orchestrates
`revq_pipe.pipeline` and imports no other stage. The composites run whole stages in turn: `demo`
beside them, and the bench commands in `stages/bench/`."""
