"""lshmoe: communication-efficient distributed Mixture-of-Experts on torch.distributed.

The public API, imported on first use (so `import lshmoe` stays cheap and the CLI starts fast):

    from lshmoe import Comm, Config, LSHConfig, MoEConfig, MoELayer, init_comm, train

- `MoELayer(cfg, d_model, comm, layer_id, settings=...)`: the expert-parallel MoE layer (router,
  capacity, compressor, dispatcher, grouped experts); `MoEConfig`, `LSHConfig` and the rest of the
  config tree (`Config`) configure it.
- `init_comm(dist_cfg, ep_size)` / `Comm`: process groups and the ledger every collective goes
  through; `shutdown()` tears them down. `GradSync(model, comm)` averages dense gradients over the
  world and keeps expert gradients on their expert-parallel ranks.
- `Compressor`, `Dispatcher`: the two seams' protocols; `COMPRESSORS` lists the registered names.
- `train(cfg)`: run a whole training job in this process (one rank under torchrun).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "MoELayer": "lshmoe.moe.layer",
    "MoEOutput": "lshmoe.moe.layer",
    "Config": "lshmoe.config",
    "ModelConfig": "lshmoe.config",
    "MoEConfig": "lshmoe.config",
    "LSHConfig": "lshmoe.config",
    "QuantConfig": "lshmoe.config",
    "ScMoEConfig": "lshmoe.config",
    "LocMoEConfig": "lshmoe.config",
    "LinaConfig": "lshmoe.config",
    "InferConfig": "lshmoe.config",
    "FaultConfig": "lshmoe.config",
    "DistConfig": "lshmoe.config",
    "TrainConfig": "lshmoe.config",
    "DataConfig": "lshmoe.config",
    "ConfigError": "lshmoe.config",
    "Comm": "lshmoe.distributed.comm",
    "init_comm": "lshmoe.distributed.setup",
    "shutdown": "lshmoe.distributed.setup",
    "Compressor": "lshmoe.compress.protocol",
    "build_compressor": "lshmoe.compress.registry",
    "COMPRESSORS": "lshmoe.compress.registry",
    "Dispatcher": "lshmoe.moe.dispatch.protocol",
    "TokenRows": "lshmoe.moe.dispatch.protocol",
    "Wires": "lshmoe.distributed.wire",
    "GPTMoE": "lshmoe.models.gpt",
    "GradSync": "lshmoe.train.grad_sync",
    "train": "lshmoe.train.gpt_task",
}
_RENAMED = {"COMPRESSORS": "NAMES"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lshmoe' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
