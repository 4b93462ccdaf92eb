"""Training, the machinery behind `fit`: what a user asks of it and how it trains (`config`: `FitConfig`,
`TrainConfig`), the step and the epoch end (`trainer`), codebook
optimizers and initialisation (`codebook_optim`, `codebook_init`), the data (`loader`), bit-for-bit
CPU runs (`determinism`), torchrun (`distributed`), the checkpoint, what a run dir gets after every
epoch (`fit_outputs`, `training_record`) and what holds around a run (`run_guard`)."""
