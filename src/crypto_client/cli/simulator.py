"""`crypto-client sim`: the Deribit simulator, with its faults set from options."""

from typing import Annotated

import typer

from crypto_client.cli.common import fail
from crypto_client.logging import setup_logging


def sim(
    host: Annotated[str, typer.Option(envvar="SIM_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="SIM_PORT")] = 8001,
    seed: Annotated[int, typer.Option(envvar="SIM_SEED", help="Seed of prices and fault draws.")] = 0,
    latency_ms: Annotated[float, typer.Option(envvar="SIM_LATENCY_MS", min=0)] = 0.0,
    error_rate: Annotated[float, typer.Option(envvar="SIM_ERROR_RATE", min=0, max=1)] = 0.0,
    timeout_rate: Annotated[float, typer.Option(envvar="SIM_TIMEOUT_RATE", min=0, max=1)] = 0.0,
    drop_rate: Annotated[float, typer.Option(envvar="SIM_DROP_RATE", min=0, max=1)] = 0.0,
    malformed_rate: Annotated[float, typer.Option(envvar="SIM_MALFORMED_RATE", min=0, max=1)] = 0.0,
    rate_limit_rate: Annotated[float, typer.Option(envvar="SIM_RATE_LIMIT_RATE", min=0, max=1)] = 0.0,
    outage: Annotated[bool, typer.Option(envvar="SIM_OUTAGE", help="Answer every request with 503.")] = False,
    chart_empty_rate: Annotated[float, typer.Option(envvar="SIM_CHART_EMPTY_RATE", min=0, max=1)] = 0.0,
    chart_out_of_window_rate: Annotated[
        float, typer.Option(envvar="SIM_CHART_OUT_OF_WINDOW_RATE", min=0, max=1)
    ] = 0.0,
    chart_bad_point_rate: Annotated[
        float, typer.Option(envvar="SIM_CHART_BAD_POINT_RATE", min=0, max=1)
    ] = 0.0,
    max_connections: Annotated[
        int | None,
        typer.Option(
            envvar="SIM_MAX_CONNECTIONS", min=1, help="Refuse connections beyond this many with HTTP 429."
        ),
    ] = None,
    chart_step_scale: Annotated[
        float,
        typer.Option(envvar="SIM_CHART_STEP_SCALE", min=0.001, help="Scale of the chart's point spacing."),
    ] = 1.0,
    ws_hostile: Annotated[
        list[str] | None,
        typer.Option(
            "--ws-hostile",
            help="A hostile frame the stream sends once a client subscribes (repeatable): truncated, "
            "not_json, not_an_object, binary, deep_nesting, huge, heartbeat_params_not_object, "
            "timestamp_overflow, string_price, index_name_mismatch.",
        ),
    ] = None,
    ws_unsubscribed_channel: Annotated[
        list[str] | None,
        typer.Option(
            "--ws-unsubscribed-channel",
            help="A channel every stream client gets, subscribed or not (repeatable).",
        ),
    ] = None,
    ws_drop_after: Annotated[
        int,
        typer.Option(
            envvar="SIM_WS_DROP_AFTER", min=0, help="Close each stream connection after N notifications."
        ),
    ] = 0,
    ws_stall: Annotated[
        bool, typer.Option(envvar="SIM_WS_STALL", help="Stream connections go silent without closing.")
    ] = False,
) -> None:
    """Run the Deribit simulator (offline development and tests).

    Faults can be changed while it runs: PUT /_sim/faults with a JSON object.
    """
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    from crypto_client.sim.app import create_sim_app
    from crypto_client.sim.connections import capped_protocol
    from crypto_client.sim.faults import Faults
    from crypto_client.sim.simulator import Simulator

    setup_logging("INFO")
    faults = Faults(
        latency_ms=latency_ms,
        error_rate=error_rate,
        timeout_rate=timeout_rate,
        drop_rate=drop_rate,
        malformed_rate=malformed_rate,
        rate_limit_rate=rate_limit_rate,
        outage=outage,
        chart_empty_rate=chart_empty_rate,
        chart_out_of_window_rate=chart_out_of_window_rate,
        chart_bad_point_rate=chart_bad_point_rate,
        max_connections=max_connections,
    )
    try:
        faults = faults.update(
            {
                "ws_hostile_next": ws_hostile or (),
                "ws_unsubscribed_channels": ws_unsubscribed_channel or (),
                "ws_drop_after": ws_drop_after,
                "ws_stall": ws_stall,
            }
        )
    except ValueError as exc:
        raise fail(f"--ws-hostile: {exc}") from None
    simulator = Simulator(seed, faults, chart_step_scale)
    uvicorn.run(
        create_sim_app(simulator),
        host=host,
        port=port,
        http=capped_protocol(
            AutoHTTPProtocol, simulator.connections, lambda: simulator.faults.default.max_connections
        ),
        log_config=None,
        access_log=False,
    )
