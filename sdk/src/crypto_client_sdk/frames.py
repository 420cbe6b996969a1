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


def _columns(rows: Iterable[Any], row_type: type[Any]) -> tuple[dict[str, list[Any]], set[str]]:
    """The row type's value fields (not `event_id`, which takes no part in equality) as
    columns, and which of them are decimal."""
    fields = [f for f in dataclasses.fields(row_type) if f.compare]
    hints = typing.get_type_hints(row_type)
    decimals = {f.name for f in fields if hints[f.name] in (Decimal, Decimal | None)}
    columns: dict[str, list[Any]] = {f.name: [] for f in fields}
    appenders = [(columns[f.name].append, f.name) for f in fields]
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
