"""Settings built from explicit values only, never from the environment or a .env file."""

from pydantic import SecretStr

from crypto_client.config import Settings
from tests.support.services import SimServer


def make_settings(database_url: str, **overrides: object) -> Settings:
    """Settings from these values alone (model_validate reads no environment and no .env)."""
    return Settings.model_validate({"database_url": SecretStr(database_url), **overrides})


INGEST_TICKERS = ("btc_usd", "eth_usd", "sol_usdc")


def ingestion_settings(sim: SimServer, db_url: str, **overrides: object) -> Settings:
    """Settings for ingesting INGEST_TICKERS from the simulator, with quick retries."""
    values: dict[str, object] = {
        "tickers": ",".join(INGEST_TICKERS),
        "deribit_rpc_url": sim.rpc_url,
        "deribit_timeout_seconds": 5,
        "deribit_max_retries": 2,
        "deribit_retry_backoff_seconds": 0.01,
        "ingest_interval_seconds": 60,
        **overrides,
    }
    return make_settings(db_url, **values)
