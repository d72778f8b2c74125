"""fedbridge_server."""
