"""fedbridge, the application: the ``fedbridge`` command and the demo, on top of every role.

Layers (enforced by import-linter in ``make lint``): this package imports the roles
(``fedbridge_server``, ``fedbridge_client``, ``fedbridge_edge``), which import only
``fedbridge_shared``. Nothing imports this package.
"""

from fedbridge_shared import __version__

__all__ = ["__version__"]
