"""Where results live: the Zarr latent and token stores and their one resume protocol (`store`,
`token_store`, `stats`), what --cluster jobs keep in them (`staging`), encode's chunk writer and
resume policy (`latent_writer`, `resume`), the export formats and export-tokens' settings
(`export_formats`), token shards and parquet (`token_shards`), the dataset card of every token
export (`dataset_card`), decoded PNG folders (`decoded_images`), run dirs (`run_dir`) and imported
latent files (`latent_files`)."""
