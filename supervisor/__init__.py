"""modeld: a local model-supervisor daemon behind the Pieces OS Model API."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("modeld")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
