"""Benchmarks and slow reference implementations used as test oracles (run from the repository root)."""
