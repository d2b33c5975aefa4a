"""FSDP2 x expert parallelism on a device mesh (`dist.fsdp`; docs/design.md, "The parallel mesh").

    world W = efsdp x ep      ep: consecutive ranks that split the experts (lshmoe's `ep` group)
                              efsdp: ranks that hold the same experts, strided (lshmoe's `edp` group)

What is sharded where, by torch's `fully_shard` (the engine is torch's; ours is the dispatch):
- each MoE layer's local expert bank over `efsdp`, on dim 1 (`Shard(1)`): an expert's slice `p[g]`
  is then a view of the local shard, so the checkpoint schema's one key per global expert
  (`train/checkpoint.py`) saves and loads exactly, and reshards across W and EP;
- every transformer block's other parameters over the world (one unit per block), then the root
  (embeddings, final norm, head) over the world;
- left out (`ignored_params`), replicated and reduced by `GradSync` as without FSDP: the routers
  (so routing reads fp32 weights under mixed precision), LocMoE's per-node biases (reduced within
  the node) and the correction biases (no gradient; moved in place after the step).

Gradient scaling: every unit reduce-scatters a plain sum (`set_gradient_divide_factor(1.0)` and
`set_force_sum_reduction_for_comms(True)`), and `ShardedGradSync` divides the local shards by W.
A per-mesh divide factor would be wrong here: gloo has no PREMUL_SUM, and torch 2.13 divides twice on
a size-1 mesh (scale-feasibility.md, §2). With micro-batches FSDP reduce-scatters after each one
(its default): the gradients stay sharded between micro-batches, which is what FSDP is for; holding
them unsharded until the last would cost 4 bytes per local parameter.

The global norm for clipping: the local shards partition the sharded parameters exactly once over
the world, so one all-reduce of their squared norms gives it; the replicated ones are added once.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from lshmoe.config import ConfigError
from lshmoe.distributed.comm import Comm
from lshmoe.moe.param_kinds import kinds_kept
from lshmoe.moe.router import TopKRouter
from lshmoe.train.grad_sync import GradSync


@dataclass(frozen=True)
class Meshes:
    world: DeviceMesh  # 1-D, every rank
    efsdp: DeviceMesh  # 1-D, the ranks holding this rank's experts


def build_meshes(comm: Comm, ep: int) -> Meshes:
    """The world mesh and the (efsdp, ep) mesh, row-major, so `ep` rows are lshmoe's EP groups."""
    kind, W = comm.device.type, comm.world_size
    world = init_device_mesh(kind, (W,), mesh_dim_names=("world",))
    expert = init_device_mesh(kind, (W // ep, ep), mesh_dim_names=("efsdp", "ep"))
    assert tuple(expert["ep"].mesh.tolist()) == tuple(comm.group("ep").ranks), "mesh and EP groups disagree"
    return Meshes(world=world, efsdp=expert["efsdp"])


def replicated_params(model: nn.Module) -> list[nn.Parameter]:
    """What FSDP leaves alone: every router's parameters (weights, node and correction biases)."""
    return [p for m in model.modules() if isinstance(m, TopKRouter) for p in m.parameters()]


def _check_expert_shards(layers: list[nn.Module], efsdp: int) -> None:
    for layer in layers:
        for name, p in layer.experts.named_parameters():
            if p.dim() > 1 and p.shape[1] % efsdp:
                raise ConfigError(
                    f"dist.fsdp: expert tensor {name} {tuple(p.shape)} of MoE layer {layer.layer_id} cannot be split "
                    f"evenly over the {efsdp} ranks holding the same experts (dim 1 = {p.shape[1]}); use a model "
                    f"width and expert width divisible by world/EP = {efsdp}, or a larger moe.ep_size"
                )


def shard(
    model: nn.Module,
    layers: list[nn.Module],
    blocks: list[nn.Module],
    meshes: Meshes,
    compute_dtype: torch.dtype | None,
    reshard_experts: bool = True,
) -> None:
    """`fully_shard` the experts, the blocks and the root (the routers left replicated).
    `reshard_experts=False` keeps a bank unsharded from its forward to its backward (for dispatchers that
    call the experts several times a forward, e.g. Lina's micro-ops)."""
    # NOTE: a model's output carries its MoE layers' outputs (for the metrics), views among them; FSDP warns
    # that an in-place op on such a view would skip its hook. Nothing writes into them.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32 if compute_dtype else None)
    ignored = set(replicated_params(model))
    efsdp = meshes.efsdp.size()
    _check_expert_shards(layers, efsdp)
    with kinds_kept(model):  # FSDP's parameters are new objects
        _shard(model, layers, blocks, meshes, mp, ignored, reshard_experts)


def _shard(model, layers, blocks, meshes, mp, ignored, reshard_experts) -> None:
    for layer in layers:
        if any(True for _ in layer.experts.parameters()):
            fully_shard(
                layer.experts,
                mesh=meshes.efsdp,
                shard_placement_fn=lambda p: Shard(1),
                mp_policy=mp,
                reshard_after_forward=reshard_experts,
            )
    for block in blocks:
        fully_shard(block, mesh=meshes.world, mp_policy=mp, ignored_params=ignored)
    fully_shard(model, mesh=meshes.world, mp_policy=mp, ignored_params=ignored)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


class ShardedGradSync:
    """`GradSync`'s interface under FSDP: the sharded gradients are already summed by FSDP's
    reduce-scatter and only need the 1/W; the replicated ones go through a `GradSync`."""

    def __init__(self, model: nn.Module, comm: Comm, replicated: list[nn.Parameter]):
        self.comm = comm
        self.sharded = [p for p in model.parameters() if p.requires_grad and isinstance(p, DTensor)]
        self.replicated = GradSync(model, comm, params=replicated)
        self.dense, self.expert, self.node = [], [], []  # nothing of the unsharded kinds (Lina is refused)

    def sync(self, dense: bool = True) -> None:
        for p in self.sharded:
            if p.grad is not None:
                p.grad.mul_(1.0 / self.comm.world_size)
        self.replicated.sync()

    def global_norm(self) -> torch.Tensor:
        acc = torch.zeros((), dtype=torch.float64, device=self.comm.device)
        for p in self.sharded:
            if p.grad is not None:
                g = local(p.grad)
                acc += (
                    torch.linalg.vector_norm(g, dtype=torch.float64 if g.dtype == torch.float64 else None).double() ** 2
                )
        self.comm.all_reduce(acc, self.comm.group("world"), "grad.norm.sharded")
        return (acc + self.replicated.global_norm().square()).sqrt()

    def clip(self, max_norm: float) -> float:
        total = float(self.global_norm())
        if max_norm > 0 and torch.isfinite(torch.tensor(total)) and total > max_norm:
            scale = max_norm / (total + 1e-6)
            for p in self.sharded + self.replicated.dense + self.replicated.expert + self.replicated.node:
                if p.grad is not None:
                    p.grad.mul_(scale)
        return total


__all__ = ["Meshes", "ShardedGradSync", "build_meshes", "local", "replicated_params", "shard"]
