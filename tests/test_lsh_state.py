"""The LSH compressor's running state resumes exactly (float64): a compressor rebuilt mid-run from
`state_dict()` continues as the uninterrupted one, bit for bit, with the calibrated compensation's
fitted scale and the rate target's averages both in play."""

from __future__ import annotations

import torch

from lshmoe.compress.lsh import LSHCompressor
from lshmoe.config import LSHConfig

E, D = 3, 12
CFG = LSHConfig(
    num_hashes=3, buckets_per_hash=2, compensation="calibrated", probe_every=2, target="rate", target_value=0.5
)


def _expert(rows_PD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """A nonlinear stand-in for the experts, evaluated exactly (what the probe's `evaluate` does)."""
    w = torch.linspace(-1, 1, D * D, dtype=torch.float64).view(D, D)
    return torch.tanh(rows_PD @ w) + 0.5 * rows_PD


def _step_rows(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    base = torch.randn(4, D, generator=g, dtype=torch.float64)
    rows = base[torch.randint(0, 4, (40,), generator=g)] + 0.2 * torch.randn(40, D, generator=g, dtype=torch.float64)
    return rows, torch.tensor([15, 0, 25])


def _run(comp: LSHCompressor, steps: range) -> list[torch.Tensor]:
    """Each step: compress, the experts on the payload, restore, and the probe where due."""
    outs = []
    for step in steps:
        comp.set_step(step)
        rows, counts = _step_rows(step)
        payload, sent, meta = comp.compress(rows, counts)
        outs.append(comp.restore(_expert(payload, sent), meta))
        if comp.probe_due(True):
            comp.probe(meta, _expert, lambda t: t)
    return outs


def test_a_resumed_compressor_continues_exactly():
    whole = LSHCompressor(CFG, E, D, layer_id=1, seed=4)
    expected = _run(whole, range(8))
    first = LSHCompressor(CFG, E, D, layer_id=1, seed=4)
    got = _run(first, range(5))
    state = first.state_dict()
    assert set(state) == {"controller", "alpha"} and all(t.dtype == torch.float64 for t in state.values())
    assert first.alpha > 0, "the probe fitted a scale before the interruption"
    resumed = LSHCompressor(CFG, E, D, layer_id=1, seed=4)
    resumed.load_state_dict({k: v.clone() for k, v in state.items()})
    got += _run(resumed, range(5, 8))
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    # the test can fail: without the fitted scale the resumed run restores with alpha = 0 at step 5
    fresh = LSHCompressor(CFG, E, D, layer_id=1, seed=4)
    fresh.load_state_dict({"controller": state["controller"]})
    assert not torch.equal(_run(fresh, range(5, 6))[0], expected[5])
