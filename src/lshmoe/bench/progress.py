"""Progress lines of an interleaved A/B run, printed by rank 0 after every block of steps.

    [demo] 24/72 steps (33%) | lsh: 3.1% of rows sent, speedup 1.08x over baseline | 41 s elapsed

One plain line per block, flushed, so it reads the same in a terminal and through a pipe or a log.
The rate and the speedup are this rank's, over the measured (post-warm-up) steps so far: the rate
is rows sent / rows routed, the speedup the baseline's median step time over the variant's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from statistics import median


class Progress:
    def __init__(self, names: list[str], total_steps: int, baseline: str = "baseline", out: Callable = print):
        self.names, self.total, self.baseline, self.out = names, total_steps, baseline, out
        self.t0 = time.perf_counter()

    def line(self, done: int, rec: dict[str, dict[str, list[float]]]) -> str:
        parts = [f"[demo] {done}/{self.total} steps ({100 * done / max(1, self.total):.0f}%)"]
        base = rec.get(self.baseline, {}).get("step_time_s", [])
        for name in self.names:
            r = rec[name]
            if not r["step_time_s"]:
                continue
            bits = []
            routed = sum(r["rows_routed"])
            if routed and sum(r["rows_sent"]) != routed:
                bits.append(f"{100 * sum(r['rows_sent']) / routed:.1f}% of rows sent")
            if name != self.baseline and base:
                bits.append(f"speedup {median(base) / median(r['step_time_s']):.2f}x over {self.baseline}")
            if bits:
                parts.append(f"{name}: {', '.join(bits)}")
        if len(parts) == 1:
            parts.append("warming up")
        parts.append(f"{time.perf_counter() - self.t0:.0f} s elapsed")
        return " | ".join(parts)

    def report(self, done: int, rec: dict[str, dict[str, list[float]]]) -> None:
        self.out(self.line(done, rec), flush=True)
