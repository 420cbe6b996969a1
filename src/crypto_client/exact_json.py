"""JSON encoding that writes `Decimal` as the exact number it holds, not a float or a string."""

from decimal import Decimal
from typing import Any

import orjson

from crypto_client.domain import plain_decimal


def _default(value: object) -> orjson.Fragment:
    if isinstance(value, Decimal):
        # Plain decimal text is valid JSON number text, in the one form every endpoint writes
        # (str() would write 1.5E-7).
        return orjson.Fragment(plain_decimal(value))
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=_default)
