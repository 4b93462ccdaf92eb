"""Reporting and measuring: logging, tables and progress bars (`console`), encode's summary
(`encode_summary`), metrics and their plot (`metrics`, `metrics_plot`), perceptual image metrics
(`perceptual`), the timers and reference search the bench commands share (`benchmarking`) and
the pieces `bench encode` times (`encode_timing`)."""
