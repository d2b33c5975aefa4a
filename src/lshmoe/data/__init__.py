"""Training data: text, datasets and SFT examples, tokenised once into memory-mapped token shards.

    corpus.py     the embedded docstring corpus (no download)
    files.py      --data text files: which files, strict UTF-8, documents
    tables.py     JSONL / parquet / Arrow / saved datasets through the `datasets` package
    source.py     what --data holds, as a re-readable stream of documents or SFT conversations
    split.py      the held-out validation split, by document
    tokenizer.py  lshmoe's byte-level BPE, or a given tokenizer.json (+ eos, chat template)
    chat.py       SFT: conversations rendered and tokenised, loss mask on the replies
    store.py      the on-disk token store: memmap token files + index + manifest
    build.py      records -> store (streaming)
    shards.py     TokenData: batches from a store, read lazily
    load.py       load_data (GPT-MoE) and hf_token_data (train --hf): prepared, or built once and cached
    prepare.py    the `lshmoe data prepare` verb

The package stands below the training loop: it imports errors, seeding, config and integrity only.
"""

from lshmoe.data.load import default_cache_dir, hf_token_data, load_data
from lshmoe.data.shards import IGNORE, TokenData

__all__ = ["IGNORE", "TokenData", "default_cache_dir", "hf_token_data", "load_data"]
