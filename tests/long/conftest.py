"""Long suites (`make test-long`): the daemon fixtures of tests/daemon, shared."""

from tests.daemon.conftest import start_daemon

__all__ = ["start_daemon"]
