"""MQTT gateway for intermittently connected devices; see issue 4 (not built yet)."""
