"""Prices as pure arithmetic: graduated tiers turn a period's quantity on one axis into micro-units
of money (integers; Decimal on the way, never float)."""
from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

QUANTUM = Decimal("0.000001")  # quantities are kept to six decimals (bytes -> MB, pixels -> MP)
MEGA = Decimal(1_000_000)

# [[up_to or None, unit_price_micros], ...] per axis, ordered; what a finalized period keeps.
Tiers = list[list[Any]]


def amount_micros(tiers: Tiers, quantity: Decimal) -> int:
    """Each unit is priced by the tier it falls in; units past the last bounded tier use the
    unbounded one, or are free when the plan has none."""
    total = Decimal(0)
    lower = Decimal(0)
    for up_to, unit_price in tiers:
        upper = Decimal(up_to) if up_to is not None else None
        top = quantity if upper is None else min(quantity, upper)
        if top > lower:
            total += (top - lower) * Decimal(unit_price)
        if upper is None or quantity <= upper:
            break
        lower = upper
    return int(total.quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def quantities(totals: dict[str, Any]) -> dict[str, Decimal]:
    """A period's billed quantity per axis, from summed rollups."""
    return {
        "images": Decimal(totals.get("images") or 0),
        "input_mb": (Decimal(totals.get("input_bytes") or 0) / MEGA).quantize(QUANTUM),
        "output_mp": Decimal(totals.get("output_megapixels") or 0).quantize(QUANTUM),
        "cpu_seconds": Decimal(totals.get("cpu_seconds") or 0).quantize(QUANTUM),
    }


def money(micros: int) -> str:
    """Micro-units as a decimal amount for people (6 places, exact)."""
    return str((Decimal(micros) / MEGA).quantize(QUANTUM))
