"""The package version. VERSION at the repository root is the one source: pyproject.toml reads it for
the package metadata, CMakeLists.txt for the C++ library, and setup.py compiles it into the extension,
from where it is read here (so a stale build shows its own version)."""

from sparseadapter_ext import __version__

__all__ = ["__version__"]
