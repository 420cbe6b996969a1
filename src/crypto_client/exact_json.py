"""JSON encoding that writes `Decimal` as the exact number it holds, not a float or a string."""

from decimal import Decimal
from typing import Any

import orjson


def _default(value: object) -> orjson.Fragment:
    if isinstance(value, Decimal):
        # str() of a finite Decimal is valid JSON number text (e.g. 43521.37, 1.2E-7).
        return orjson.Fragment(str(value))
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=_default)
