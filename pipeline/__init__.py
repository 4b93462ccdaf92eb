"""The machinery the stages share (the stages orchestrate it): image sources and VAE loading;
locations, the Zarr stores and their resume protocol, the latent writer; configs, the ReVQ model
and its rectifier; the trainer, codebook optimizers and initialisation, the loader, the random
streams and data-parallel training under torchrun; reporting, metrics and the benchmarks' timers.
The README's "Layout" lists every module."""
