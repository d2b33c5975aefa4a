"""Choosing the number of hashes L per layer from running statistics (beyond the paper).

The paper tunes L by hand (6 hashes ~ 20% of rows sent). Here a user sets one number instead:

- `rate` mode holds a target compression rate r* = rows sent / rows routed. Every step the
  compressor measures the rate every prefix L' <= L_max would have given on this step's rows (one
  hashing pass, since bucket ids of a prefix are the full id modulo b^L'); the controller keeps an
  exponential moving average per L' and picks the largest L' whose average rate is <= r*. More
  hashes give smaller buckets and a smaller restore error, so the largest admissible L' is best.
- `error` mode holds a restore-error budget e*: the restore-error probe measures, for every L', the
  relative error ||E(x) - (E(c) + x - c)|| / ||E(x)|| on sampled rows; the controller picks the
  smallest L' (most compression) whose average error is <= e*, and L_max until it has measurements.
"""

from __future__ import annotations

import math


class HashCountController:
    def __init__(self, mode: str, value: float, max_hashes: int, ema: float):
        assert mode in ("rate", "error"), mode
        self.mode, self.value, self.max_hashes, self.ema = mode, value, max_hashes, ema
        self.rate = [math.nan] * max_hashes  # index L' - 1
        self.error = [math.nan] * max_hashes

    @staticmethod
    def _update(avg: list[float], values: list[float], ema: float) -> None:
        for i, v in enumerate(values):
            if math.isfinite(v):
                avg[i] = v if not math.isfinite(avg[i]) else ema * avg[i] + (1 - ema) * v

    def observe_rates(self, rates: list[float]) -> None:
        self._update(self.rate, rates, self.ema)

    def observe_errors(self, errors: list[float]) -> None:
        self._update(self.error, errors, self.ema)

    def has_rates(self) -> bool:
        return any(math.isfinite(r) for r in self.rate)

    def choose(self) -> int:
        if self.mode == "rate":
            ok = [i + 1 for i, r in enumerate(self.rate) if math.isfinite(r) and r <= self.value]
            return max(ok) if ok else 1
        ok = [i + 1 for i, e in enumerate(self.error) if math.isfinite(e) and e <= self.value]
        return min(ok) if ok else self.max_hashes

    def state_dict(self) -> dict:
        return {"rate": list(self.rate), "error": list(self.error)}

    def load_state_dict(self, state: dict) -> None:
        self.rate, self.error = list(state["rate"]), list(state["error"])
