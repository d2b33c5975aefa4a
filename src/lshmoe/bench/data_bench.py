"""Token data at scale: `lshmoe data prepare` on a GB-scale corpus, then each rank's start-up time and
peak memory with the prepared shards against the path that tokenises the text at every start.

The corpus is generated: the embedded docstring corpus, shuffled again for every copy (a seeded
order), repeated until it has `--gb` GB (and a `--small-mb` MB one for the tokenise-at-start path,
which cannot hold a GB: it keeps every token of the corpus in a Python list on every rank). Each
row starts `--nproc` rank processes at once, as a job's ranks start; every rank opens the token
data of `train --hf` with the checkpoint's tokenizer (`--hf`, the packaged MiniLM by default) and
draws its first training batch. Reported per rank: seconds from the process start to that batch,
and the peak resident set (VmHWM) and its part above the same process right after its imports.
Model building is left out: it is the same on every path.

    prepared          `--data DIR` of token shards (memory-mapped; what this package adds)
    cached, 1st start the text tokenised once by one rank under a file lock, into the token cache
    cached, again     the same text once the cache exists
    tokenise at start the code before token stores (`--baseline-src`: a source tree of it, e.g. a
                      git worktree of the commit before `lshmoe.data`), each rank tokenising it all

Run: `lshmoe bench data [--gb 1] [--baseline-src /tmp/lshmoe-old/src] [--out docs/bench]`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lshmoe.bench.harness import add_out_arg, recorded_args
from lshmoe.bench.report import md_table, print_table, write_section

# One rank: open the token data as train --hf does, draw one batch, report times and memory. Runs on
# this tree or on an older one (which has hf_token_data in lshmoe.hf.train).
RANK = r"""
import json, sys, time
t0 = float(sys.argv[1])
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
import torch
from pathlib import Path
from lshmoe.config import Config, DataConfig
try:
    from lshmoe.data import hf_token_data
except ImportError:
    from lshmoe.hf.train import hf_token_data
t_import, rss_import = time.time() - t0, status("VmRSS:")
cfg = Config(data=DataConfig(path=sys.argv[3], cache_dir=sys.argv[4]))
data = hf_token_data(Path(sys.argv[2]), cfg, int(sys.argv[5]), lambda m: None)
x, y = data.train_batch(0, int(sys.argv[6]), 8, 128, 0, torch.device("cpu"))
print(json.dumps({"first_batch_s": time.time() - t0, "import_s": t_import, "rss_import_mb": rss_import,
                  "peak_rss_mb": status("VmHWM:"), "rss_mb": status("VmRSS:"), "x_sum": int(x.sum())}))
"""


def rss_peak_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def generate_corpus(path: Path, target_bytes: int, seed: int = 0) -> dict[str, Any]:
    """Write the embedded corpus's documents, reshuffled for every copy, until `target_bytes`."""
    from lshmoe.data.corpus import embedded_corpus

    docs = embedded_corpus("stdlib")
    rng = random.Random(seed)
    written, copies = 0, 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        while written < target_bytes:
            order = list(range(len(docs)))
            rng.shuffle(order)
            block = "\n\n".join(docs[i] for i in order) + "\n\n"
            fh.write(block)
            written += len(block.encode("utf-8"))
            copies += 1
    return {"path": str(path), "bytes": path.stat().st_size, "copies": copies, "documents_per_copy": len(docs)}


def _env(src: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    return env


def run_prepare(data: Path, hf: Path, out: Path) -> dict[str, Any]:
    """`lshmoe data prepare` in a child process: wall time and the child's peak RSS."""
    code = (
        "import sys, json\nfrom lshmoe.data.prepare import main\nmain(sys.argv[1:])\n"
        "print(json.dumps({'peak_rss_mb': [int(l.split()[1]) / 1024 for l in open('/proc/self/status') "
        "if l.startswith('VmHWM:')][0]}))"
    )
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", code, "prepare", "--data", str(data), "--hf", str(hf), "--out", str(out)],
        capture_output=True,
        text=True,
        env=_env(Path(__file__).parents[2]),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"data prepare failed: {proc.stderr[-2000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    size = sum(f.stat().st_size for f in out.iterdir())
    return {"wall_s": time.time() - t0, "peak_rss_mb": res["peak_rss_mb"], "shard_bytes": size, "log": proc.stderr}


def run_ranks_once(src: Path, hf: Path, data: Path, cache: Path, vocab: int, nproc: int) -> list[dict[str, Any]]:
    """Start `nproc` rank processes at once; each opens the token data and draws a batch."""
    procs = []
    for rank in range(nproc):
        argv = [sys.executable, "-c", RANK, repr(time.time()), str(hf), str(data), str(cache), str(vocab), str(rank)]
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(src)))
    out = []
    for p in procs:
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"rank failed: {stderr[-2000:]}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lshmoe bench data", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--gb", type=float, default=1.0, help="size of the generated corpus for prepare [default: 1]")
    p.add_argument("--small-mb", type=float, default=10.0, help="corpus of the tokenise-at-start rows [default: 10]")
    p.add_argument("--nproc", type=int, default=2, help="ranks started at once per row [default: 2]")
    p.add_argument("--hf", default="all-MiniLM-L6-v2", help="checkpoint whose tokenizer is used [default: MiniLM]")
    p.add_argument("--baseline-src", type=Path, help="src/ of a tree before lshmoe.data (the tokenise-at-start row)")
    p.add_argument("--work", type=Path, default=Path("/tmp/lshmoe-data-bench"), help="corpora, shards and caches")
    p.add_argument("--keep", action="store_true", help="keep --work afterwards")
    p.add_argument("--from-json", type=Path, metavar="PATH", help="re-render the report of a recorded run (its JSON)")
    return add_out_arg(p, name="data")


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.from_json:
        rec = json.loads(a.from_json.read_text())
        args = argparse.Namespace(**{**rec["args"], "out": a.out, "name": a.name})
        report(args, rec["corpus"], rec["prepare"], rec["rows"], rec["command"], rec["machine"], rec["load_average"])
        return 0
    from lshmoe.hf.packaged import checkpoint_dir

    hf = checkpoint_dir(a.hf)
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    here = Path(__file__).parents[2]
    work = a.work
    if work.exists():
        shutil.rmtree(work)
    try:
        big = generate_corpus(work / "big.txt", int(a.gb * 1e9))
        small = generate_corpus(work / "small.txt", int(a.small_mb * 1e6))
        print(f"corpora: {big['bytes'] / 1e6:.0f} MB and {small['bytes'] / 1e6:.1f} MB", flush=True)
        prep = run_prepare(work / "big.txt", hf, work / "shards")
        print(f"prepare: {prep['wall_s']:.1f} s, peak RSS {prep['peak_rss_mb']:.0f} MB", flush=True)
        rows = []

        def row(name: str, corpus: dict, data: Path, cache: Path, src: Path) -> None:
            ranks = run_ranks_once(src, hf, data, cache, vocab, a.nproc)
            rows.append({"path": name, "corpus_mb": corpus["bytes"] / 1e6, "ranks": ranks})
            print(name, [f"{r['first_batch_s']:.1f} s / {r['peak_rss_mb']:.0f} MB" for r in ranks], flush=True)

        row("prepared shards", big, work / "shards", work / "cache-unused", here)
        row("cached, 1st start", small, work / "small.txt", work / "cache", here)
        row("cached, again", small, work / "small.txt", work / "cache", here)
        if a.baseline_src is not None:
            row("tokenise at start (before)", small, work / "small.txt", work / "cache-old", a.baseline_src)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(a, big, prep, rows)
    return 0


def report(
    a: argparse.Namespace,
    big: dict,
    prep: dict,
    rows: list[dict],
    command: str | None = None,
    meta: dict | None = None,
    load: tuple[float, ...] | None = None,
) -> None:
    headers = [
        "path",
        "corpus (MB)",
        "start to 1st batch, per rank (s)",
        "of which data (s)",
        "peak RSS per rank (MB)",
        "above imports (MB)",
    ]
    table = []
    for r in rows:
        ranks = r["ranks"]
        table.append(
            [
                r["path"],
                round(r["corpus_mb"], 1),
                " / ".join(f"{x['first_batch_s']:.1f}" for x in ranks),
                " / ".join(f"{x['first_batch_s'] - x['import_s']:.2f}" for x in ranks),
                " / ".join(f"{x['peak_rss_mb']:.0f}" for x in ranks),
                " / ".join(f"{x['peak_rss_mb'] - x['rss_import_mb']:.0f}" for x in ranks),
            ]
        )
    print_table(headers, table)
    load = load or os.getloadavg()
    body = f"""
`lshmoe data prepare` tokenised a generated {big["bytes"] / 1e9:.2f} GB text corpus ({big["copies"]} reshuffled
copies of the embedded docstring corpus) with the {a.hf} tokenizer in **{prep["wall_s"]:.0f} s** (peak RSS
{prep["peak_rss_mb"]:.0f} MB; {prep["shard_bytes"] / 1e6:.0f} MB of shards). Then {a.nproc} rank processes were
started at once per row; each opened the token data as `train --hf` does and drew its first batch (8 x 128 tokens).
Model building is not included (it is the same on every path). "Above imports" is the peak resident set minus the
process's own after importing torch and lshmoe; "of which data" is the time after those imports (opening or
building the token data and drawing the batch).

{md_table(headers, table)}

The tokenise-at-start row runs the code before token stores (`--baseline-src`) on the small corpus only: every
rank builds a Python list of all the corpus's token ids (about 36 bytes per token) and then holds the whole corpus
as a tensor, so a GB corpus would need several GB per rank and minutes of tokenising at every start. The prepared
shards are memory-mapped: a rank reads only the pages of its windows, whatever the corpus size. Preparing is
bound by the tokenizer ({big["bytes"] / 1e6 / prep["wall_s"]:.1f} MB of text per second here; the first cached
start shows the same rate, one rank tokenising while the other waits on the lock): it is paid once per corpus and
tokenizer, not at every start of every rank.

Conditions: a shared 2-core machine (other jobs running; load average {load[0]:.1f} at the end), so times are
single measurements and indicative.
"""
    write_section(
        a.out,
        a.name,
        "Token data: prepared shards vs tokenising at start",
        body,
        {
            "args": {k: v for k, v in recorded_args(a).items() if k != "from_json"},
            "corpus": big,
            "prepare": {k: v for k, v in prep.items() if k != "log"},
            "rows": rows,
            "load_average": load,
        },
        command=command,
        meta=meta,
    )


if __name__ == "__main__":
    sys.exit(main())
