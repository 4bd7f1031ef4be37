"""Simulated fleet of medical devices; see issue 5 (not built yet)."""
