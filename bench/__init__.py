"""Benchmarks that print ratios measured in one run (not pass/fail tests)."""
