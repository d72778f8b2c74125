"""``python -m fedbridge`` runs the ``fedbridge`` command."""

from fedbridge.cli import entry

entry()
