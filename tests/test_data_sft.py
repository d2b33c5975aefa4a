"""SFT: prompt/response and chat examples, the loss only on the replies, no loss across examples;
lshmoe's BPE with the plain template, and a small HF MoE checkpoint with a chat template of its own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_util import real_docs
from tokenizers import Tokenizer

from lshmoe.config import Config, DataConfig
from lshmoe.data import IGNORE, hf_token_data, load_data
from lshmoe.errors import DataError

pytest.importorskip("datasets")
CPU = torch.device("cpu")
# A ChatML-like template spelled in the characters of the checkpoint's character tokenizer (which
# has no newline).
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _pairs(n: int = 80) -> list[tuple[str, str]]:
    """Real text: a docstring's first line as the prompt, its next lines as the response."""
    out = []
    for d in real_docs(100):
        lines = [ln for ln in d.split("\n") if ln.strip()]
        if len(lines) >= 3 and 20 < len(lines[0]) < 80:
            out.append(("Explain: " + lines[0], " ".join(lines[1:3])[:160]))
        if len(out) == n:
            return out
    raise AssertionError


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _loss_spans(x: torch.Tensor, y: torch.Tensor) -> list[list[int]]:
    """Per row, the runs of consecutive loss targets (as token id lists)."""
    out = []
    for row in y.tolist():
        runs, cur = [], []
        for t in row:
            if t == IGNORE:
                if cur:
                    runs.append(cur)
                cur = []
            else:
                cur.append(t)
        out.append(runs + ([cur] if cur else []))
    return out


def test_prompt_response_with_lshmoe_bpe_learns_only_the_responses(tmp_path):
    pairs = _pairs()
    f = _jsonl(tmp_path / "sft.jsonl", [{"prompt": p, "response": r} for p, r in pairs])
    data = load_data(DataConfig(path=str(f), vocab_size=400, cache_dir=str(tmp_path / "c")))
    assert data.kind == "sft", "data.format=auto: prompt + response columns are SFT examples"
    tok = Tokenizer.from_file(str(data.tokenizer_path))
    data.check_seq_len(96)
    responses = {r + "<|endoftext|>" for _, r in pairs}
    x, y = data.train_batch(0, 0, 8, 96, 0, CPU)
    for runs in _loss_spans(x, y):
        assert runs, "every window has a reply token"
        first = tok.decode(runs[0], skip_special_tokens=False)
        assert any(r.startswith(first.lstrip()) or first.lstrip() in r for r in responses), first
        for run in runs:
            assert "Explain:" not in tok.decode(run, skip_special_tokens=False), "no loss on a prompt"
    # every target at a position that predicts an example's first token is ignored
    starts = np.asarray(data.splits["train"]["starts"])
    mask = np.asarray(data.splits["train"]["mask"])
    assert not mask[starts[:-1]].any()


def test_a_window_across_two_examples_has_no_loss_on_the_next_examples_start(tmp_path):
    pairs = _pairs(40)
    f = _jsonl(tmp_path / "sft.jsonl", [{"prompt": p, "response": r} for p, r in pairs])
    data = load_data(DataConfig(path=str(f), vocab_size=400, format="sft", cache_dir=str(tmp_path / "c")))
    seq = 400  # longer than any example: every window holds the start of the next one
    x, y = data.train_batch(3, 0, 4, seq, 0, CPU)
    starts = set(np.asarray(data.splits["train"]["starts"]).tolist())
    tok = Tokenizer.from_file(str(data.tokenizer_path))
    user = tok.encode("User:").ids[0]
    for b in range(4):
        nxt = [j for j in range(1, seq) if int(x[b, j]) == user and int(x[b, j - 1]) == tok.token_to_id("\u010a")]
        for j in nxt:  # the position before the next example's "User:" predicts it: ignored
            assert int(y[b, j - 1]) == IGNORE
    assert len(starts) > 1


def _hf_checkpoint(tmp: Path) -> Path:
    from hf_cases import save_checkpoint

    path = save_checkpoint(tmp / "qwen", "qwen3_moe")
    conf = json.loads((path / "tokenizer_config.json").read_text())
    conf["chat_template"] = TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(conf))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    return path


def test_chat_messages_through_the_checkpoints_chat_template(tmp_path):
    from transformers import AutoTokenizer

    ckpt = _hf_checkpoint(tmp_path)
    pairs = _pairs(60)
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": p[:40]},
                {"role": "assistant", "content": r[:50]},
                {"role": "user", "content": "And then?"},
                {"role": "assistant", "content": r[50:90]},
            ]
        }
        for p, r in pairs
    ]
    f = _jsonl(tmp_path / "chat.jsonl", rows)
    cfg = Config(data=DataConfig(path=str(f), format="sft", cache_dir=str(tmp_path / "c")))
    data = hf_token_data(ckpt, cfg, 96, lambda m: None)
    assert data.kind == "sft" and data.meta["tokenizer"]["chat"].startswith("template:")
    hf = AutoTokenizer.from_pretrained(str(ckpt))
    starts = np.asarray(data.splits["train"]["starts"])
    toks, mask = np.asarray(data.tokens("train")), np.asarray(data.splits["train"]["mask"])
    # example 0 of the training split, compared with transformers' own rendering and tokenisation
    order = [i for i in range(len(rows)) if rows[i]["messages"][2]["content"] in _decode(hf, toks[: starts[1]])]
    msgs = rows[order[0]]["messages"]
    want = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=False, return_dict=True)["input_ids"]
    assert toks[: starts[1]].tolist() == list(want)
    learnt = _decode(hf, toks[: starts[1]][mask[: starts[1]] == 1])
    assert learnt == msgs[2]["content"] + "</assistant>" + msgs[4]["content"] + "</assistant>"
    with pytest.raises(DataError, match="within model.seq_len=40"):
        data.val_batch(0, 0, 1, 2, 40, CPU, 1)  # the system + user turns are longer than 40 characters
    data.check_seq_len(160)
    x, y = data.val_batch(0, 0, 1, 2, 160, CPU, 1)
    assert (y != IGNORE).any(dim=1).all(), "every validation window has reply targets"


def _decode(hf, ids) -> str:
    return "".join(hf.convert_ids_to_tokens([int(i) for i in ids]))


def test_sft_needs_columns_and_replies_within_the_window(tmp_path):
    f = _jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "a"}] * 5)
    with pytest.raises(DataError, match="needs a messages column, or prompt and response.*question, answer"):
        load_data(DataConfig(path=str(f), format="sft", cache_dir=str(tmp_path / "c")))
    (tmp_path / "t.txt").write_text("Some text.\n\nMore text.\n")
    with pytest.raises(DataError, match="data.format=sft needs SFT examples in a table"):
        load_data(DataConfig(path=str(tmp_path / "t.txt"), format="sft", cache_dir=str(tmp_path / "c")))
    long = [{"prompt": "word " * 200 + str(i), "response": "short"} for i in range(30)]
    data = load_data(DataConfig(path=str(_jsonl(tmp_path / "l.jsonl", long)), cache_dir=str(tmp_path / "c")))
    with pytest.raises(DataError, match="none has a reply token within model.seq_len=32"):
        data.check_seq_len(32)
