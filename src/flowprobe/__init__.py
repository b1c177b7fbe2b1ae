"""flowprobe: train flow-matching / rectified-flow models and probe them for their failure modes."""

__version__ = "0.1.0"
