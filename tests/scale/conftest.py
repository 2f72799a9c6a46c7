from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.scale.support import spawn
from tests.test_cost_support import RedisServer

__all__ = ["spawn"]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server, so that a test's command counts and outages are its own."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()
