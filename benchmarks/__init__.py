"""Benchmarks: code that measures graft; outputs go to benchmarks/out/ (git-ignored)."""
