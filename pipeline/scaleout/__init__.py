"""encode and export-tokens on dask.distributed: starting or reaching a cluster (`cluster`), the
chunk-range task protocol (`chunk_tasks`), `encode --cluster` (`staged_encode`) and
`export-tokens --cluster` (`token_tasks`). fit under torchrun lives in `train.distributed`."""
