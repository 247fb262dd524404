"""Model definitions used by tests, benchmarks and the demo (no downloads)."""
