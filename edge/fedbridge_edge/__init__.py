"""fedbridge_edge."""
