"""mistralrs-py: a small-footprint OpenAI-compatible server for Mistral/Llama-family models."""

__version__ = "0.1.0"
