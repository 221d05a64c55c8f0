"""sfbd_guard."""
