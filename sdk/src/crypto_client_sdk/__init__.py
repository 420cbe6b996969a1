"""A typed client of the crypto-client API: every row across pages, exact `Decimal` prices,
Server-Sent Events with resume, `Retry-After` honoured. `Client` is synchronous,
`AsyncClient` its asynchronous twin."""

from crypto_client_sdk._protocol import RetryPolicy
from crypto_client_sdk.async_client import AsyncClient, AsyncRows
from crypto_client_sdk.client import Client, Rows
from crypto_client_sdk.errors import (
    CryptoClientError,
    InvalidRequest,
    NotFound,
    ProtocolError,
    RateLimited,
    RetryableError,
    ServerError,
    Unauthorized,
    Unavailable,
)
from crypto_client_sdk.models import (
    Bucket,
    Candle,
    Coverage,
    Gap,
    LatestPrice,
    Price,
    QualityDay,
    Settlement,
)

__all__ = [
    "AsyncClient",
    "AsyncRows",
    "Bucket",
    "Candle",
    "Client",
    "Coverage",
    "CryptoClientError",
    "Gap",
    "InvalidRequest",
    "LatestPrice",
    "NotFound",
    "Price",
    "ProtocolError",
    "QualityDay",
    "RateLimited",
    "RetryPolicy",
    "RetryableError",
    "Rows",
    "ServerError",
    "Settlement",
    "Unauthorized",
    "Unavailable",
]
