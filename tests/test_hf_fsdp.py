"""A Hugging Face MoE under FSDP2 (a decoder layer per unit, experts sharded over the ranks that hold
them): each rank reads only its rows of the dense weights, training equals the unsharded run in
float64, and the exported checkpoint loads in transformers with the weights the unsharded run ends with.
"""

from __future__ import annotations

import pytest
import torch
from cli_util import corpus, run
from conftest import EXACT
from hf_cases import save_checkpoint

from lshmoe.config import Config, from_dict
from lshmoe.testing import run_ranks


def _cfg(src, tmp, fsdp: bool) -> dict:
    cfg = Config()
    cfg.model.hf, cfg.model.seq_len = str(src), 16
    cfg.data.path = str(corpus(tmp))
    cfg.moe.ep_size = 1  # world 2, EP 1: both ranks hold all 8 experts, FSDP splits them in two
    cfg.dist.fsdp = fsdp
    t = cfg.train
    t.dtype, t.batch_size, t.progress, t.resume, t.out_dir = "float64", 2, False, "none", str(tmp / f"run{fsdp}")
    return cfg.to_dict()


def _worker(comm, cfg_dict):
    from lshmoe.hf.task import task_for
    from lshmoe.train.loop import Trainer

    cfg = from_dict(cfg_dict)
    tr = Trainer(cfg, comm, task_for(cfg.model.hf))
    reads = tr.task.load_stats["reads"]
    losses = [tr.train_step(s)["loss"] for s in range(2)]
    params = {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in tr.model.named_parameters()
    }
    return {"reads": reads, "losses": losses, "params": params}


@pytest.mark.slow
def test_fsdp_reads_its_shards_and_trains_as_the_unsharded_model(tmp_path):
    src = save_checkpoint(tmp_path / "qwen3", "qwen3_moe")
    plain = run_ranks(_worker, 2, _cfg(src, tmp_path, False), ep_size=1, timeout_s=120)
    sharded = run_ranks(_worker, 2, _cfg(src, tmp_path, True), ep_size=1, timeout_s=120)
    for rank in (0, 1):
        reads = dict(sharded[rank]["reads"])
        # the embedding (96 x 16) is read as this rank's 48 rows, never whole; experts whole (E / EP of them)
        assert reads["model.embed_tokens.weight"] == ((0, 48) if rank == 0 else (48, 96))
        assert dict(plain[rank]["reads"])["model.embed_tokens.weight"] is None
        assert sharded[rank]["losses"] == pytest.approx(plain[rank]["losses"], abs=EXACT)
        for name, p in plain[rank]["params"].items():
            err = (sharded[rank]["params"][name] - p).abs().max().item()
            assert err <= EXACT, (name, err)


@pytest.mark.slow
def test_export_of_an_fsdp_run_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    src = save_checkpoint(tmp_path / "qwen3", "qwen3_moe")
    common = ["train", "--hf", str(src), "--data", str(corpus(tmp_path)), "--seq-len", "16", "--batch-size", "4"]
    common += ["--steps", "4", "--save-every", "4", "--progress", "false", "--nproc", "2", "--ep-size", "1"]
    exported = {}
    for name, extra in (("plain", []), ("fsdp", ["--fsdp"])):
        code, err, _ = run([*common, *extra, "--out-dir", str(tmp_path / name)])
        assert code == 0, err
        code, err, _ = run(
            ["export", "--checkpoint", str(tmp_path / name / "checkpoints"), "--hf-out", str(tmp_path / f"{name}-hf")]
        )
        assert code == 0, err
        exported[name] = AutoModelForCausalLM.from_pretrained(str(tmp_path / f"{name}-hf")).state_dict()
    orig = AutoModelForCausalLM.from_pretrained(str(src)).state_dict()
    assert exported["fsdp"].keys() == exported["plain"].keys() == orig.keys()
    for k, v in exported["plain"].items():
        # float32 sums in another order (reduce-scatter vs all-reduce): equal to rounding
        assert torch.allclose(exported["fsdp"][k], v, atol=1e-5, rtol=1e-4), k
    assert any(not torch.equal(orig[k], exported["fsdp"][k]) for k in orig if ".experts." in k)
