"""Rows as data frames, prices as exact decimal columns: pandas holds them as `Decimal`
objects (object dtype), Polars as `Decimal(38, 18)`, which holds every price the service
stores (below 10^20, at most 18 places) exactly. Install the extras `[pandas]` or `[polars]`."""

import dataclasses
import typing
from collections.abc import Iterable
from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas
    import polars

POLARS_DECIMAL_PRECISION = 38
POLARS_DECIMAL_SCALE = 18


def _value_fields(row_type: type[Any]) -> list[str]:
    """A row type's fields, less a price's `event_id` (a place in one stream, not a value)."""
    if dataclasses.is_dataclass(row_type):
        return [f.name for f in dataclasses.fields(row_type)]
    return [name for name in row_type._fields if name != "event_id"]


def _columns(rows: Iterable[Any], row_type: type[Any]) -> tuple[dict[str, list[Any]], set[str]]:
    """The rows as columns, and which of them are decimal."""
    fields = _value_fields(row_type)
    hints = typing.get_type_hints(row_type)
    decimals = {name for name in fields if hints[name] in (Decimal, Decimal | None)}
    columns: dict[str, list[Any]] = {name: [] for name in fields}
    appenders = [(columns[name].append, name) for name in fields]
    for row in rows:
        for append, name in appenders:
            append(getattr(row, name))
    return columns, decimals


def to_pandas(rows: Iterable[Any], row_type: type[Any]) -> "pandas.DataFrame":
    try:
        import pandas
    except ImportError as exc:
        raise ImportError("to_pandas needs pandas: pip install 'crypto-client-sdk[pandas]'") from exc
    columns, decimals = _columns(rows, row_type)
    return pandas.DataFrame(
        {
            name: pandas.Series(values, dtype=object if name in decimals else None, name=name)
            for name, values in columns.items()
        }
    )


def to_polars(rows: Iterable[Any], row_type: type[Any]) -> "polars.DataFrame":
    try:
        import polars
    except ImportError as exc:
        raise ImportError("to_polars needs polars: pip install 'crypto-client-sdk[polars]'") from exc
    columns, decimals = _columns(rows, row_type)
    decimal = polars.Decimal(POLARS_DECIMAL_PRECISION, POLARS_DECIMAL_SCALE)
    return polars.DataFrame(
        [
            polars.Series(name, values, dtype=decimal if name in decimals else None, strict=True)
            for name, values in columns.items()
        ]
    )
