"""Amounts as users write them: a count ("16"), a share ("25%") or, where allowed, a byte size ("6GiB").

Expert budgets and prefetch budgets are parsed here, once, for the runtime, the planner and the simulator.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from offload.errors import BudgetError

_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class Amount:
    """A count (``16``), a share (``"25%"``) or, where allowed, a byte size (``"6GiB"``), as written by a user."""

    kind: str     # "count" | "share" | "bytes"
    value: float  # the count, the percentage, or bytes

    @classmethod
    def parse(cls, text: int | str, what: str, hint: str, sizes: bool = True,
              over: str = "the cache cannot hold more than every expert") -> Amount:
        """Parse and check sign and range (a share over 100% is a mistake: ``over`` says why); raises
        BudgetError naming ``what``."""
        clean = str(text).strip().lower().replace(" ", "")
        option = f"{what} {text!r}"
        if isinstance(text, bool):
            raise BudgetError(f"invalid {option}", hint)
        if isinstance(text, int) or re.fullmatch(r"[+-]?\d+", clean):
            return cls("count", int(clean))
        if m := re.fullmatch(r"([+-]?\d+(?:\.\d+)?)%", clean):
            pct = float(m.group(1))
            if pct > 100:
                raise BudgetError(f"{option} is over 100%", over)
            if pct <= 0 and what == "expert budget":
                raise BudgetError(f"{option} must be positive", hint)
            return cls("share", pct)
        if sizes and (m := re.fullmatch(r"([+-]?\d+(?:\.\d+)?)([kmgt]i?b|b)", clean)):
            nbytes = float(m.group(1)) * _SIZE_UNITS[m.group(2)]
            if nbytes <= 0:
                raise BudgetError(f"{option} must be positive", hint)
            return cls("bytes", nbytes)
        raise BudgetError(f"cannot parse {option}", hint)

    def of(self, total: int) -> int:
        """The count this amount names out of ``total`` (a share rounds down)."""
        return math.floor(total * self.value / 100 + 1e-9) if self.kind == "share" else int(self.value)


BUDGET_HINT = 'give slots (e.g. 16), a percentage ("25%") or a size ("6GiB")'
_PREFETCH_HINT = 'give slots (e.g. 4) or a share of the expert budget ("50%")'


def parse_budget(budget: int | str, total_experts: int, expert_nbytes: int) -> int:
    """Turn an expert budget into a number of cache slots.

    ``budget`` is an int (slots across all layers), a percentage string ("25%" of all experts)
    or a byte size ("6GiB", "64MiB", "500MB"). Byte sizes and slot counts larger than the model
    are clamped to all experts; a percentage over 100% is a mistake and raises.
    """
    amount = Amount.parse(budget, "expert budget", BUDGET_HINT)
    option = f"expert budget {budget!r}"
    if amount.kind == "bytes":
        slots = int(amount.value // expert_nbytes)
        if slots < 1:
            raise BudgetError(f"{option} is smaller than one expert ({expert_nbytes} bytes)",
                              "raise it to at least one expert")
    else:
        slots = amount.of(total_experts)
        if amount.kind == "share" and slots < 1:
            raise BudgetError(f"{option} is less than one expert of {total_experts}", "raise it to at least one slot")
    if slots <= 0:
        raise BudgetError(f"{option} must be at least 1 slot", BUDGET_HINT)
    return min(slots, total_experts)


def parse_prefetch_budget(budget: int | str, num_slots: int) -> int:
    """Turn a prefetch budget (slots, or a percentage of the cache's slots) into slots; 0 is allowed."""
    amount = Amount.parse(budget, "prefetch budget", _PREFETCH_HINT, sizes=False,
                          over="prefetches cannot hold more than the whole cache")
    if amount.value < 0:
        raise BudgetError(f"cannot parse prefetch budget {budget!r}", _PREFETCH_HINT)
    return min(amount.of(num_slots), num_slots)
