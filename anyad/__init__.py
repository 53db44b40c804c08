"""anyad: a local-LLM gateway daemon with an OpenAI-compatible API."""

__version__ = "0.1.0"
