"""SFT examples as tokens with a loss mask: the loss is on the assistant's replies only.

A conversation (a list of {role, content}; prompt/response rows are one user and one assistant
message, data/tables.py) is rendered to text, then tokenised once; a token is a loss token when its
characters overlap an assistant reply's span of the text.

    chat template   when the tokenizer's directory has one (tokenizer_config.json's chat_template, read
                    by transformers' AutoTokenizer.apply_chat_template): the reply spans are found by
                    rendering the conversation up to each reply (with the generation prompt) and up to
                    its end; the reply span is what the second adds to the first, so the template's
                    end-of-turn marker is learnt too. A template that does not render a conversation as
                    a prefix of its continuation is one line (such templates cannot mark replies).
    plain template  otherwise (lshmoe's own BPE has none), one line per message:

                        System: {content}\\n        (when there is a system message)
                        User: {content}\\n
                        Assistant: {content}{eos}\\n

                    the reply span is `{content}{eos}` (eos: the tokenizer's end-of-text token, when it
                    has one), so the model learns to stop.

The first token of an example is never a loss token: packed examples do not learn across their
boundary (the position before an example, which would predict its first token, is ignored).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lshmoe.data.tokenizer import TextTokenizer
from lshmoe.errors import DataError

Messages = list[dict[str, str]]
Renderer = Callable[[Messages], tuple[str, list[tuple[int, int]]]]  # -> (text, reply character spans)


class NotPrefix(Exception):
    """A chat template rendered a conversation's start differently from the whole conversation."""


def plain_render(eos_text: str | None) -> Renderer:
    eos = eos_text or ""

    def render(msgs: Messages) -> tuple[str, list[tuple[int, int]]]:
        parts: list[str] = []
        spans = []
        pos = 0
        for m in msgs:
            head = f"{m['role'].capitalize()}: "
            body = m["content"] + (eos if m["role"] == "assistant" else "")
            if m["role"] == "assistant":
                spans.append((pos + len(head), pos + len(head) + len(body)))
            line = head + body + "\n"
            parts.append(line)
            pos += len(line)
        return "".join(parts), spans

    return render


def template_render(hf_tokenizer) -> Renderer:
    """Reply spans under a transformers tokenizer's chat template."""

    def show(msgs: Messages, gen: bool) -> str:
        return hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    def render(msgs: Messages) -> tuple[str, list[tuple[int, int]]]:
        full = show(msgs, False)
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before, after = show(msgs[:i], True), show(msgs[: i + 1], False)
            if not (after.startswith(before) and full.startswith(after)):
                raise NotPrefix
            spans.append((len(before), len(after)))
        return full, spans

    return render


@dataclass
class ChatFormat:
    """How SFT examples of one run are rendered (`name` goes into cache keys and shard metadata)."""

    render: Renderer
    name: str  # "plain" or "template:<sha of the template>"


def chat_format(tok: TextTokenizer) -> ChatFormat:
    """The tokenizer's chat template when its directory has one, else the plain template."""
    if tok.config_dir is not None:
        conf = tok.config_dir
        config_text = (conf / "tokenizer_config.json").read_text()
        if (conf / "chat_template.jinja").is_file() or "chat_template" in config_text:
            import hashlib

            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(conf))
            if hf.chat_template:
                template = hf.chat_template if isinstance(hf.chat_template, str) else repr(hf.chat_template)
                return ChatFormat(template_render(hf), "template:" + hashlib.sha256(template.encode()).hexdigest()[:16])
    return ChatFormat(plain_render(tok.eos_text), "plain")


def encode_example(
    tok: TextTokenizer, fmt: ChatFormat, msgs: Messages, shown: str, index: int
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, loss mask) of one conversation; mask[0] is always 0 (see the module docstring)."""
    try:
        text, spans = fmt.render(msgs)
    except NotPrefix:
        raise DataError(
            f"--data {shown}: example {index}: the tokenizer's chat template does not render the conversation as a "
            "prefix of its continuation, so the replies cannot be told apart; use a template that does"
        ) from None
    except Exception as e:  # noqa: BLE001 - the template's own error (jinja raise_exception): one line
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise DataError(f"--data {shown}: example {index}: the chat template failed: {why}") from None
    enc = tok.tok.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, dtype=np.int64)
    offs = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(ids), dtype=np.uint8)
    for a, b in spans:
        mask |= ((offs[:, 1] > a) & (offs[:, 0] < b)).astype(np.uint8)
    if len(mask):
        mask[0] = 0
    return ids, mask


def render_text(fmt: ChatFormat, msgs: Messages) -> str:
    """The rendered text of a conversation (to train lshmoe's BPE on SFT data)."""
    return fmt.render(msgs)[0]


__all__ = ["ChatFormat", "Messages", "chat_format", "encode_example", "plain_render", "render_text"]
