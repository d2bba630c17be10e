"""Benchmarks (not tests): each prints its measurements and writes them as JSON."""
