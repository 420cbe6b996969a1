"""The endpoints, one module per resource, assembled into the one router `app` includes.

A new endpoint goes into its resource's module (or a new one, added below): routes whose
query parameters may not repeat go into `checked`, the others into `router` directly.
"""

from fastapi import APIRouter, Depends

from crypto_client.api.deps import reject_repeated_parameters
from crypto_client.api.routes import (
    candles,
    coverage,
    export,
    health,
    metrics,
    pages,
    prices,
    quality,
    resample,
    settlements,
    stream,
    tickers,
)

# A parameter given twice is a 422 here (`reject_repeated_parameters`).
checked = APIRouter(dependencies=[Depends(reject_repeated_parameters)])
for module in (prices, candles, resample, export, coverage, quality, settlements, tickers, health, metrics):
    checked.include_router(module.router)

router = APIRouter()
router.include_router(checked)
# Parameters that repeat by design (`?ticker=a&ticker=b`), and the pages for people.
router.include_router(prices.repeatable_router)
router.include_router(stream.router)
router.include_router(pages.router)

__all__ = ["router"]
