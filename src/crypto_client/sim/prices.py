"""Plausible index prices: a seeded random walk per index, at each index's magnitude."""

import math
import random
from decimal import Decimal

# Typical price and quoted decimals of the indexes in Deribit's reference (and a few of the
# `*_usd` forms a real `get_index_price_names` also lists).
INDEXES: dict[str, tuple[str, int]] = {
    "btc_usd": ("43521.37", 2),
    "eth_usd": ("2291.40", 2),
    "sol_usd": ("98.512", 3),
    "xrp_usd": ("0.6123", 4),
    "doge_usd": ("0.08229", 5),
    "ltc_usd": ("71.22", 2),
    "avax_usd": ("35.201", 3),
    "ada_usdc": ("0.4512", 4),
    "algo_usdc": ("0.1873", 4),
    "avax_usdc": ("35.214", 3),
    "bch_usdc": ("245.31", 2),
    "bnb_usdc": ("312.45", 2),
    "btc_usdc": ("43518.92", 2),
    "btcdvol_usdc": ("52.17", 2),
    "buidl_usdc": ("1.0000", 4),
    "doge_usdc": ("0.08231", 5),
    "dot_usdc": ("7.2341", 4),
    "eurr_usdc": ("1.0842", 4),
    "eth_usdc": ("2290.87", 2),
    "ethdvol_usdc": ("55.83", 2),
    "link_usdc": ("14.532", 3),
    "ltc_usdc": ("71.24", 2),
    "near_usdc": ("3.4521", 4),
    "paxg_usdc": ("2034.50", 2),
    "shib_usdc": ("0.00000921", 8),
    "sol_usdc": ("98.487", 3),
    "steth_usdc": ("2289.12", 2),
    "ton_usdc": ("2.3412", 4),
    "trump_usdc": ("12.345", 3),
    "trx_usdc": ("0.10523", 5),
    "uni_usdc": ("6.2314", 4),
    "usde_usdc": ("1.0001", 4),
    "usyc_usdc": ("1.0712", 4),
    "xrp_usdc": ("0.6121", 4),
    "btc_usdt": ("43530.11", 2),
    "eth_usdt": ("2292.05", 2),
    "eurr_usdt": ("1.0839", 4),
    "sol_usdt": ("98.534", 3),
    "steth_usdt": ("2289.77", 2),
    "usdc_usdt": ("1.0003", 4),
    "usde_usdt": ("1.0004", 4),
    "btc_eurr": ("40152.63", 2),
    "btc_usde": ("43510.44", 2),
    "btc_usyc": ("40631.90", 2),
    "eth_btc": ("0.052651", 6),
    "eth_eurr": ("2113.52", 2),
    "eth_usde": ("2290.33", 2),
    "eth_usyc": ("2139.12", 2),
    "steth_eth": ("0.9993", 4),
    "paxg_btc": ("0.046748", 6),
    "drbfix-btc_usdc": ("43519.05", 2),
    "drbfix-eth_usdc": ("2290.91", 2),
}

# Synthetic indexes (sim000_usd .. sim199_usd) so that tests and benchmarks can ingest more
# tickers than Deribit's reference lists.
SYNTHETIC_INDEXES: dict[str, tuple[str, int]] = {f"sim{n:03d}_usd": ("100.00", 2) for n in range(200)}

_STEP_VOLATILITY = 0.0005  # about a minute of index moves per step


class PriceWalk:
    """Each read of an index moves it one step; the same seed gives the same sequence."""

    def __init__(self, seed: int, indexes: dict[str, tuple[str, int]] | None = None) -> None:
        self._indexes = indexes if indexes is not None else {**INDEXES, **SYNTHETIC_INDEXES}
        self._seed = seed
        self._state: dict[str, tuple[random.Random, float]] = {}
        # Pinned prices are JSON number text, sent exactly as given ("1E+5" stays "1E+5").
        self.pinned: dict[str, str] = {}

    @property
    def names(self) -> list[str]:
        return list(self._indexes)

    def __contains__(self, name: str) -> bool:
        return name in self._indexes

    def price_at(self, name: str, ts_ms: int) -> Decimal:
        """A deterministic price of `name` at a time nothing was served (history before the
        simulator ran, or between requests)."""
        base, decimals = self._indexes[name]
        phase = random.Random(f"{self._seed}:{name}").random() * 2 * math.pi
        value = float(base) * (1 + 0.01 * math.sin(ts_ms / 3_600_000 + phase))
        return Decimal(value).quantize(Decimal(1).scaleb(-decimals))

    def next_price(self, name: str) -> Decimal:
        """The next step of the walk (pinned indexes are answered by the app as their text)."""
        base, decimals = self._indexes[name]
        rng, value = self._state.get(name) or (random.Random(f"{self._seed}:{name}"), float(base))
        value *= math.exp(rng.gauss(0.0, _STEP_VOLATILITY))
        self._state[name] = (rng, value)
        return Decimal(value).quantize(Decimal(1).scaleb(-decimals))
