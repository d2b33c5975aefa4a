"""Sparse upcycling: a dense BERT checkpoint made an expert-parallel Mixture-of-Experts masked LM.

    every n-th encoder layer (layers n-1, 2n-1, ...; upcycle.every = n):
        BertIntermediate (dense D -> F, gelu) + BertOutput.dense (F -> D)  ->  lshmoe MoELayer, E experts
        BertOutput's dropout and LayerNorm(h + residual) stay outside the MoE, run by transformers
    expert e = the FFN's tensors + noise * std(tensor) * N(0, 1), drawn per (seed, layer, e)
    router   = N(0, router_std^2) from one (seed, layer) generator: small, routing starts near uniform
    MLM head = transformers' BertForMaskedLM: the decoder is tied to the word embeddings; the head's
               transform (dense + LayerNorm) and output bias are read when the checkpoint has them
               (cls.predictions.*), else drawn fresh from (seed, name): an encoder-only checkpoint
               such as all-MiniLM-L6-v2 carries none

`upcycle.train=moe` trains only what upcycling made new or changed, the MoE layers and the MLM head's
transform and bias, and freezes the pretrained backbone and the tied word embeddings; on a slow
link the dense gradient all-reduce (about 90 MB per step for all-MiniLM-L6-v2, most of it the
embeddings) would otherwise outweigh the all-to-all (a few MB per step at small batches).

At noise 0 every expert is the FFN, and each token's gate weights sum to 1 (normalize_weights, and
transformers' top-1 rule), so the MoE layer computes the FFN exactly: the upcycled model is the dense
model until training moves the experts apart (Komatsuzaki et al., "Sparse Upcycling", 2023).

Expert-parallel as hf/model.py: each rank builds the MoE layer with its E / EP experts over the `ep`
group of `comm`; `settings` (a `Config`) gives the layers their compressor / dispatcher sections and
holds the upcycle section. The experts draw their noise from (seed, layer, global expert), so a model
built on W ranks equals the one built on one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lshmoe.config import Config, ConfigError, MoEConfig
from lshmoe.distributed.comm import Comm
from lshmoe.hf.family import HFError
from lshmoe.hf.model import HFMoEBlock, check_ep
from lshmoe.hf.packaged import checkpoint_dir
from lshmoe.hf.read import read_config
from lshmoe.moe.experts import GroupedExperts
from lshmoe.moe.layer import MoELayer
from lshmoe.seeding import generator

# MoEConfig fields the checkpoint's FFN sets (a run leaves them at their defaults)
FFN_FIELDS = ("d_expert", "activation", "expert_bias")


def require_bert(model_type: str | None) -> None:
    if model_type != "bert":
        raise HFError(f"model_type={model_type!r}: upcycling reads a dense BERT checkpoint (model_type 'bert')")


def read_bert_config(path: str | Path) -> Any:
    """A dense BERT checkpoint's BertConfig (a one-line error for any other model)."""
    return read_config(path, check=require_bert)


def upcycle_moe_config(config: Any, moe: MoEConfig) -> MoEConfig:
    """The run's MoE options with the FFN's shape: experts of width intermediate_size, exact gelu,
    biases; a top-1 token's weight is 1, so that identical experts compute the FFN."""
    if getattr(config, "hidden_act", None) != "gelu":
        raise HFError(f"hidden_act={config.hidden_act!r}: upcycling copies exact-gelu FFNs (hidden_act 'gelu')")
    default = MoEConfig()
    for name in FFN_FIELDS:
        if getattr(moe, name) != getattr(default, name):
            raise ConfigError(
                f"moe.{name}={getattr(moe, name)}: upcycling takes it from the checkpoint; leave it unset"
            )
    return dataclasses.replace(
        moe, d_expert=int(config.intermediate_size), activation="gelu", expert_bias=True, normalize_top1=True
    )


def upcycled_layers(num_layers: int, every: int) -> list[int]:
    """The encoder layers whose FFN becomes an MoE: every `every`-th, counting from 1."""
    if not 1 <= every <= num_layers:
        raise ConfigError(
            f"upcycle.every={every} is out of range; the checkpoint has {num_layers} encoder layers: "
            f"1 <= upcycle.every <= {num_layers}"
        )
    return [i for i in range(num_layers) if (i + 1) % every == 0]


@torch.no_grad()
def copy_ffn(
    experts: GroupedExperts, ffn_in: nn.Linear, ffn_out: nn.Linear, noise: float, seed: int, layer_id: int
) -> None:
    """Every local expert := the FFN (nn.Linear is [out, in]; experts are [in, out]) plus Gaussian
    noise of `noise` times each tensor's std, from the (seed, layer, global expert) generator."""
    pairs = (
        (experts.w1_GDF, ffn_in.weight.t()),
        (experts.b1_GF, ffn_in.bias),
        (experts.w2_GFD, ffn_out.weight.t()),
        (experts.b2_GD, ffn_out.bias),
    )
    for g in range(experts.num_local):
        gen = generator(seed, "upcycle", layer_id, experts.first_expert + g)
        for dst_GX, src_X in pairs:
            draw = torch.randn(src_X.shape, generator=gen, dtype=torch.float64)
            scale = noise * float(src_X.double().std()) if src_X.numel() > 1 else 0.0
            dst_GX[g].copy_(src_X.double() + scale * draw)


def _load_dense(path: Path, config: Any) -> tuple[nn.Module, list[str]]:
    """transformers' BertForMaskedLM with the checkpoint's weights; (names of the tensors it lacked)."""
    from transformers import BertForMaskedLM
    from transformers.utils import logging

    # NOTE: the head an encoder-only checkpoint lacks is expected, not news: no load report, no bar
    verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        model, info = BertForMaskedLM.from_pretrained(
            str(path), config=config, local_files_only=True, output_loading_info=True, dtype=torch.float32
        )
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()
    missing = sorted(info["missing_keys"])
    bad = [k for k in missing if not k.startswith("cls.predictions.")]
    if bad:
        raise HFError(f"{path}: tensor {bad[0]} is missing from the checkpoint")
    return model, missing


@torch.no_grad()
def _fresh_head(model: nn.Module, missing: list[str], seed: int, std: float) -> None:
    """The MLM head tensors the checkpoint lacked, drawn the same on every rank: LayerNorm weights 1,
    biases 0, matrices N(0, std^2) from a (seed, name) generator."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in missing:
        p = params.get(name)
        if p is None or p is model.bert.embeddings.word_embeddings.weight:  # tied to the embeddings
            continue
        if name.endswith("LayerNorm.weight"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=generator(seed, "mlm-head", name), dtype=torch.float64) * std)


def freeze_backbone(model: nn.Module) -> None:
    """Leave trainable only the MoE layers and the MLM head's own transform and bias (`upcycle.train=moe`)."""
    tied = model.bert.embeddings.word_embeddings.weight
    keep = {id(p) for m in model.modules() if isinstance(m, HFMoEBlock) for p in m.parameters()}
    keep |= {id(p) for p in model.cls.parameters() if p is not tied}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def upcycle_bert(
    path: str | Path,
    comm: Comm | None = None,
    settings: Config | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, MoEConfig]:
    """A BERT checkpoint directory (or packaged name) as an upcycled masked LM on `comm.device`, with
    this rank's experts: (transformers' BertForMaskedLM with MoE layers, the layers' MoEConfig).
    `settings.moe` gives E, K and the routing / compressor / dispatcher options, `settings.upcycle`
    which layers and the noise, `settings.train.seed` the seed."""
    comm = comm or Comm.local()
    settings = settings or Config()
    path = checkpoint_dir(path)
    config = read_bert_config(path)
    uc, seed = settings.upcycle, settings.train.seed
    mcfg = upcycle_moe_config(config, settings.moe)
    layers = upcycled_layers(config.num_hidden_layers, uc.every)
    check_ep(mcfg, comm.group("ep").size, comm.world_size)
    model, missing = _load_dense(path, config)
    _fresh_head(model, missing, seed, config.initializer_range)
    model.to(device=comm.device, dtype=dtype)
    for i in layers:
        layer = model.bert.encoder.layer[i]
        moe = MoELayer(mcfg, config.hidden_size, comm, layer_id=i, settings=settings, seed=seed, causal=False)
        moe.reset_parameters(seed, std=uc.router_std)
        moe.to(device=comm.device, dtype=dtype)
        copy_ffn(moe.experts, layer.intermediate.dense, layer.output.dense, uc.noise, seed, i)
        layer.intermediate = HFMoEBlock(moe)  # D -> D: the experts end with the FFN's output projection
        layer.output.dense = nn.Identity()  # BertOutput keeps dropout + LayerNorm(h + residual)
    model.moe_cfg = mcfg
    if uc.train == "moe":
        freeze_backbone(model)
    return model.train(), mcfg  # NOTE: from_pretrained hands back eval mode; a built model trains


__all__ = ["copy_ffn", "freeze_backbone", "read_bert_config", "upcycle_bert", "upcycle_moe_config", "upcycled_layers"]
