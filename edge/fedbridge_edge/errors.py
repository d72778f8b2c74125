"""Errors of the bedside tools; the CLI prints them as one line and exits 2."""

from fedbridge_shared.errors import FedbridgeError


class EdgeError(FedbridgeError):
    """A model file, engine, image or option the bedside tools cannot use."""


class IntegrityError(EdgeError):
    """A model file or engine was modified, truncated or built for another device."""
