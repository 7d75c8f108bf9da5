"""Benchmark data preparation and the sampler at scale (issue 17's figures).

1. Tokenization throughput: ``cpt.data.shards.write_shard`` with 1 and 2 workers against the ceiling of the
   ``tokenizers`` library's own ``encode_batch`` over the same documents in the same process, on one thread (the
   per-worker ceiling) and on its Rayon pool, with the demo's kind of tokenizer (sentencepiece BPE, 4,096 tokens,
   trained here on KJV + stdlib).
2. A large JSONL corpus (``--size-mb``, default 2,000 MB; generated from KJV chapters and standard-library
   modules, each repeated with a numbered header so that no two documents are equal): ``cpt prepare --workers 2``
   uninterrupted (wall time; peak RSS of its largest process and of the tree summed, sampled from ``/proc``), then
   again into another directory, killed with SIGKILL at a random point and run again; the two corpora compared
   byte for byte.
3. The sampler for 10^9 tokens in 1,000 shards: synthetic OLMo-style uint16 token files (1,000 x 10^6 tokens,
   documents of 200-1,800 tokens), prepared in place; the time to build the run's ``DataStream`` and draw the
   first batch, and the size of its checkpoint state.

Usage::

    .venv/bin/python scripts/bench_data.py [--size-mb 2000] [--work DIR] [--no-write]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmarks_md  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Data preparation at scale"


def texts(limit_bytes: int):
    """KJV chapters and stdlib modules, repeated with a numbered header, until ``limit_bytes`` of text."""
    from cpt.data.sources import CorpusConfig, iter_documents

    base = list(iter_documents(CorpusConfig(source="kjv"))) + list(iter_documents(CorpusConfig(source="python-stdlib")))
    total, i = 0, 0
    while total < limit_bytes:
        doc = f"# copy {i // len(base)}\n" + base[i % len(base)]
        total += len(doc.encode())
        i += 1
        yield doc


def tokenizer_dir(work: Path) -> Path:
    from cpt.data.tokenizer import TrainTokenizerConfig, train_sentencepiece

    out = work / "tokenizer"
    train_sentencepiece(TrainTokenizerConfig(vocab_size=4096), texts(20_000_000), "bench-data-v1", out)
    return out


def throughput(work: Path, tok_dir: Path, megabytes: int = 40) -> dict:
    """Tokens per second of ``tokenizers``' own ``encode_batch`` (the ceiling) on one thread and on all of the
    machine's (its Rayon pool), and of ``write_shard`` with 1 worker (this process; on one thread, then on all) and 2
    worker processes (one thread each)."""
    from cpt.data.shards import write_shard
    from cpt.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tok_dir)
    docs = list(texts(megabytes * 1_000_000))
    rates = {}

    def one_thread(on: bool) -> None:  # tokenizers reads the variable at every call
        os.environ["TOKENIZERS_PARALLELISM"] = "false" if on else "true"

    tokens = 0
    for threads in ("1", "all"):
        one_thread(threads == "1")
        start = time.perf_counter()
        tokens = sum(len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False))
        rates[f"ceiling_{threads}"] = (tokens + len(docs)) / (time.perf_counter() - start)
    for name, workers, single in (("workers_1_thread_1", 1, True), ("workers_1", 1, False), ("workers_2", 2, False)):
        one_thread(single)
        start = time.perf_counter()
        write_shard(name, work / f"tp-{name}", docs, tokenizer, "fp", {}, 0.01, None, 0, workers=workers)
        rates[name] = (tokens + len(docs)) / (time.perf_counter() - start)
    os.environ.pop("TOKENIZERS_PARALLELISM")
    return {"megabytes": megabytes, "documents": len(docs), "tokens": tokens + len(docs), "cpus": os.cpu_count(),
            **rates}


def prepare_process(recipe: Path, data_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cpt", "prepare", str(recipe), f"run.data_dir={data_dir}",
                             "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait(proc: subprocess.Popen) -> tuple[int, float, float]:
    """Exit status of ``proc``; the peak RSS (MiB) of its largest process, and the peak of the RSS summed over its
    process tree (pages a forked worker shares with its parent counted in both: an upper bound), both sampled every
    0.2 s from ``/proc`` (each process's ``VmHWM``, its own peak, for the first; ``wait4``'s ``ru_maxrss`` would
    count the benchmark's own memory, which a child keeps as its maximum across ``exec``)."""
    import threading

    import psutil

    peak_one, peak_sum, done = 0.0, 0.0, threading.Event()

    def hwm(pid: int) -> float:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def sample() -> None:
        nonlocal peak_one, peak_sum
        root = psutil.Process(proc.pid)
        while not done.wait(0.2):
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                return
            total = 0.0
            for p in tree:
                try:
                    total += p.memory_info().rss / 2**20
                    peak_one = max(peak_one, hwm(p.pid))
                except (psutil.Error, OSError):
                    pass
            peak_sum = max(peak_sum, total)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, _ = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, peak_one, peak_sum


def large_corpus(work: Path, tok_dir: Path, size_mb: int) -> dict:
    corpus = work / f"large-{size_mb}mb.jsonl"
    if not corpus.is_file() or corpus.stat().st_size < size_mb * 1_000_000:
        with open(corpus, "w") as f:
            for doc in texts(size_mb * 1_000_000):
                f.write(json.dumps({"text": doc}) + "\n")
    recipe = work / "large.yaml"
    recipe.write_text(json.dumps({
        "name": "large", "model": {"init": "scratch", "arch": {"layers": 2, "hidden": 32, "heads": 2}},
        "tokenizer": {"path": str(tok_dir)},
        "corpora": {"large": {"source": str(corpus), "val_fraction": 0.001, "val_max_docs": 2000}},
        "eval": {"sets": {"upstream": "large"}}, "stages": [{"name": "s", "steps": 1, "mixture": {"large": 1.0}}],
        "run": {"dir": str(work / "run")}, "data": {"task_mb": 64}}))
    for d in ("whole", "killed"):
        subprocess.run(["rm", "-rf", str(work / d)], check=True)
    start = time.perf_counter()
    proc = prepare_process(recipe, work / "whole")
    code, rss, rss_tree = wait(proc)
    wall = time.perf_counter() - start
    assert code == 0, proc.stderr.read()[-2000:]
    kill_at = random.Random(size_mb).uniform(0.2, 0.8) * wall
    proc = prepare_process(recipe, work / "killed")
    time.sleep(kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = next((work / "killed").glob(".large-*.partial"), None)
    done = len(list((partial / "shards").glob("*.docs.npz"))) if partial else 0
    start = time.perf_counter()
    proc = prepare_process(recipe, work / "killed")
    code, _, _ = wait(proc)
    rerun = time.perf_counter() - start
    assert code == 0, proc.stderr.read()[-2000:]
    [whole] = (work / "whole").glob("large-*")
    killed = work / "killed" / whole.name

    def files(path: Path) -> dict[str, bytes]:
        return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
                if p.is_file() and p.name != "manifest.json"}

    same = files(whole) == files(killed)
    manifest = json.loads((whole / "manifest.json").read_text())
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    shards = len(list((whole / "shards").glob("*.bin")))
    return {"size_mb": round(corpus.stat().st_size / 1e6), "tokens": tokens, "shards": shards, "wall_s": wall,
            "peak_rss_mib": rss, "peak_rss_tree_mib": rss_tree, "killed_at_s": kill_at, "shards_kept": done,
            "rerun_s": rerun, "identical": same}


def sampler_at_scale(work: Path, tok_dir: Path, files: int = 1000, per_file: int = 1_000_000) -> dict:
    from cpt.data.prepare import prepare
    from cpt.data.stream import DataStream
    from cpt.data.tokenizer import load_tokenizer
    from cpt.recipe import load_recipe

    eos = load_tokenizer(tok_dir).eos_token_id
    shards = work / "olmo"
    work.mkdir(parents=True, exist_ok=True)
    shards.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(files):
        path = shards / f"part-{i:04d}.npy"
        if path.is_file() and path.stat().st_size == 2 * per_file:
            continue
        tokens = rng.integers(3, 4096, per_file, dtype=np.uint16)
        ends = np.cumsum(rng.integers(200, 1800, per_file // 200))
        tokens[ends[ends < per_file] - 1] = eos
        tokens[-1] = eos
        tokens.tofile(path)
    recipe = work / "olmo.yaml"
    recipe.write_text(json.dumps({
        "name": "olmo", "model": {"init": "scratch", "arch": {"layers": 2, "hidden": 32, "heads": 2}},
        "tokenizer": {"path": str(tok_dir)},
        "corpora": {"web": {"source": str(shards), "format": "olmo", "dtype": "uint16", "tokenizer": str(tok_dir),
                            "val_fraction": 0.001, "val_max_docs": 500}},
        "eval": {"sets": {"upstream": "web"}},
        "stages": [{"name": "s", "steps": 100_000, "mixture": {"web": 1.0}}],
        "train": {"seq_len": 2048, "micro_batch": 4, "grad_accum": 1}, "run": {"dir": str(work / "olmo-run")}}))
    r, base_dir = load_recipe(recipe)
    start = time.perf_counter()
    data = prepare(r, base_dir, work / "olmo-data")
    prepare_s = time.perf_counter() - start
    start = time.perf_counter()
    data = prepare(r, base_dir, work / "olmo-data")  # what every later start costs: the prepared corpus reopened
    reopen_s = time.perf_counter() - start
    start = time.perf_counter()
    stream = DataStream(data.corpora, r.stages, [100_000], 2048, 4, seed=0)
    stream.start_stage(0)
    batch, _ = stream.next_batch()
    startup_s = time.perf_counter() - start
    import torch

    buffer = io.BytesIO()
    torch.save(stream.state_dict(), buffer)
    shard = data.corpora["web"]
    return {"tokens": len(shard.train.tokens) + len(shard.val.tokens), "files": files, "prepare_s": prepare_s,
            "reopen_s": reopen_s, "startup_s": startup_s, "state_bytes": len(buffer.getvalue()),
            "ranges_bytes": (shard.path / "ranges.npz").stat().st_size, "batch": list(batch.shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=2000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cpt-bench-data"))
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 MB, 20 token files of 10^5; prints only")
    args = parser.parse_args()
    if args.quick:
        args.size_mb, args.no_write = 20, True
    args.work.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_dir(args.work)
    results = {"throughput": throughput(args.work, tok, 4 if args.quick else 40),
               "large": large_corpus(args.work, tok, args.size_mb),
               "sampler": sampler_at_scale(args.work / ("quick" if args.quick else "full"), tok,
                                           *((20, 100_000) if args.quick else (1000, 1_000_000)))}
    print(json.dumps(results, indent=1))
    if args.no_write:
        return
    t, big, s = results["throughput"], results["large"], results["sampler"]
    import tokenizers

    where = ", ".join(f"{k} {v}" for k, v in benchmarks_md.machine(tokenizers=tokenizers.__version__).items())
    body = f"""`scripts/bench_data.py --size-mb {args.size_mb}` ({where}; {benchmarks_md.code_version("cpt")}).

Tokenization of {t['megabytes']} MB of KJV + stdlib text ({t['documents']:,} documents, {t['tokens']:,} tokens) with a
4,096-token sentencepiece BPE:

| | tokens/s | per worker vs the one-thread ceiling |
|---|---|---|
| `tokenizers` `encode_batch`, one thread (the ceiling) | {t['ceiling_1']:,.0f} | 1.00 |
| `tokenizers` `encode_batch`, its thread pool ({t['cpus']} CPUs) | {t['ceiling_all']:,.0f} | |
| `write_shard`, 1 worker on one thread | {t['workers_1_thread_1']:,.0f} | {t['workers_1_thread_1'] / t['ceiling_1']:.2f} |
| `write_shard`, 1 worker with the tokenizer's thread pool | {t['workers_1']:,.0f} | |
| `write_shard`, 2 worker processes | {t['workers_2']:,.0f} | {t['workers_2'] / 2 / t['ceiling_1']:.2f} |

Tokens include each document's EOS. 2 workers against 1 on one thread: {t['workers_2'] / t['workers_1_thread_1']:.2f}x.

A {big['size_mb']:,} MB JSONL corpus ({big['tokens']:,} tokens, {big['shards']} shards of 64 MB of text), `cpt prepare
--workers 2`: {big['wall_s']:.0f} s; peak RSS of its largest process {big['peak_rss_mib']:.0f} MiB, of the three
processes together at most {big['peak_rss_tree_mib']:.0f} MiB (summed RSS, shared pages counted in each). Killed with
SIGKILL after {big['killed_at_s']:.0f} s ({big['shards_kept']} shards finished and kept) and run again: {big['rerun_s']:.0f} s more,
corpus identical to the uninterrupted one: **{big['identical']}**.

The sampler over {s['tokens']:,} tokens in {s['files']:,} OLMo-style token files, read in place: preparing (finding
documents, checking ids, the split) {s['prepare_s']:.0f} s once; reopening the prepared corpus {s['reopen_s']:.1f} s;
building the `DataStream` and drawing the first batch of 4 x 2,048 tokens {s['startup_s']:.2f} s; the sampler's
checkpoint state {s['state_bytes']:,} bytes; `ranges.npz` {s['ranges_bytes']:,} bytes.
"""
    benchmarks_md.write_section(ROOT / "BENCHMARKS.md", HEADING, body)


if __name__ == "__main__":
    main()
