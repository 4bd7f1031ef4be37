"""The `iomtca` command line: admin commands for biomedical engineers, and entry points."""
