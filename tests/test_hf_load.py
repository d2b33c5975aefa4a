"""lshmoe.hf in one process: the fused 3-D expert layout (transformers' in-memory state_dict) loads the
same model as the per-expert one; transformers' generation runs unchanged on the converted model; and
bad input gives one clear line naming the family, file, tensor or field."""

from __future__ import annotations

import json

import pytest
import torch
from hf_cases import V, build_reference, save_checkpoint
from safetensors.torch import load_file, save_file

from lshmoe.config import ConfigError
from lshmoe.hf import HFError, from_pretrained, read_config
from lshmoe.hf.family import family_for
from lshmoe.hf.model import check_ep, moe_config


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("q3") / "ckpt", "qwen3_moe")


def _rewrite(src, dst, edit):
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            tensors = load_file(str(f))
            edit(tensors)
            save_file(tensors, str(dst / f.name), metadata={"format": "pt"})
        else:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_unsupported_family_lists_the_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(HFError) as e:
        read_config(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "model_type='llama'" in msg
    assert "supported: deepseek_v3, mixtral, olmoe, qwen2_moe, qwen3_moe" in msg


def test_directory_without_config(tmp_path):
    with pytest.raises(HFError, match="no config.json; expected a Hugging Face checkpoint directory"):
        from_pretrained(tmp_path)


def test_missing_tensor_is_named(qwen3, tmp_path):
    key = "model.layers.1.mlp.experts.5.up_proj.weight"
    bad = _rewrite(qwen3, tmp_path / "bad", lambda t: t.pop(key))
    with pytest.raises(HFError, match=f"tensor {key} is missing from the checkpoint"):
        from_pretrained(bad)


def test_misshaped_tensor_is_named(qwen3, tmp_path):
    key = "model.layers.0.self_attn.q_proj.weight"
    bad = _rewrite(qwen3, tmp_path / "bad", lambda t: t.__setitem__(key, t[key][:-1]))
    with pytest.raises(HFError, match=rf"tensor {key} has shape \[15, 16\], expected \[16, 16\]"):
        from_pretrained(bad)


def test_experts_not_divisible_by_ep(qwen3):
    mcfg = moe_config(read_config(qwen3), family_for("qwen3_moe"))
    with pytest.raises(ConfigError, match="moe.num_experts=8 is not divisible by the expert-parallel size 3"):
        check_ep(mcfg, 3, 3)


def test_fused_expert_layout_loads_the_same_model(qwen3, tmp_path):
    """A raw dump of transformers' in-memory state_dict (experts as [E, 2F, D] / [E, D, F])."""
    ref = build_reference("qwen3_moe")
    fused = tmp_path / "fused"
    fused.mkdir()
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in sd
    save_file(sd, str(fused / "model.safetensors"), metadata={"format": "pt"})
    (fused / "config.json").write_text((qwen3 / "config.json").read_text())
    a = from_pretrained(qwen3, dtype=torch.float64)
    b = from_pretrained(fused, dtype=torch.float64)
    ids = torch.randint(0, V, (2, 5))
    assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_generate_is_transformers_own(qwen3):
    """Greedy generation with the KV cache: the converted model picks the same tokens."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(qwen3), experts_implementation="eager").double()
    ref.config.output_router_logits = False  # its aux loss does not take generation's padded masks
    ours = from_pretrained(qwen3, dtype=torch.float64)
    ids = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


def test_tensorboard_flag_needs_the_package():
    import importlib.util

    from lshmoe.config import Config, TrainConfig, validate

    cfg = Config(train=TrainConfig(tensorboard=True))
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match="train.tensorboard=true needs the tensorboard package"):
            validate(cfg)
    else:
        assert validate(cfg) is cfg
