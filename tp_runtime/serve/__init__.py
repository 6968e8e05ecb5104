"""The OpenAI-compatible HTTP server (the only layer that knows HTTP)."""
