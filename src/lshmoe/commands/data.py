"""`lshmoe data prepare|verify`: token shards written once, read lazily by training (lshmoe/data/prepare.py).

This verb only resolves a packaged checkpoint name given to `--hf` (e.g. `all-MiniLM-L6-v2`) to its
directory, which the data package cannot do itself (it sits below `hf/`).
"""

from __future__ import annotations


def main(argv: list[str]) -> int:
    from lshmoe.data.prepare import main as prepare_main

    argv = list(argv)
    if "--hf" in argv and argv.index("--hf") + 1 < len(argv):
        from lshmoe.hf.packaged import checkpoint_dir

        i = argv.index("--hf") + 1
        argv[i] = str(checkpoint_dir(argv[i]))
    return prepare_main(argv)
