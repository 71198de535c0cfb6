"""modeld's benchmarks: `python -m bench` runs them all and rewrites BENCHMARKS.md's table."""
