"""The package's version: one place, read by pyproject.toml (setuptools' attr:) and `offload --version`."""

__version__ = "0.1.0"
