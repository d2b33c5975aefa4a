"""The demo's progress lines and its statement of where the compression rate was measured."""

from __future__ import annotations

from lshmoe.bench.demo import rate_note
from lshmoe.bench.progress import Progress

KEYS = ("step_time_s", "rows_routed", "rows_sent")


def test_progress_line_states_steps_rate_and_speedup():
    lines: list[str] = []
    p = Progress(["baseline", "lsh"], 72, out=lambda s, flush: lines.append((s, flush)))
    p.report(8, {n: {k: [] for k in KEYS} for n in ("baseline", "lsh")})
    rec = {
        "baseline": {"step_time_s": [0.5, 0.6, 0.55], "rows_routed": [100, 100, 100], "rows_sent": [100, 100, 100]},
        "lsh": {"step_time_s": [0.5, 0.44, 0.4], "rows_routed": [100, 100, 100], "rows_sent": [3, 4, 5]},
    }
    p.report(24, rec)
    (warm, f1), (line, f2) = lines
    assert f1 and f2, "flushed, so a pipe shows it at once"
    assert warm.startswith("[demo] 8/72 steps (11%)") and "warming up" in warm
    assert line.startswith("[demo] 24/72 steps (33%)")
    assert "lsh: 4.0% of rows sent, speedup 1.25x over baseline" in line  # 0.55 / 0.44
    assert "baseline:" not in line, "the baseline has no rate or speedup to show"


def test_rate_note_names_the_training_steps_it_measured():
    rows = [{"variant": "baseline", "compression_rate": 1.0}, {"variant": "lsh", "compression_rate": 0.037}]
    note = rate_note(rows, rounds=8, steps_per_round=4)
    assert "lsh sent 3.7%" in note and "training steps 5-36" in note and "baseline" not in note
    assert "every variant sent all routed rows" in rate_note(rows[:1], 6, 4)
