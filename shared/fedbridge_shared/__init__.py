"""fedbridge: code shared by the server, the hospital sites and the bedside device."""

from importlib.metadata import PackageNotFoundError, version

try:  # the one version string is pyproject.toml's (Flower's app loader needs it there)
    __version__ = version("fedbridge")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
