"""The seams as protocols: compressor registry, dispatcher protocol, tags, parameter kinds, state.

These are the contracts the layer relies on instead of knowing concrete implementations.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from lshmoe.compress.identity import IDENTITY
from lshmoe.compress.protocol import Compressor, Reduce
from lshmoe.compress.registry import NAMES, REGISTRY, CompressorContext, build_compressor
from lshmoe.config import Config, ConfigError, LinaConfig, LSHConfig, MoEConfig
from lshmoe.distributed.comm import Comm
from lshmoe.distributed.tags import MoEOp, Tag
from lshmoe.moe.dispatch.protocol import Dispatcher
from lshmoe.moe.layer import MoELayer, MoEState
from lshmoe.moe.param_kinds import ParamKind, is_expert_param, is_node_param, kind_of

SRC = Path(__file__).resolve().parents[1] / "src" / "lshmoe"


def _imports(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module)
        elif isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
    return mods


@pytest.mark.parametrize("package", ["moe", "train", "bench", "models", "infer", "sched"])
def test_no_module_outside_compress_imports_a_concrete_compressor(package):
    concrete = {f"lshmoe.compress.{m.split(':')[0].rsplit('.', 1)[-1]}" for m in REGISTRY.values()}
    concrete |= {"lshmoe.compress.hashing", "lshmoe.compress.ops", "lshmoe.compress.target"}
    offenders = [
        f"{p.relative_to(SRC)} imports {sorted(_imports(p) & concrete)}"
        for p in sorted((SRC / package).rglob("*.py"))
        if _imports(p) & concrete
    ]
    assert not offenders, offenders


def test_registry_builds_every_name_and_rejects_unknown_ones():
    ctx = CompressorContext(num_experts=4, d_model=8, layer_id=1, seed=0, settings=Config())
    for name in NAMES:
        comp = build_compressor(name, ctx)
        assert isinstance(comp, Compressor), name
        assert comp.name == name
    with pytest.raises(ConfigError, match="moe.compress='nope' is not a registered compressor; choose one of"):
        build_compressor("nope", ctx)


def test_a_builder_may_decline_a_layer():
    ctx = CompressorContext(num_experts=4, d_model=8, layer_id=1, seed=0, settings=Config(lsh=LSHConfig(layers="3")))
    assert build_compressor("lsh", ctx) is IDENTITY
    ctx3 = dataclasses.replace(ctx, layer_id=3)
    assert build_compressor("lsh", ctx3).name == "lsh"


def test_lsh_state_round_trips_through_state_dict():
    settings = Config(lsh=LSHConfig(target="rate", target_value=0.3))
    a = build_compressor("lsh", CompressorContext(4, 8, 0, 0, settings))
    rows = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    a.compress(rows, torch.tensor([10, 10, 10, 10]))
    state = a.state_dict()
    assert set(state) == {"controller"} and state["controller"].dtype == torch.float64
    b = build_compressor("lsh", CompressorContext(4, 8, 0, 0, settings))
    assert not torch.equal(b.state_dict()["controller"].nan_to_num(-1), state["controller"].nan_to_num(-1))
    b.load_state_dict(state)
    assert torch.equal(b.state_dict()["controller"].nan_to_num(-1), state["controller"].nan_to_num(-1))
    assert IDENTITY.state_dict() == {}
    with pytest.raises(KeyError, match="holds no state"):
        IDENTITY.load_state_dict({"x": torch.zeros(1)})


def test_lsh_stats_declare_how_they_reduce():
    comp = build_compressor("lsh", CompressorContext(4, 8, 0, 0, Config()))
    comp.compress(torch.randn(12, 8), torch.tensor([3, 3, 3, 3]))
    stats = comp.stats
    assert stats["lsh_hash_s"].reduce is Reduce.MEAN
    assert stats["lsh_restore_err"].reduce is Reduce.PER_PROBE
    assert stats["lsh_probe_n"].reduce is Reduce.PROBES


@pytest.mark.parametrize("chunks", [1, 3])
def test_every_dispatcher_implements_the_protocol(chunks):
    from lshmoe.infer.dispatch import ReplicaDispatcher
    from lshmoe.infer.placement import uniform_placement
    from lshmoe.moe.dispatch.flat import AllToAllDispatcher
    from lshmoe.moe.dispatch.hierarchical import HierarchicalDispatcher
    from lshmoe.moe.dispatch.local import LocalDispatcher
    from lshmoe.moe.dispatch.pipelined import PipelinedDispatcher

    for cls in (LocalDispatcher, AllToAllDispatcher, HierarchicalDispatcher, PipelinedDispatcher, ReplicaDispatcher):
        missing = [
            m
            for m in (
                "plan",
                "dispatch",
                "run_experts",
                "combine",
                "dispatch_start",
                "dispatch_wait",
                "combine_start",
                "combine_wait",
            )
            if not callable(getattr(cls, m, None))
        ]
        assert not missing, (cls.__name__, missing)
    comm = Comm.local()
    layer = MoELayer(MoEConfig(num_experts=4), 8, comm, 0, settings=Config(lina=LinaConfig(a2a_chunks=chunks)))
    assert isinstance(layer.dispatcher, Dispatcher)
    assert isinstance(ReplicaDispatcher(comm, comm.group("world"), 4, 0, uniform_placement(4, 1)), Dispatcher)


def test_a_call_leaves_no_state_on_its_dispatcher():
    """The protocol's rule, Lina's replica dispatcher included: a call's numbers travel in its meta;
    nothing about it is set on the dispatcher."""
    from lshmoe.infer.dispatch import ReplicaDispatcher
    from lshmoe.infer.placement import uniform_placement

    comm = Comm.local()
    replicas = ReplicaDispatcher(comm, comm.group("world"), 4, 0, uniform_placement(4, 1), source_major=True)
    for dispatcher in (None, replicas):
        layer = MoELayer(MoEConfig(num_experts=4, d_expert=8), 8, comm, 0, dispatcher=dispatcher).double()
        layer.reset_parameters(0)
        before = {k: id(v) for k, v in vars(layer.dispatcher).items()}
        layer(torch.randn(5, 8, dtype=torch.float64)).y_TD.sum().backward()
        assert {k: id(v) for k, v in vars(layer.dispatcher).items()} == before, type(layer.dispatcher).__name__


def test_layer_state_is_frozen_and_stage_specific():
    comm = Comm.local()
    layer = MoELayer(MoEConfig(num_experts=4, top_k=2, d_expert=8), 8, comm, 0).double()
    layer.reset_parameters(0)
    x = torch.randn(5, 8, dtype=torch.float64)
    st = layer.begin(x)
    assert st.received is not None and st.combined is None and st.inflight is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.received = None  # type: ignore[misc]
    st2 = layer.compute(st)
    assert st2.received is None and st2.combined is not None
    assert torch.equal(layer.finish(st2).y_TD, layer(x).y_TD)
    assert isinstance(st, MoEState)


def test_tags_build_and_parse():
    t = Tag.moe(3, MoEOp.DISPATCH, "lane")
    assert t == "moe3.dispatch.lane" and isinstance(t, str)
    assert (t.layer, t.op, t.part, t.scope) == (3, "dispatch", "lane", "moe3")
    assert Tag("moe12.counts").is_moe(MoEOp.COUNTS) and not Tag("moe12.counts").is_moe(MoEOp.DISPATCH)
    g = Tag.of("grad", "chunk", 7)
    assert g == "grad.chunk.7" and g.layer is None and g.op == "chunk"
    assert Tag("metrics").op is None and Tag("metrics").layer is None
    assert Tag("moex.dispatch").layer is None  # not an MoE tag: never misparsed


def test_parameter_kinds_are_marked_at_creation_and_survive_dtype_moves():
    from lshmoe.config import LocMoEConfig

    comm = Comm.local()
    layer = MoELayer(MoEConfig(num_experts=4), 8, comm, 0, settings=Config(locmoe=LocMoEConfig(node_bias=True)))
    layer = layer.double()
    kinds = {n: kind_of(p) for n, p in layer.named_parameters()}
    assert kinds["router.node_bias"] is ParamKind.NODE and is_node_param(layer.router.node_bias)
    assert kinds["router.weight"] is ParamKind.DENSE
    assert all(k is ParamKind.EXPERT for n, k in kinds.items() if n.startswith("experts."))
    assert is_expert_param(layer.experts.w1_GDF) and layer.experts.w1_GDF.dtype == torch.float64


def test_reset_parameters_does_not_depend_on_the_layout():
    cfg = MoEConfig(num_experts=4, d_expert=6)
    a = MoELayer(cfg, 8, Comm.local(), 2)
    b = MoELayer(cfg, 8, Comm.local(), 2)
    a.reset_parameters(5)
    b.reset_parameters(5)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert a.router.weight.std().item() == pytest.approx(0.02, rel=0.3)


def test_moved_keys_keep_their_old_names():
    from lshmoe.config import from_dict, set_value

    cfg = from_dict(
        {"model": {"shortcut": "pos3"}, "moe": {"node_bias": True, "a2a_chunks": 2}, "dist": {"fault": "nan:0:1"}}
    )
    assert (cfg.scmoe.shortcut, cfg.locmoe.node_bias, cfg.lina.a2a_chunks, cfg.fault.inject) == (
        "pos3",
        True,
        2,
        "nan:0:1",
    )
    set_value(cfg, "train.grad_sync", "priority")
    assert cfg.lina.grad_sync == "priority"
    with pytest.raises(ConfigError, match=r"moe\.shortcut; valid keys"):
        from_dict({"moe": {"shortcut": "pos1"}})


def test_cross_field_rules_live_in_validate():
    from lshmoe.config import LocMoEConfig, validate

    hier = Config(moe=MoEConfig(a2a="hierarchical"), lina=LinaConfig(a2a_chunks=2))
    with pytest.raises(ConfigError, match="lina.a2a_chunks=2 needs moe.a2a=flat"):
        validate(hier, world_size=2)
    limited = Config(moe=MoEConfig(num_experts=8, top_k=4), locmoe=LocMoEConfig(node_limit=1))
    validate(limited, world_size=4)  # the node count is unknown: the rule waits for it
    with pytest.raises(ConfigError, match="locmoe.node_limit=1 nodes hold 2 experts, fewer than moe.top_k=4"):
        validate(limited, world_size=4, nodes=4)
