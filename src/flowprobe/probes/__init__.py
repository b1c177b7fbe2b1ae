"""Diagnostics of trained flows: gradient variance, memorisation, straightness."""
