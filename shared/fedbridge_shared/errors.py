"""User-facing errors: the CLI prints ``str(error)`` as one line and exits non-zero."""


class FedbridgeError(Exception):
    """An error a user can act on; the message names the file and the problem."""


class DataError(FedbridgeError):
    """An input image, folder or manifest cannot be used."""


class BundleError(FedbridgeError):
    """A model bundle is missing, incomplete or fails its integrity check."""


class ConfigError(FedbridgeError):
    """An option or configuration value is invalid."""
