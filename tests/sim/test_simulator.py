"""The simulator over real HTTP: Deribit's envelopes and errors, determinism, fault knobs."""

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from crypto_client.sim.faults import HostileFrame
from tests.support import local_http
from tests.support.services import Process, SimServer, crypto_client, free_port
from tests.support.waiting import wait_until


def get(sim: SimServer, method: str, **params: str) -> httpx.Response:
    return local_http.get(f"{sim.rpc_url}/public/{method}", params=params, timeout=5)


def post(sim: SimServer, payload: object) -> httpx.Response:
    return local_http.post(sim.rpc_url, json=payload, timeout=5)


def test_get_envelope_has_deribits_fields(sim: SimServer) -> None:
    response = get(sim, "get_index_price", index_name="btc_usd")
    body = response.json()
    assert response.status_code == 200
    assert set(body) == {"jsonrpc", "result", "usIn", "usOut", "usDiff", "testnet"}  # no id on plain GET
    assert body["jsonrpc"] == "2.0"
    assert body["testnet"] is False
    assert body["usDiff"] == body["usOut"] - body["usIn"]
    assert abs(body["usOut"] / 1e6 - time.time()) < 60
    assert set(body["result"]) == {"index_price", "estimated_delivery_price"}


@pytest.mark.parametrize("request_id", [42, "abc"])
def test_post_echoes_the_id(sim: SimServer, request_id: object) -> None:
    payload = {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "public/get_index_price",
        "params": {"index_name": "eth_usd"},
    }
    body = post(sim, payload).json()
    assert body["id"] == request_id
    assert body["result"]["index_price"] > 0


def test_unknown_index_is_invalid_params_with_400(sim: SimServer) -> None:
    response = get(sim, "get_index_price", index_name="nope_usd")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == -32602
    assert error["message"] == "Invalid params"
    assert error["data"]["param"] == "index_name"


def test_unknown_method_and_bad_requests(sim: SimServer) -> None:
    assert get(sim, "no_such_method").json()["error"]["code"] == -32601
    assert get(sim, "no_such_method").status_code == 400
    batch = post(sim, [{"jsonrpc": "2.0", "method": "public/test"}])
    assert (batch.status_code, batch.json()["error"]["code"]) == (400, -32600)
    positional = post(
        sim, {"jsonrpc": "2.0", "id": 1, "method": "public/get_index_price", "params": ["btc_usd"]}
    )
    assert positional.json()["error"]["code"] == -32602
    garbage = local_http.post(sim.rpc_url, content=b"{not json", timeout=5)
    assert garbage.json()["error"]["code"] == -32700


def test_discovery_time_and_test_methods(sim: SimServer) -> None:
    names = get(sim, "get_index_price_names").json()["result"]
    assert "drbfix-btc_usdc" in names
    assert len(names) >= 47
    assert abs(get(sim, "get_time").json()["result"] / 1000 - time.time()) < 60
    assert "version" in get(sim, "test").json()["result"]


def test_prices_have_each_index_magnitude_and_decimals(sim: SimServer) -> None:
    btc = get(sim, "get_index_price", index_name="btc_usd").text
    shib = get(sim, "get_index_price", index_name="shib_usdc").json()["result"]["index_price"]
    price_text = btc.split('"index_price":')[1].split(",")[0].rstrip("}")
    assert 10_000 < float(price_text) < 200_000
    assert len(price_text.split(".")[1]) <= 2
    assert 0 < shib < 0.001


@pytest.fixture
def twin_sims(tmp_path: Path) -> Iterator[tuple[SimServer, SimServer, SimServer]]:
    sims = (SimServer(tmp_path, seed=7), SimServer(tmp_path, seed=7), SimServer(tmp_path, seed=8))
    yield sims
    for sim in sims:
        sim.stop()


def test_same_seed_same_prices(twin_sims: tuple[SimServer, SimServer, SimServer]) -> None:
    def sequence(sim: SimServer) -> list[float]:
        return [
            get(sim, "get_index_price", index_name="btc_usd").json()["result"]["index_price"]
            for _ in range(5)
        ]

    first, second, other = (sequence(sim) for sim in twin_sims)
    assert first == second
    assert first != other
    assert len(set(first)) > 1  # it is a walk, not a constant


@pytest.mark.parametrize(
    ("kind", "status"),
    [("error", 503), ("malformed", 200), ("bad_result", 200), ("rate_limit", 429)],
)
def test_fail_next_kinds(sim: SimServer, kind: str, status: int) -> None:
    sim.faults("btc_usd", fail_next=1, fail_next_kind=kind)
    failed = get(sim, "get_index_price", index_name="btc_usd")
    assert failed.status_code == status
    if kind == "rate_limit":
        assert failed.json()["error"]["code"] == 10028
    if kind == "malformed":
        with pytest.raises(json.JSONDecodeError):
            json.loads(failed.content)
    assert get(sim, "get_index_price", index_name="btc_usd").status_code == 200


def test_drop_closes_the_connection_mid_response(sim: SimServer) -> None:
    sim.faults(fail_next=1, fail_next_kind="drop")
    with pytest.raises(httpx.RemoteProtocolError):
        get(sim, "get_index_price", index_name="btc_usd")


def test_timeout_hangs(sim: SimServer) -> None:
    sim.faults(fail_next=1, fail_next_kind="timeout")
    with pytest.raises(httpx.ReadTimeout):
        local_http.get(f"{sim.rpc_url}/public/get_index_price", params={"index_name": "btc_usd"}, timeout=0.5)


def test_latency_outage_and_per_index_scope(sim: SimServer) -> None:
    sim.faults("eth_usd", latency_ms=300)
    started = time.monotonic()
    get(sim, "get_index_price", index_name="eth_usd")
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    get(sim, "get_index_price", index_name="btc_usd")
    assert time.monotonic() - started < 0.3

    sim.faults(outage=True)
    assert get(sim, "get_index_price", index_name="btc_usd").status_code == 503
    sim.reset()
    assert get(sim, "get_index_price", index_name="btc_usd").status_code == 200


def test_absurd_envelope_times_per_index(sim: SimServer) -> None:
    huge = "9" * 300
    sim.faults("eth_usd", us_out_literal=huge)
    sim.faults("sol_usdc", us_out_literal='"' + "9" * 5000 + '"')
    assert get(sim, "get_index_price", index_name="eth_usd").json()["usOut"] == int(huge)
    served = get(sim, "get_index_price", index_name="sol_usdc").text
    assert f'"usOut":"{"9" * 5000}"' in served.replace(" ", "")
    untouched = get(sim, "get_index_price", index_name="btc_usd").json()
    assert abs(untouched["usOut"] / 1e6 - time.time()) < 60


def test_rates_are_drawn(sim: SimServer) -> None:
    sim.faults(error_rate=0.5)
    statuses = [get(sim, "get_index_price", index_name="btc_usd").status_code for _ in range(40)]
    assert 5 < statuses.count(503) < 35
    assert statuses.count(200) == 40 - statuses.count(503)


def test_admin_rejects_unknown_knobs(sim: SimServer) -> None:
    response = local_http.put(f"{sim.url}/_sim/faults", json={"explode": True})
    assert response.status_code == 422
    assert "explode" in response.json()["detail"]
    assert local_http.put(f"{sim.url}/_sim/faults", json={"error_rate": 2}).status_code == 422


def test_start_time_faults_from_the_command_line(tmp_path: Path) -> None:
    port = free_port()
    process = Process(crypto_client("sim", "--port", str(port), "--outage"), {}, tmp_path / "sim.log")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: local_http.get(f"{url}/_sim/stats").status_code == 200, 20, what="sim")
        response = local_http.get(f"{url}/api/v2/public/get_index_price", params={"index_name": "btc_usd"})
        assert response.status_code == 503
    finally:
        process.stop()


def served(sim: SimServer, after: int) -> list[dict[str, Any]]:
    """Every record from `after` on, page by page."""
    records: list[dict[str, Any]] = []
    while True:
        response = local_http.get(f"{sim.url}/_sim/served", params={"after": after, "limit": 100_000})
        response.raise_for_status()
        page = response.json()
        records += page["served"]
        if page["next"] >= page["total"]:
            return records
        after = page["next"]


def served_so_far(sim: SimServer) -> int:
    total: int = local_http.get(f"{sim.url}/_sim/served", params={"limit": 1}).json()["total"]
    return total


def test_served_record_holds_every_price_with_its_envelope(sim: SimServer) -> None:
    start = served_so_far(sim)
    answers = [get(sim, "get_index_price", index_name="btc_usd") for _ in range(3)]
    sim.faults("btc_usd", fail_next=1, fail_next_kind="bad_result")
    assert get(sim, "get_index_price", index_name="btc_usd").status_code == 200  # a fault: not a price
    sim.faults("eth_usd", clock_offset_seconds=-30)
    lied = get(sim, "get_index_price", index_name="eth_usd")
    records = served(sim, start)
    assert [r["kind"] for r in records] == ["index_price"] * 4
    for answer, record in zip(answers, records, strict=False):
        body = json.loads(answer.text, parse_float=Decimal)
        assert Decimal(record["price"]) == body["result"]["index_price"]
        assert (record["us_in"], record["us_out"]) == (body["usIn"], body["usOut"])
        assert abs(record["served_ms"] - body["usOut"] // 1000) < 1000
    envelope = lied.json()
    assert records[3]["us_out"] == envelope["usOut"]
    assert records[3]["served_ms"] - envelope["usOut"] // 1000 > 29_000  # the true time, not the lie
    assert served(sim, start + 3) == records[3:]


def test_served_record_holds_chart_points_once_and_stream_notifications(sim: SimServer) -> None:
    start = served_so_far(sim)
    get(sim, "get_index_price", index_name="btc_usd")
    # The second answer may hold a newer bucket than the first (time goes on between them).
    first = sim.chart("btc_usd", "1h")
    points = set(first) | set(sim.chart("btc_usd", "1h"))
    charted = [r for r in served(sim, start) if r["kind"] == "chart"]
    assert len(charted) <= len(points)  # points charted by an earlier test are not repeated
    assert len(charted) == len({(r["ts_ms"], r["price"]) for r in charted})
    assert {(r["ts_ms"], Decimal(r["price"])) for r in charted} <= points
    assert any(r["ts_ms"] == first[-1][0] for r in charted)  # the newest point is new

    sim.faults(stream_interval_ms=50)
    with ws_connect(sim.ws_url) as websocket:
        websocket.send(
            json.dumps(
                {
                    "id": 1,
                    "method": "public/subscribe",
                    "params": {"channels": ["deribit_price_index.eth_usd"]},
                }
            )
        )
        notifications: list[dict[str, Any]] = []
        while len(notifications) < 3:
            message = json.loads(websocket.recv(), parse_float=Decimal)
            if message.get("method") == "subscription":
                notifications.append(message["params"]["data"])
    streamed = [r for r in served(sim, start) if r["kind"] == "ws"][:3]
    assert [(r["index"], Decimal(r["price"]), r["timestamp"]) for r in streamed] == [
        (n["index_name"], n["price"], n["timestamp"]) for n in notifications
    ]


def test_served_record_holds_each_trades_index_price_once(sim: SimServer) -> None:
    start = served_so_far(sim)
    now_ms = int(time.time()) * 1000
    window = {
        "instrument_name": "BTC-PERPETUAL",
        "start_timestamp": str(now_ms - 3_600_000),
        "end_timestamp": str(now_ms),
    }
    answers = [get(sim, "get_last_trades_by_instrument_and_time", **window) for _ in range(2)]
    trades = json.loads(answers[0].text, parse_float=Decimal)["result"]["trades"]
    assert trades
    # Each trade once, however often served (this session's earlier tests may have asked for
    # some), under the index it prices.
    ever = [(r["index"], r["ts_ms"], Decimal(r["price"])) for r in served(sim, 0) if r["kind"] == "trade"]
    assert len(ever) == len(set(ever))
    assert {("btc_usd", t["timestamp"], t["index_price"]) for t in trades} <= set(ever)
    new = [(r["index"], r["ts_ms"], Decimal(r["price"])) for r in served(sim, start) if r["kind"] == "trade"]
    assert set(new) <= {("btc_usd", t["timestamp"], t["index_price"]) for t in trades}


def test_served_record_rejects_bad_positions(sim: SimServer) -> None:
    response = local_http.get(f"{sim.url}/_sim/served", params={"after": "-1"})
    assert response.status_code == 422
    assert "after" in response.json()["detail"]


@contextlib.contextmanager
def subscribe(
    sim_ws_url: str, *channels: str, before_answer: list[dict[str, Any]] | None = None
) -> Iterator[ClientConnection]:
    """A WebSocket client of the simulator subscribed to `channels`, its answer read. The
    notifications that came before the answer (channels nobody subscribed to, say) are put in
    `before_answer`, if given, else refused."""
    with ws_connect(sim_ws_url, max_size=None, open_timeout=5) as client:
        request = {"jsonrpc": "2.0", "id": 1, "method": "public/subscribe", "params": {"channels": channels}}
        client.send(json.dumps(request))
        while (message := json.loads(client.recv(timeout=5))).get("id") != 1:
            assert before_answer is not None, f"a frame before the subscription's answer: {message}"
            before_answer.append(message)
        assert message["result"] == list(channels)
        yield client


def frames(client: ClientConnection, count: int) -> list[str | bytes]:
    return [client.recv(timeout=5) for _ in range(count)]


def frames_until_closed(client: ClientConnection) -> list[str | bytes]:
    """Every frame until the server closes the connection (a 5 s silence fails instead)."""
    received: list[str | bytes] = []
    try:
        while True:
            received.append(client.recv(timeout=5))
    except ConnectionClosed:
        return received


def test_unsubscribed_notifications_come_only_with_a_subscriptions(sim: SimServer) -> None:
    """Before a connection subscribes, the push loop's rounds carry heartbeats only: an
    unsubscribed channel's notification rides with the subscribed ones, never ahead of the
    subscription's answer."""
    sim.faults(
        ws_unsubscribed_channels=["deribit_price_index.eth_usd"], stream_interval_ms=100, heartbeat_scale=0.1
    )
    with ws_connect(sim.ws_url, max_size=None, open_timeout=5) as client:
        interval = {"interval": 10}  # Deribit's floor; the scale makes it 1 s
        client.send(
            json.dumps({"jsonrpc": "2.0", "id": 1, "method": "public/set_heartbeat", "params": interval})
        )
        heartbeats = 0
        while heartbeats < 2:  # ten rounds of the push loop between the two
            message = json.loads(client.recv(timeout=5))
            assert message.get("method") != "subscription", message
            if message.get("method") == "heartbeat":
                heartbeats += 1
                client.send(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "public/test", "params": {}}))
    with subscribe(sim.ws_url, "deribit_price_index.btc_usd") as client:
        channels = [json.loads(frame)["params"]["channel"] for frame in frames(client, 2)]
    assert channels == ["deribit_price_index.btc_usd", "deribit_price_index.eth_usd"]


def test_stream_sends_each_hostile_frame_once_at_run_time(sim: SimServer) -> None:
    sim.faults(stream_interval_ms=100)
    kinds = list(HostileFrame)
    with subscribe(sim.ws_url, "deribit_price_index.btc_usd") as client:
        frames(client, 1)
        sim.faults(ws_hostile_next=kinds)
        received = frames(client, 30)
    texts = [frame for frame in received if isinstance(frame, str)]
    signatures: dict[str, Callable[[str], bool]] = {
        "huge": lambda frame: len(frame) > 2 * 2**20,
        "deep_nesting": lambda frame: "[" * 10_000 in frame,
        "heartbeat_params_not_object": lambda frame: '"params":["test_request"]' in frame,
        "timestamp_overflow": lambda frame: '"timestamp":1e400' in frame,
        "string_price": lambda frame: '"price":"43000.5"' in frame,
        "index_name_mismatch": lambda frame: '"index_name":"btc_usdx"' in frame,
        "not_json": lambda frame: frame.startswith("<html>"),
        "not_an_object": lambda frame: frame.startswith("["),
        "truncated": lambda frame: frame.endswith('"params":{"chan'),
    }
    assert set(signatures) | {"binary"} == set(kinds)
    for kind, matches in signatures.items():
        assert sum(1 for frame in texts if matches(frame)) == 1, kind  # once each
    assert sum(1 for frame in received if isinstance(frame, bytes)) == 1
    assert local_http.get(f"{sim.url}/_sim/faults").json()["default"]["ws_hostile_next"] == []


def test_stream_unsubscribed_channels_drops_and_the_connection_log(sim: SimServer) -> None:
    sim.faults(
        stream_interval_ms=100,
        ws_unsubscribed_channels=["deribit_price_index.eth_usd", "trades.BTC-PERPETUAL.raw"],
        ws_drop_after=3,
    )
    # The stray channels come every tick, from the connection's start: some may come before
    # the subscription's answer.
    before_answer: list[dict[str, Any]] = []
    with subscribe(sim.ws_url, "deribit_price_index.btc_usd", before_answer=before_answer) as client:
        after_answer = frames_until_closed(client)
    messages = before_answer + [json.loads(frame) for frame in after_answer]
    channels = [message["params"]["channel"] for message in messages]
    assert channels.count("deribit_price_index.btc_usd") == 3
    ticks = channels.count("deribit_price_index.eth_usd")
    assert ticks >= 3
    assert channels.count("trades.BTC-PERPETUAL.raw") == ticks
    [record] = wait_until(
        lambda: [r for r in sim.stats()["ws_connections"] if r["closed"]], 5, what="the log"
    )
    assert record["opened"] <= record["subscribed"] <= record["closed"]
    assert record["notifications"] == 3


def test_stream_stall_and_drop_at_run_time(sim: SimServer) -> None:
    sim.faults(stream_interval_ms=100)
    with subscribe(sim.ws_url, "deribit_price_index.btc_usd") as client:
        frames(client, 1)
        sim.faults(ws_stall=True)
        with contextlib.suppress(TimeoutError):
            while True:  # what was already on its way
                client.recv(timeout=0.5)
        client.send(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "public/test", "params": {}}))
        with pytest.raises(TimeoutError):
            client.recv(timeout=1)  # neither notifications nor answers
        sim.faults(ws_stall=False, ws_disconnects=1)
        frames_until_closed(client)


def test_admin_rejects_unknown_hostile_frames(sim: SimServer) -> None:
    response = local_http.put(f"{sim.url}/_sim/faults", json={"ws_hostile_next": ["explode"]})
    assert response.status_code == 422
    assert "explode" in response.json()["detail"]


@pytest.mark.slow
def test_stream_faults_from_the_command_line(tmp_path: Path) -> None:
    hostile = SimServer(
        tmp_path,
        0,
        "--ws-hostile",
        "string_price",
        "--ws-unsubscribed-channel",
        "deribit_price_index.eth_usd",
        "--ws-drop-after",
        "2",
    )
    stalled = SimServer(tmp_path, 0, "--ws-stall")
    try:
        with subscribe(hostile.ws_url, "deribit_price_index.btc_usd") as client:
            received = frames(client, 5)
            with pytest.raises(ConnectionClosed):
                client.recv(timeout=5)
        assert '"price":"43000.5"' in received[0]
        assert sum('"deribit_price_index.eth_usd"' in frame for frame in received) == 2
        with ws_connect(stalled.ws_url, open_timeout=5) as client:
            client.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "public/test", "params": {}}))
            with pytest.raises(TimeoutError):
                client.recv(timeout=1)
    finally:
        hostile.stop()
        stalled.stop()


def chart(sim: SimServer) -> list[object]:
    response = local_http.get(
        f"{sim.rpc_url}/public/get_index_chart_data",
        params={"index_name": "btc_usd", "range": "1h"},
        timeout=5,
    )
    assert response.status_code == 200, response.text
    result: list[object] = json.loads(response.text)["result"]
    return result


def test_chart_answers_empty_or_out_of_window_at_run_time(sim: SimServer) -> None:
    normal = chart(sim)
    assert len(normal) > 100
    sim.faults("btc_usd", chart_empty_rate=1.0)
    assert chart(sim) == []
    assert get(sim, "get_index_price", index_name="btc_usd").status_code == 200  # polls are unharmed
    sim.reset()
    sim.faults(chart_out_of_window_rate=1.0)
    stale = chart(sim)
    now_ms = time.time() * 1000
    assert len(stale) > 100
    # Every point lies before the 1h window that was asked for.
    assert all(isinstance(p, list) and now_ms - 7_300_000 < p[0] < now_ms - 3_600_000 for p in stale)


def test_chart_bad_points_are_null_zero_negative_or_strings(sim: SimServer) -> None:
    # A price served before is in the chart as its exact literal: spoilt into a string too.
    get(sim, "get_index_price", index_name="btc_usd")
    sim.faults(chart_bad_point_rate=1.0)
    points = chart(sim)
    kinds = set()
    for point in points[:10]:
        if point is None:
            kinds.add("null point")
            continue
        assert isinstance(point, list)
        _ts, price = point
        kinds.add(
            "null"
            if price is None
            else "string"
            if isinstance(price, str)
            else "zero"
            if price == 0
            else "negative"
            if price < 0
            else "good"
        )
    assert kinds == {"null point", "null", "zero", "negative", "string"}
    sim.faults(chart_bad_point_rate=0.3)
    some = chart(sim)
    good = [p for p in some if isinstance(p, list) and isinstance(p[1], float) and p[1] > 0]
    assert 0.5 * len(some) < len(good) < 0.9 * len(some)


def test_chart_faults_from_the_command_line(tmp_path: Path) -> None:
    port = free_port()
    process = Process(
        crypto_client("sim", "--port", str(port), "--chart-empty-rate", "1"), {}, tmp_path / "sim.log"
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: local_http.get(f"{url}/_sim/stats").status_code == 200, 20, what="sim")
        faults = local_http.get(f"{url}/_sim/faults").json()["default"]
        assert (faults["chart_empty_rate"], faults["chart_bad_point_rate"]) == (1.0, 0.0)
        response = local_http.get(
            f"{url}/api/v2/public/get_index_chart_data", params={"index_name": "btc_usd", "range": "1h"}
        )
        assert response.json()["result"] == []
        stats = local_http.get(f"{url}/_sim/stats").json()
        assert stats["methods"]["public/get_index_chart_data"] == {"requests": 1, "max_in_flight": 1}
    finally:
        process.stop()


def test_max_connections_refuses_the_next_connection_with_a_bare_429(tmp_path: Path) -> None:
    capped = SimServer(tmp_path, 0, "--max-connections", "2")
    try:
        # Two idle keep-alive connections fill the cap: connections count, not requests.
        held = [local_http.client(), local_http.client()]
        for client in held:
            assert client.get(f"{capped.rpc_url}/public/test").status_code == 200
        refused = local_http.get(f"{capped.rpc_url}/public/test")
        assert refused.status_code == 429
        assert refused.content == b""
        stats = capped.stats  # its own connection would be refused too: free one first
        held.pop().close()
        wait_until(lambda: stats()["refused_connections"] >= 1, 10, what="the refusal counted")
        assert stats()["max_connections_open"] == 2
    finally:
        for client in held:
            client.close()
        capped.stop()


def test_spoilt_chart_points_are_not_in_the_served_record(sim: SimServer) -> None:
    start = served_so_far(sim)
    sim.faults("eth_usd", chart_bad_point_rate=1.0)
    answer = local_http.get(
        f"{sim.rpc_url}/public/get_index_chart_data", params={"index_name": "eth_usd", "range": "1h"}
    )
    assert answer.status_code == 200
    assert answer.json()["result"]  # every point spoilt, none missing
    assert [r for r in served(sim, start) if r["kind"] == "chart"] == []
