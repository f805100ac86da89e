"""Benchmarks of ddiff: ``python -m benchmarks --help``."""
