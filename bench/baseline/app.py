"""The naive design: sync endpoints, an ORM session per request over psycopg2, one Pydantic
model per row, OFFSET paging, whole ranges loaded at once. Run against the same database."""

import os
from collections.abc import Iterator
from decimal import Decimal
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy import BigInteger, Numeric, String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

engine = create_engine(os.environ["BASELINE_DATABASE_URL"], pool_pre_ping=True)
SessionLocal = sessionmaker(bind=engine)


class Base(DeclarativeBase):
    pass


class PriceTickRow(Base):
    __tablename__ = "price_ticks"
    ticker: Mapped[str] = mapped_column(String(64), primary_key=True)
    ts: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    price: Mapped[Decimal] = mapped_column(Numeric)


class PriceOut(BaseModel):
    ticker: str
    price: float
    ts: int


def get_db() -> Iterator[Session]:
    db = SessionLocal()
    try:
        yield db
    finally:
        db.close()


DB = Annotated[Session, Depends(get_db)]
app = FastAPI()


@app.get("/prices")
def prices(ticker: str, db: DB, limit: int = 1000, offset: int = 0) -> list[PriceOut]:
    rows = (
        db.query(PriceTickRow)
        .filter(PriceTickRow.ticker == ticker)
        .order_by(PriceTickRow.ts)
        .offset(offset)
        .limit(limit)
        .all()
    )
    return [PriceOut(ticker=row.ticker, price=float(row.price), ts=row.ts) for row in rows]


@app.get("/prices/latest")
def latest(ticker: str, db: DB) -> PriceOut:
    row = (
        db.query(PriceTickRow).filter(PriceTickRow.ticker == ticker).order_by(PriceTickRow.ts.desc()).first()
    )
    if row is None:
        raise HTTPException(status_code=404, detail="no data")
    return PriceOut(ticker=row.ticker, price=float(row.price), ts=row.ts)


@app.get("/prices/range")
def price_range(ticker: str, db: DB, from_ts: int | None = None, to_ts: int | None = None) -> list[PriceOut]:
    query = db.query(PriceTickRow).filter(PriceTickRow.ticker == ticker)
    if from_ts is not None:
        query = query.filter(PriceTickRow.ts >= from_ts)
    if to_ts is not None:
        query = query.filter(PriceTickRow.ts <= to_ts)
    rows = query.order_by(PriceTickRow.ts).all()
    return [PriceOut(ticker=row.ticker, price=float(row.price), ts=row.ts) for row in rows]
