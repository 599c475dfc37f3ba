"""Benchmarks that measure the library against the lab's code, in one run on the same machine."""
