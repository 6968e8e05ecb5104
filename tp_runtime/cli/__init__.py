"""Command-line tools: tp-run, tp-serve, tp-plan, tp-eval (and their helpers)."""
