"""The package version, defined once (pyproject.toml reads it; model headers record it)."""

__version__ = "0.1.0"
