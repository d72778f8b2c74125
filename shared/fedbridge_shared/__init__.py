"""fedbridge: code shared by the server, the hospital sites and the bedside device."""

__version__ = "0.1.0"
