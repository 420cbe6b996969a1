"""Prometheus metrics of every process kind, scraped over HTTP from real processes: the API
(one process and several workers), `serve`, a Celery worker's pool, the stream consumer; and
the monitoring profile's Prometheus configuration and Grafana dashboard against them."""

import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support import local_http
from tests.support.celery_stack import CeleryStack
from tests.support.databases import create_pg_database, drop_pg_database
from tests.support.metrics import samples, value
from tests.support.services import ApiServer, Process, SimServer, ThrowawayRedis, crypto_client, free_port
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy"


def polled_and_stored(text: str, ticker: str = "btc_usd") -> float:
    return value(
        text, "crypto_client_ingest_outcomes_total", source="poll", ticker=ticker, status="stored", reason=""
    )


def family_names(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        if family.type == "counter":  # the parser names a counter without its _total
            names.add(family.name + "_total")
        names.update(sample.name for sample in family.samples)
    return names


@pytest.fixture
def serve(sim: SimServer, tmp_path: Path) -> Iterator[ApiServer]:
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/metrics.db",
        "DERIBIT_RPC_URL": sim.rpc_url,
        "TICKERS": "btc_usd,eth_usd",
        "INGEST_INTERVAL_SECONDS": "1",
        "BACKFILL_INTERVAL_SECONDS": "0",
    }
    with ApiServer.command("serve", env, tmp_path, ready_path="/health") as server:
        yield server


def test_serve_reports_ingestion_requests_and_the_data(serve: ApiServer) -> None:
    # Both tickers: a tick of one may fail or come late on a busy machine.
    wait_until(
        lambda: all(len(serve.get("/prices", ticker=t).json()) >= 2 for t in ("btc_usd", "eth_usd")),
        20,
        what="two rows of each ticker",
    )
    for _ in range(3):
        assert serve.get("/prices/latest", ticker="btc_usd").status_code == 200
    assert serve.get("/prices", ticker="btc_usd", limit=5).status_code == 200
    assert serve.get("/nope/123").status_code == 404
    response = serve.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text

    stored = polled_and_stored(text)
    assert stored >= 2
    latest = serve.get("/prices/latest", ticker="btc_usd").json()
    newest = value(text, "crypto_client_newest_price_timestamp_seconds", ticker="btc_usd")
    assert latest["ts"] - 5 <= newest <= latest["ts"]
    assert value(text, "crypto_client_latest_price", ticker="eth_usd") > 0
    assert 0 < value(text, "crypto_client_coverage_ratio", ticker="btc_usd") <= 1
    route = {"method": "GET", "route": "/prices/latest", "status": "200"}
    assert value(text, "crypto_client_http_request_duration_seconds_count", **route) >= 3
    assert (
        value(
            text,
            "crypto_client_deribit_request_duration_seconds_count",
            method="public/get_index_price",
            outcome="ok",
        )
        >= 4
    )
    assert value(text, "crypto_client_database_write_duration_seconds_count") >= 2
    # Bounded labels: route templates, never raw paths or query strings.
    routes = {
        dict(labels).get("route") for (name, labels) in samples(text) if name.startswith("crypto_client_http")
    }
    assert "unmatched" in routes
    assert not any(route and ("?" in route or "123" in route) for route in routes)


def test_a_ticker_outside_tickers_is_counted_as_other(sim: SimServer, tmp_path: Path) -> None:
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/other.db",
        "DERIBIT_RPC_URL": sim.rpc_url,
        "TICKERS": "btc_usd,no_such_index",
        "INGEST_INTERVAL_SECONDS": "1",
        "BACKFILL_INTERVAL_SECONDS": "0",
    }

    def outcomes_once_the_failure_is_counted() -> list[dict[str, str]]:
        text = server.get("/metrics").text
        counted = [
            dict(labels) for (name, labels) in samples(text) if name == "crypto_client_ingest_outcomes_total"
        ]
        failed = any(
            labels["ticker"] == "no_such_index" and labels["status"] == "failed" for labels in counted
        )
        return counted if failed else []

    with ApiServer.command("serve", env, tmp_path, ready_path="/health") as server:
        # A tick counts its outcomes after its rows are committed and its failures recorded, so
        # btc_usd's row can be read before the count: wait for the count itself.
        counted = wait_until(outcomes_once_the_failure_is_counted, 20, what="the failed ticker's outcome")
    assert all(labels["ticker"] in {"btc_usd", "no_such_index"} for labels in counted)


@pytest.fixture(scope="module")
async def metrics_database() -> AsyncIterator[str]:
    url = await create_pg_database()
    yield url
    await drop_pg_database(url)


def test_api_workers_share_their_metrics(metrics_database: str, tmp_path: Path) -> None:
    """`--workers 2`: whichever worker answers /metrics counts the requests of both."""
    env = {"DATABASE_URL": metrics_database, "TICKERS": "btc_usd", "LOG_LEVEL": "WARNING"}
    port = free_port()
    args = crypto_client("api", "--port", str(port), "--workers", "2")
    with ApiServer(args, env, tmp_path / "api-workers.log", port=port) as api:
        with local_http.client(base_url=api.url) as client:
            for _ in range(40):
                assert client.get("/tickers").status_code == 200
        counts = set()
        for _ in range(6):  # new connections: both workers get to answer
            text = local_http.get(api.url + "/metrics", timeout=10).text
            counts.add(
                value(
                    text,
                    "crypto_client_http_request_duration_seconds_count",
                    method="GET",
                    route="/tickers",
                    status="200",
                )
            )
    assert counts == {40.0}


async def test_celery_pool_processes_are_reported_by_the_worker(
    sim: SimServer, redis_server: ThrowawayRedis, tmp_path: Path
) -> None:
    db_url = await create_pg_database()
    port = free_port()
    stack = CeleryStack(
        tmp=tmp_path,
        sim=sim,
        db_url=db_url,
        broker_url=redis_server.url,
        extra_env={"METRICS_PORT": str(port)},
        # A slot long enough that the tick is never late, however slowly the pool starts.
        interval=60,
    )
    try:
        stack.worker(concurrency=2)
        stack.publish_tick()

        def stored() -> float:
            return polled_and_stored(local_http.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)

        assert wait_until(stored, 30, what="the pool's outcome counted by the main process") == 1
    finally:
        stack.stop_all()
        await drop_pg_database(db_url)


def test_the_stream_consumer_serves_its_metrics(
    sim: SimServer, metrics_database: str, tmp_path: Path
) -> None:
    sim.faults(stream_interval_ms=100)
    port = free_port()
    env = {
        "DATABASE_URL": metrics_database,
        "DERIBIT_WS_URL": sim.ws_url,
        "TICKERS": "btc_usd",
        "INGEST_INTERVAL_SECONDS": "1",
        "METRICS_PORT": str(port),
    }
    consumer = Process(crypto_client("stream"), env, tmp_path / "stream.log")
    try:

        def connected_with_prices() -> str | None:
            text = local_http.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            ok = value(text, "crypto_client_stream_connected") == 1
            return (
                text if ok and value(text, "crypto_client_stream_messages_total", kind="price") > 3 else None
            )

        text = wait_until(connected_with_prices, 20, what="stream metrics")
        sim.faults(ws_disconnects=1)
        wait_until(
            lambda: (
                value(
                    local_http.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text,
                    "crypto_client_stream_reconnects_total",
                )
                >= 1
            ),
            20,
            what="a reconnect counted",
        )
    finally:
        consumer.stop()
    assert text is not None
    assert "crypto_client_stream_messages_total" in text


def test_prometheus_config_and_grafana_dashboard_ask_for_what_exists(serve: ApiServer) -> None:
    wait_until(lambda: serve.get("/prices", ticker="btc_usd").json(), 20, what="a tick")
    exposed = family_names(serve.get("/metrics").text)

    config = yaml.safe_load((MONITORING / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"api", "worker", "beat", "stream"}
    assert jobs["api"].get("metrics_path", "/metrics") == "/metrics"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name, job in jobs.items():
        targets = [
            target.split(":") for config in job.get("static_configs", []) for target in config["targets"]
        ]
        targets += [(host, str(sd["port"])) for sd in job.get("dns_sd_configs", []) for host in sd["names"]]
        assert targets, name
        for host, port in targets:
            assert host in compose, host
            if name == "api":
                assert any(mapping.endswith(f":{port}") for mapping in compose[host]["ports"]), port
            else:
                assert compose[host]["environment"]["METRICS_PORT"] == port, name
    for name in ("prometheus", "grafana"):
        assert compose[name]["profiles"] == ["monitoring"]

    dashboard = json.loads((MONITORING / "grafana" / "dashboards" / "crypto-client.json").read_text())
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queried.update(re.findall(r"\b(crypto_client_[a-z0-9_]+)", target["expr"]))
    assert len(queried) >= 5
    assert queried <= exposed, queried - exposed
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("price", "fresh", "ingestion", "latency"):
        assert topic in titles
