"""Benchmarks, the chaos run and the soak: run from a checkout, not shipped in the wheel."""
