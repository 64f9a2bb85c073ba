"""The demo and the benchmarks: run them from the repository root as `python -m scripts.<name>`
(scripts/demo wraps the demo), so that `testkit` imports from the source tree."""
