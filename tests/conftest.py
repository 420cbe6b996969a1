import logging
import os
from collections.abc import AsyncIterator, Iterator

import pytest
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from crypto_client.clients.deribit.http import DeribitHttpClient
from crypto_client.db import migrations
from crypto_client.db.engine import create_engine
from tests.support.databases import create_pg_database, drop_pg_database, empty_database
from tests.support.services import SimServer, ThrowawayPostgres, ThrowawayRedis


@pytest.hookimpl(trylast=True)  # after `-m` has deselected
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that start processes first, so that the run ends on short ones: with
    `--dist worksteal` an idle worker takes half of the busiest one's queue, so no worker is
    left alone with long tests at the end. The `long` ones open the workers' first shares,
    a few each: stolen from a queue's end, or run one after another by one worker, they
    ended the run with one core idle."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    long_tests = [item for item in items if item.get_closest_marker("long")]
    if workers < 2 or not long_tests:
        return
    others = [item for item in items if not item.get_closest_marker("long")]
    items[:] = []
    for worker, share in enumerate(_first_shares(len(long_tests) + len(others), workers)):
        opening = long_tests[worker::workers]
        following = others[: share - len(opening)]
        # One of the following module's own tests last, so its module fixtures are built once.
        opening.sort(key=lambda item: bool(following) and item.path == following[0].path)
        items.extend(opening + following)
        del others[: len(following)]
    items.extend(others)


def _first_shares(count: int, workers: int) -> list[int]:
    """How many of `count` queued tests worksteal hands each idle worker at the start."""
    shares: list[int] = []
    for remaining_workers in range(workers, 0, -1):
        shares.append((count - sum(shares)) // remaining_workers)
    return shares


@pytest.fixture
async def deribit(sim: SimServer) -> AsyncIterator[DeribitHttpClient]:
    """A client of the simulator, configured as `ingestion_settings`."""
    async with DeribitHttpClient(sim.rpc_url, timeout=5, max_retries=2, backoff_seconds=0.01) as client:
        yield client


@pytest.fixture(scope="session")
async def postgresql_url() -> AsyncIterator[str]:
    url = await create_pg_database()
    yield url
    await drop_pg_database(url)


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("sqlite") / "test.db"
    url = f"sqlite:///{path}"
    migrations.upgrade(url)
    return url


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """A writable engine on an empty, migrated database; emptied again after the test."""
    await empty_database(db_url)
    engine = create_engine(db_url)
    yield engine
    await engine.dispose()
    await empty_database(db_url)


@pytest.fixture(scope="session")
def sim_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimServer]:
    # History points ten times closer than Deribit's (0.6 s apart for the 1h range), so that
    # tests with 1-second slots can repair every slot.
    server = SimServer(tmp_path_factory.mktemp("sim"), 0, "--chart-step-scale", "0.1")
    yield server
    server.stop()


@pytest.fixture
def sim(sim_server: SimServer) -> Iterator[SimServer]:
    """The session's simulator, with no faults and fresh counters."""
    sim_server.reset()
    yield sim_server
    sim_server.reset()


@pytest.fixture
def redis_server() -> Iterator[ThrowawayRedis]:
    server = ThrowawayRedis()
    yield server
    server.destroy()


@pytest.fixture
def throwaway_pg() -> Iterator[ThrowawayPostgres]:
    """A private PostgreSQL cluster this test may stop and start."""
    server = ThrowawayPostgres()
    yield server
    server.destroy()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """For tests that configure logging in this process: put the usual handler and structlog's
    defaults back, so that later tests' `capture_logs` sees their lines."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()
