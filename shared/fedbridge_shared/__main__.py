"""``python -m fedbridge_shared`` runs the ``fedbridge`` command."""

from fedbridge_shared.cli import main

main()
