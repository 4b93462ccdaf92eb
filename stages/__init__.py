"""One module per pipeline stage; each stage is a plain function callable without the CLI."""
