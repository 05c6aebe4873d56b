"""The package's version: a leaf, so the plan format can stamp it without importing the package root."""
__version__ = "0.2.0"
