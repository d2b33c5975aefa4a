"""lshmoe.hf: transformers MoE families made expert-parallel, against transformers' own model.

For every family (Qwen3-MoE, Mixtral top-1, OLMoE, Qwen2-MoE, DeepSeek-V3) a tiny random checkpoint is
saved with save_pretrained; the converted model at EP 1, 2 and 4 (real gloo ranks, each with its own
batch) must give transformers' logits and training loss (cross-entropy + router_aux_loss_coef * aux)
on each rank's batch, and the same gradient for every parameter (summed over the ranks' batches).

Precision: both models run in float64, but transformers' routers compute their softmax (Mixtral,
Qwen, OLMoE) or sigmoid (DeepSeek-V3) in float32 and its aux loss in float32; lshmoe routes in
float64. So values are compared at float32 precision (relative 2e-5), and the expert choices must
agree exactly (a different choice moves the logits by orders of magnitude more).
"""

from __future__ import annotations

import pytest
import torch
from hf_cases import FAMILIES, V, save_checkpoint

from lshmoe.hf import export, lm_loss, read_config
from lshmoe.hf.load import load_weights
from lshmoe.hf.model import build_model
from lshmoe.seeding import generator
from lshmoe.testing import run_ranks

TOL = 2e-5
B, S = 2, 6


def _batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, V, (B, S), generator=generator(11, "ids", rank))
    targets = torch.cat([ids[:, 1:], torch.full((B, 1), -100)], 1)
    return ids, targets


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {fam: str(save_checkpoint(root / fam, fam)) for fam in FAMILIES}


def _worker(comm, ckpts, export_root):
    out = {}
    for fam, path in ckpts.items():
        model, mcfg = build_model(read_config(path), comm, dtype=torch.float64)
        stats = load_weights(model, path)
        ids, targets = _batch(comm.rank)
        res = lm_loss(model, ids, targets)
        res["loss"].backward()
        G = mcfg.num_experts // comm.group("ep").size
        out[fam] = dict(
            logits=res["logits"].detach(),
            loss=float(res["loss"]),
            ce=float(res["ce"]),
            grads={n: p.grad for n, p in model.named_parameters() if p.grad is not None},
            first=comm.group("ep").index * G,
            G=G,
            expert_reads=sorted({k for k, _ in stats["reads"] if ".experts." in k}),
        )
        if export_root:  # float32 -> float64 -> float32 is exact: the export must be bitwise
            export(model, comm, f"{export_root}/{fam}", source=path, max_shard_mb=0.01, dtype=torch.float32)
    return out


def _hf_name(name: str, fam: str) -> str:
    from lshmoe.hf.family import family_for

    f = family_for(fam)
    name = name.replace("mlp.moe.router.", "mlp.gate.")
    if f.shared_gate_name:
        name = name.replace("mlp.moe.shared.gate.", f"mlp.{f.shared_gate_name}.")
    return name.replace("mlp.moe.shared.", f"mlp.{f.shared_name}.")


def _close(a: torch.Tensor, b: torch.Tensor, what) -> None:
    err = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
    assert err <= TOL, (what, err)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 4])
def test_converted_model_equals_transformers(checkpoints, world, tmp_path):
    export_root = str(tmp_path / "export") if world > 1 else ""
    results = run_ranks(_worker, world, checkpoints, export_root, timeout_s=120)
    from transformers import AutoModelForCausalLM

    for fam, path in checkpoints.items():
        ref = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").double()
        E = (
            ref.config.num_local_experts
            if fam == "mixtral"
            else ref.config.n_routed_experts
            if fam == "deepseek_v3"
            else ref.config.num_experts
        )
        for r in range(world):
            got = results[r][fam]
            ids, targets = _batch(r)
            hf = ref(input_ids=ids, labels=ids)
            _close(got["logits"], hf.logits.detach(), (fam, r, "logits"))
            assert abs(got["loss"] - float(hf.loss.detach())) <= TOL * max(1, abs(float(hf.loss.detach()))), (
                fam,
                r,
                "loss",
            )
            if fam != "deepseek_v3":
                assert hf.aux_loss is not None and abs(float(hf.loss.detach()) - got["ce"]) > 1e-4, (
                    "the aux loss must count"
                )
            hf.loss.backward()
            # each rank reads exactly its own experts' tensors (3 per expert per MoE layer)
            own = {e for k in got["expert_reads"] for e in [int(k.split(".experts.")[1].split(".")[0])]}
            assert own == set(range(got["first"], got["first"] + got["G"])), (fam, r, own)
        hf_params = dict(ref.named_parameters())
        # dense gradients: summed over the ranks' batches; experts: on the rank holding them
        for name in results[0][fam]["grads"]:
            if ".experts." in name:  # (names: the parameters stayed in the ranks)
                continue
            total = sum(res[fam]["grads"][name] for res in results)
            _close(total, hf_params[_hf_name(name, fam)].grad, (fam, name))
        for r in range(world):
            got = results[r][fam]
            for name, g in got["grads"].items():
                if ".experts." not in name:
                    continue
                block = name.split(".mlp.")[0] + ".mlp.experts."
                gu, dn = hf_params[block + "gate_up_proj"].grad, hf_params[block + "down_proj"].grad
                F_ = dn.shape[-1]
                lo, hi = got["first"], got["first"] + got["G"]
                ref_g = {"w1_GDF": gu[lo:hi, :F_], "w3_GDF": gu[lo:hi, F_:], "w2_GFD": dn[lo:hi]}[
                    name.rsplit(".", 1)[1]
                ]
                _close(g, ref_g.transpose(1, 2), (fam, r, name))
        assert E % world == 0
        if export_root:
            _check_export(f"{export_root}/{fam}", path)


def _check_export(out: str, source: str) -> None:
    """transformers loads the exported checkpoint unchanged, and every tensor equals the original bitwise."""
    from transformers import AutoModelForCausalLM

    orig = AutoModelForCausalLM.from_pretrained(source).state_dict()
    back = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert back.keys() == orig.keys()
    for k, v in orig.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
