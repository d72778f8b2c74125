"""fedbridge_client."""
