"""The console's tests use the EST suite's real-server fixtures (tests/enroll/conftest.py)."""
from tests.enroll.conftest import _judges, pytest_runtest_makereport, start_server, tools  # noqa: F401
