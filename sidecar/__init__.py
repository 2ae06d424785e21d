"""sidecar: a lightweight reverse proxy for OpenAI-compatible model servers."""

__version__ = "0.1.0"
