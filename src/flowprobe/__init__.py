"""flowprobe: train flow-matching / rectified-flow models and probe them for their failure modes."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``flowprobe.diagnose``: :func:`flowprobe.runs.diagnose.diagnose`, imported on first use (the package root
    imports nothing)."""
    if name == "diagnose":
        import importlib

        return importlib.import_module("flowprobe.runs.diagnose").diagnose
    raise AttributeError(f"module 'flowprobe' has no attribute {name!r}")
