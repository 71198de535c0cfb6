"""modeld: a local model-supervisor daemon behind the Pieces OS Model API."""

# The one place the version is written; pyproject.toml reads it from here.
__version__ = "0.1.0"
