"""EST (RFC 7030) enrollment server over HTTPS; see issue 3 (not built yet)."""
