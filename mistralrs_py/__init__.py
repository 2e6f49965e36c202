"""mistralrs-py: a small-footprint OpenAI-compatible server for Mistral/Llama-family models."""

__version__ = "0.1.0"

__all__ = [
    "Runner",
    "GenerationFailed",
    "ContextTooLong",
    "InvalidRequest",
    "ModelSpec",
    "ModelKind",
    "LoadError",
    "__version__",
]

# NOTE: `import mistralrs_py` stays light (no torch): the Python API is imported on first use of
# one of these names, so `mistralrs --help` and `from mistralrs_py import __version__` stay instant.
_LAZY = {
    "Runner": ".api",
    "GenerationFailed": ".api",
    "ContextTooLong": ".api",
    "InvalidRequest": ".api",
    "ModelSpec": ".pipeline.base",
    "ModelKind": ".pipeline.base",
    "LoadError": ".pipeline.base",
}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
