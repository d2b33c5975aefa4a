"""Memory per rank of a training setting, from the model's config alone, and `lshmoe plan`.

    shape = count_hf(raw)                  config.json (a dict) -> ModelShape: P_d, P_e per layer, widths
    shape = count_gpt(cfg, vocab_size)     lshmoe's GPT-MoE Config -> ModelShape
    s = Setting(world=8, ep=8, fsdp=True, dtype="bf16-mp", ac="experts", micro_batches=2)
    w = Workload(seq_len=1024, batch_size=4)
    b = memory_per_rank(shape, s, w)       b.params, b.grads, b.optim, b.activation_bytes, b.total (bytes)
    model_state_bytes(shape, s)            parameters, gradients and AdamW state alone, with their terms
    activation_bytes(shape, s, w)          saved-for-backward bytes by term, the largest transient

shape.py holds what is counted, hf_count.py / gpt_count.py count it, memory.py has the formulas (and
docs/memory.md derives them), search.py enumerates settings and picks one, command.py is the verb.
"""

from lshmoe.plan.gpt_count import count_gpt
from lshmoe.plan.hf_count import count_hf, read_config_json
from lshmoe.plan.memory import (
    AC_MODES,
    DTYPES,
    Activations,
    Breakdown,
    ModelState,
    Setting,
    Workload,
    activation_bytes,
    memory_per_rank,
    model_state_bytes,
)
from lshmoe.plan.shape import AttnShape, LayerShape, ModelShape

__all__ = [
    "AC_MODES",
    "DTYPES",
    "Activations",
    "AttnShape",
    "Breakdown",
    "LayerShape",
    "ModelShape",
    "ModelState",
    "Setting",
    "Workload",
    "activation_bytes",
    "count_gpt",
    "count_hf",
    "memory_per_rank",
    "model_state_bytes",
    "read_config_json",
]
