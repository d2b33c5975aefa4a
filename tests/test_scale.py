"""Models that do not fit one rank: FSDP2 x EP, bf16 mixed precision, activation checkpointing and
gradient accumulation, each against an exact reference in float64 across real gloo ranks.

- FSDP2 at W = 4 (EP 2: experts sharded over 2 ranks each; EP 4) equals one process training on the
  union of the ranks' batches: the loss, every gradient after reduction, the parameters after 3
  AdamW steps (identity compressor); with the lossy compressors (fp8, lsh) it equals the unsharded
  run of the same world and EP;
- recomputing the experts or the blocks issues the same collectives with the same bytes and gives
  the same gradients;
- N micro-batches give the gradient of the whole batch (dropless, no router losses: those are
  per-batch statistics), with and without FSDP;
- bf16 mixed precision keeps fp32 master weights and AdamW state, halves the all-to-all bytes, routes
  in fp32, and stays near the fp32 loss.
"""

from __future__ import annotations

import pytest
import torch
from cli_util import corpus
from conftest import EXACT

from lshmoe.config import Config, DataConfig, ModelConfig, MoEConfig, TrainConfig, from_dict
from lshmoe.data import load_data
from lshmoe.distributed.comm import Comm
from lshmoe.models.gpt import GPTMoE
from lshmoe.testing import run_ranks
from lshmoe.train.gpt_task import GPTTask
from lshmoe.train.grad_sync import GradSync
from lshmoe.train.loop import Trainer
from lshmoe.train.optim import build_optimizer, lr_at, set_lr

STEPS, B, S = 3, 2, 16


def _cfg(tmp, **over) -> dict:
    cfg = Config(
        model=ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=S, moe_every=1),
        moe=MoEConfig(num_experts=8, top_k=2, d_expert=16),
        data=DataConfig(path=str(corpus(tmp)), vocab_size=300, cache_dir=str(tmp / "cache")),
        train=TrainConfig(batch_size=B, out_dir=str(tmp / "run"), progress=False, resume="none", dtype="float64"),
    )
    for dotted, v in over.items():
        section, key = dotted.split(".")
        setattr(getattr(cfg, section), key, v)
    return cfg.to_dict()


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _train(comm, cfg_dict: dict, steps: int = STEPS) -> dict:
    """`steps` steps of the loop; the reduced gradients before each optimizer step, the losses, the
    parameters after, and the step's collectives as the ledger saw them (op, tag, phase, bytes)."""
    cfg = from_dict(cfg_dict)
    tr = Trainer(cfg, comm, GPTTask())
    grads: list[dict[str, torch.Tensor]] = []
    names = {id(p): n for n, p in tr.model.named_parameters()}
    tr.opt.register_step_pre_hook(
        lambda opt, *_: grads.append(
            {names[id(p)]: _full(p.grad) for g in opt.param_groups for p in g["params"] if p.grad is not None}
        )
    )
    comm.ledger.enable_timeline(100_000)
    comm.ledger.timeline.clear()
    losses = [tr.train_step(s)["loss"] for s in range(steps)]
    calls = [(r.op, r.tag, r.phase, r.send_bytes) for r in comm.ledger.timeline if r.phase != "metrics"]
    params = {n: _full(p) for n, p in tr.model.named_parameters()}
    firsts = {n: m.first_expert for n, m in tr.model.named_modules() if hasattr(m, "first_expert")}
    opt_dtypes = {v.dtype for st in tr.opt.state.values() for k, v in st.items() if k != "step"}
    return {"losses": losses, "grads": grads, "params": params, "calls": calls, "firsts": firsts, "opt": opt_dtypes}


def _worker(comm, runs: dict[str, dict]) -> dict[str, dict]:
    return {name: _train(comm, cfg) for name, cfg in runs.items()}


def _reference(cfg_dict: dict, world: int) -> dict:
    """One process, float64, each step on the union of the `world` ranks' batches (mean of their losses)."""
    cfg = from_dict(cfg_dict)
    data = load_data(cfg.data)
    model = GPTMoE(cfg.model, cfg.moe, data.vocab_size, Comm.local(), settings=cfg).double()
    model.reset_parameters(cfg.train.seed)
    opt, sync = build_optimizer(model, cfg.train), GradSync(model, Comm.local())
    grads, losses = [], []
    for step in range(STEPS):
        set_lr(opt, lr_at(step, cfg.train))
        per_rank = [
            model(*data.train_batch(step, r, B, S, cfg.train.seed, torch.device("cpu"))).loss for r in range(world)
        ]
        losses.append([float(v) for v in per_rank])
        (sum(per_rank) / world).backward()
        sync.sync()
        sync.clip(cfg.train.grad_clip)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"losses": losses, "grads": grads, "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def _mine(ref: torch.Tensor, got: torch.Tensor, name: str, firsts: dict[str, int]) -> torch.Tensor:
    """The reference tensor's part held by a rank (its experts' rows of an expert bank)."""
    if got.shape == ref.shape:
        return ref
    first = firsts[name.rsplit(".", 1)[0]]
    return ref[first : first + got.shape[0]]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], firsts, what: str) -> None:
    assert a.keys() == b.keys(), what
    for n in a:
        err = (a[n] - _mine(b[n], a[n], n, firsts)).abs().max().item()
        assert err <= EXACT, (what, n, err)


@pytest.mark.slow
@pytest.mark.parametrize("ep", [2, 4])
def test_fsdp_at_world_4_equals_one_process_and_the_unsharded_run(tmp_path, ep):
    ident = _cfg(tmp_path, **{"dist.fsdp": True})
    runs = {"fsdp": ident}
    if ep == 2:  # the lossy compressors: sharded == unsharded at the same world and EP
        for comp in ("fp8", "lsh"):
            runs[f"{comp}-fsdp"] = _cfg(tmp_path, **{"dist.fsdp": True, "moe.compress": comp})
            runs[comp] = _cfg(tmp_path, **{"moe.compress": comp})
    load_data(from_dict(ident).data)  # build the token cache once, before the ranks start
    results = run_ranks(_worker, 4, runs, ep_size=ep, timeout_s=120)
    ref = _reference(ident, 4)
    for rank, res in enumerate(results):
        got = res["fsdp"]
        assert [abs(a - b[rank]) <= EXACT for a, b in zip(got["losses"], ref["losses"], strict=True)] == [True] * STEPS
        for step in range(STEPS):
            _assert_same(got["grads"][step], ref["grads"][step], got["firsts"], f"grads step {step}")
        _assert_same(got["params"], ref["params"], got["firsts"], "params after 3 steps")
        for comp in ("fp8", "lsh") if ep == 2 else ():
            sharded, plain = res[f"{comp}-fsdp"], res[comp]
            assert sharded["losses"] == pytest.approx(plain["losses"], abs=EXACT)
            _assert_same(sharded["params"], plain["params"], got["firsts"], comp)
            assert sharded["calls"][0][0] == "all_to_all"  # the compressed dispatch ran


@pytest.mark.slow
def test_recompute_and_micro_batches_keep_collectives_and_gradients(tmp_path):
    exact = {"moe.aux_loss_weight": 0.0, "moe.z_loss_weight": 0.0, "train.batch_size": 4}
    runs = {
        "plain": _cfg(tmp_path, **exact),
        "ac-experts": _cfg(tmp_path, **exact, **{"train.ac": "experts"}),
        "ac-blocks": _cfg(tmp_path, **exact, **{"train.ac": "blocks"}),
        "accum-2": _cfg(tmp_path, **exact, **{"train.grad_accum": 2}),
        "accum-4": _cfg(tmp_path, **exact, **{"train.grad_accum": 4}),
        "fsdp": _cfg(tmp_path, **exact, **{"dist.fsdp": True}),
        "fsdp-ac-accum": _cfg(tmp_path, **exact, **{"dist.fsdp": True, "train.ac": "blocks", "train.grad_accum": 2}),
    }
    load_data(from_dict(runs["plain"]).data)
    for res in run_ranks(_worker, 2, runs, ep_size=2, timeout_s=120):
        plain = res["plain"]
        for name in runs:
            assert res[name]["losses"] == pytest.approx(plain["losses"], abs=EXACT), name
            for step in range(STEPS):
                _assert_same(res[name]["grads"][step], plain["grads"][step], plain["firsts"], f"{name} step {step}")
        # recomputation re-issues no collective: the same calls with the same bytes
        assert res["ac-experts"]["calls"] == res["ac-blocks"]["calls"] == plain["calls"]
        # micro-batches: one dispatch each (twice the exchanges), the same bytes in all
        a2a = [c for c in plain["calls"] if c[0] == "all_to_all"]
        a2a2 = [c for c in res["accum-2"]["calls"] if c[0] == "all_to_all"]
        assert len(a2a2) == 2 * len(a2a)
        assert res["fsdp-ac-accum"]["grads"][0].keys() == plain["grads"][0].keys()


@pytest.mark.slow
def test_bf16_mixed_precision_keeps_fp32_masters_and_sends_bf16(tmp_path):
    base = {"train.dtype": "float32"}
    runs = {
        "fp32": _cfg(tmp_path, **base),
        "bf16": _cfg(tmp_path, **base, **{"train.compute_dtype": "bfloat16"}),
        "bf16-fsdp": _cfg(tmp_path, **base, **{"train.compute_dtype": "bfloat16", "dist.fsdp": True}),
    }
    load_data(from_dict(runs["fp32"]).data)
    for res in run_ranks(_worker, 2, runs, ep_size=2, timeout_s=120):
        fp32 = res["fp32"]
        for name in ("bf16", "bf16-fsdp"):
            got = res[name]
            assert {p.dtype for p in got["params"].values()} == {torch.float32}, name  # master weights
            assert got["opt"] == {torch.float32}, name  # AdamW state
            assert {g.dtype for g in got["grads"][0].values()} == {torch.float32}, name  # reduced in fp32
            rows = [c for c in got["calls"] if c[0] == "all_to_all" and "dispatch" in c[1]]
            rows32 = [c for c in fp32["calls"] if c[0] == "all_to_all" and "dispatch" in c[1]]
            # half the bytes of fp32 (the routing of a few tokens may differ, so the rows nearly match)
            ratio = sum(map(sum, (c[3] for c in rows32))) / sum(map(sum, (c[3] for c in rows)))
            assert 1.9 < ratio < 2.1, (name, ratio)
            assert got["losses"] == pytest.approx(fp32["losses"], rel=0.02), name


def test_routing_stays_fp32_under_autocast():
    from lshmoe.moe.router import TopKRouter

    router = TopKRouter(16, 8, 2)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(64, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = router(x.bfloat16())
    assert out.probs_TE.dtype == torch.float32
    ref = router(x.bfloat16().float())
    assert torch.equal(out.topk_ids_TK, ref.topk_ids_TK)


def test_lina_with_fsdp_and_uneven_micro_batches_are_refused_in_one_line():
    from lshmoe.config import ConfigError, validate

    cfg = Config()
    cfg.dist.fsdp, cfg.lina.grad_sync = True, "priority"
    with pytest.raises(ConfigError, match="lina.grad_sync=priority with dist.fsdp"):
        validate(cfg)
    cfg.lina.grad_sync, cfg.train.grad_accum, cfg.train.batch_size = "sync", 3, 8
    with pytest.raises(ConfigError, match="train.grad_accum=3 must divide train.batch_size=8"):
        validate(cfg)


@pytest.mark.slow
def test_fsdp_composes_with_the_dispatchers_systems_and_auto(tmp_path):
    """FSDP equals the unsharded run (world 4 = 2 nodes x 2, EP 4) with the dedup and hierarchical
    dispatchers, ScMoE's overlapped shortcut, LocMoE's per-node router bias with the correction-bias
    update, and `--compress auto` (which leaves identity at step 1 on a link it is told is slow)."""
    auto = {"moe.compress": "auto", "auto.start": 1, "auto.every": 0, "auto.link_gbit": 1e-4, "auto.verify": False}
    variants = {
        "dedup": {"moe.a2a": "dedup"},
        "hier": {"moe.a2a": "hierarchical"},
        "scmoe": {"model.arch": "scmoe", "moe.top_k": 1, "model.moe_every": 2, "scmoe.slot_warmup": 1},
        "locmoe": {"locmoe.node_bias": True, "moe.correction_bias": True, "moe.bias_update_rate": 0.01},
        "auto": {**auto, "auto.margin": 0.0},
    }
    runs = {}
    for name, over in variants.items():
        runs[name] = _cfg(tmp_path, **over)
        runs[f"{name}-fsdp"] = _cfg(tmp_path, **over, **{"dist.fsdp": True})
    load_data(from_dict(runs["dedup"]).data)
    for res in run_ranks(_worker, 4, runs, ep_size=4, ranks_per_node=2, timeout_s=180):
        for name in variants:
            plain, sharded = res[name], res[f"{name}-fsdp"]
            assert sharded["losses"] == pytest.approx(plain["losses"], abs=EXACT), name
            _assert_same(sharded["params"], plain["params"], plain["firsts"], name)
            assert sharded["calls"] != [] and any(c[0] == "all_to_all" for c in sharded["calls"]), name


def _tracked_step(comm, cfg_dict: dict) -> dict:
    """One step under torch's memory tracker (FSDPMemTracker with FSDP): the bytes by category after
    the forward (the saved activations) and after the gradient sync; and what `lshmoe plan`'s formula
    says for this model and setting."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    from lshmoe.plan import Setting, Workload, count_gpt, memory_per_rank

    cfg = from_dict(cfg_dict)
    tr = Trainer(cfg, comm, GPTTask())
    tr.train_step(0)  # AdamW's state exists from here
    if cfg.dist.fsdp:
        tracker = FSDPMemTracker(tr.model, tr.opt)
    else:
        tracker = MemTracker()
        tracker.track_external(tr.model, tr.opt)
    x, y = tr.data.train_batch(1, comm.rank, cfg.train.batch_size, cfg.model.seq_len, 0, comm.device)
    with tracker:
        out = tr.task.forward(tr.model, x, y)
        after_forward = tracker.get_tracker_snapshot()
        out.loss.backward()
        tr.sync.sync()
        after_sync = tracker.get_tracker_snapshot()
    [dev] = list(after_forward)
    cat = lambda snap: {str(k).rsplit(".", 1)[-1]: v for k, v in snap[dev].items()}  # noqa: E731
    setting = Setting(world=comm.world_size, ep=comm.group("ep").size, fsdp=cfg.dist.fsdp, dtype="float32")
    plan = memory_per_rank(
        count_gpt(cfg, tr.data.vocab_size),
        setting,
        Workload(seq_len=cfg.model.seq_len, batch_size=cfg.train.batch_size),
    )
    steps = 4 * len(tr.opt.state)  # AdamW's step counters, which the plan leaves out
    return {"fwd": cat(after_forward), "sync": cat(after_sync), "plan": plan, "steps": steps}


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated-ep2", "fsdp-ep1"])
def test_memory_categories_match_the_plan(tmp_path, fsdp):
    """torch's MemTracker / FSDPMemTracker over one step against lshmoe plan's formula: parameters,
    gradients and AdamW state to the byte without FSDP (to FSDP's padding with it), the saved
    activations within 15% (the formula counts what autograd keeps on a GPU's kernels)."""
    over = {
        "dist.fsdp": fsdp,
        "train.dtype": "float32",
        "model.d_model": 64,
        "moe.d_expert": 128,
        "train.batch_size": 4,
    }
    cfg = _cfg(tmp_path, **over)
    load_data(from_dict(cfg).data)
    for res in run_ranks(_tracked_step, 2, cfg, ep_size=1 if fsdp else 2, timeout_s=120):
        terms, fwd, sync = res["plan"].state.terms, res["fwd"], res["sync"]
        params, grads = ("SHARDED_PARAM", "SHARDED_GRAD") if fsdp else ("PARAM", "GRAD")
        tol = 0.01 if fsdp else 0.0
        assert abs(sync[params] - terms["params.master"]) <= tol * terms["params.master"], (sync, terms)
        assert abs(sync[grads] - terms["grads.local"]) <= tol * terms["grads.local"], (sync, terms)
        assert abs(sync["OPT"] - res["steps"] - terms["optim.adamw"]) <= tol * terms["optim.adamw"], (sync, terms)
        saved = sum(res["plan"].activations.saved.values())
        assert 0.85 * saved <= fwd["ACT"] <= 1.15 * saved, (fwd, saved)
