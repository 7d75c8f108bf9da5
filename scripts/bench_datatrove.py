"""datatrove against cpt's own task runner, on the same corpus and tokenizer (issue 17: evaluate, measure, pick).

The corpus: ``--mb`` MB of KJV chapters and standard-library modules (as ``bench_data.py`` makes them) in
``--files`` JSONL files. Both tokenize it into uint16 token files with the same 4,096-token sentencepiece BPE
(``bench_data.py``'s):

- datatrove 0.10.1 (installed into its own virtual environment under ``--work``: it is not a dependency of cpt):
  ``LocalPipelineExecutor([JsonlReader, DocumentTokenizer(shuffle_documents=False)], tasks=--files, workers=W)``,
  one task per file, W = 1 and 2 processes;
- cpt: ``cpt prepare --workers W`` with ``data.task_mb`` = one file per task, W = 1 and 2.

Then for each: the same run killed with SIGKILL (the whole process group, as slurm's ``scancel`` does) halfway and
run again (is the output the uninterrupted one's?), and the output of a different task count (datatrove:
``tasks = files // 2``; cpt: ``--task I --tasks 3`` array parts, then assembly) compared with the first: does the
token stream depend on how the work was split?

Usage::

    .venv/bin/python scripts/bench_datatrove.py [--mb 100] [--files 10] [--work DIR] [--no-write]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmarks_md  # noqa: E402
from bench_data import texts, tokenizer_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## datatrove against cpt's task runner"
DATATROVE = "datatrove==0.10.1"

# Run in datatrove's environment: argv = corpus dir, output dir, tokenizer.json, eos token, tasks, workers.
DATATROVE_RUN = """
import sys, time
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.tokens import DocumentTokenizer
corpus, out, tokenizer, eos, tasks, workers = sys.argv[1:7]
start = time.perf_counter()
LocalPipelineExecutor([JsonlReader(corpus, glob_pattern="*.jsonl", doc_progress=False),
                       DocumentTokenizer(out + "/tokens", tokenizer, eos_token=eos, shuffle_documents=False)],
                      tasks=int(tasks), workers=int(workers), logging_dir=out + "/logs").run()
print(time.perf_counter() - start)
"""


def datatrove_python(work: Path) -> Path:
    venv = work / "datatrove-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        import tokenizers

        subprocess.run([str(python), "-m", "pip", "install", "-q", DATATROVE, f"tokenizers=={tokenizers.__version__}",
                        f"numpy=={np.__version__}", "orjson"], check=True)
    return python


def write_corpus(work: Path, megabytes: int, files: int) -> Path:
    corpus = work / f"corpus-{megabytes}mb-{files}"
    if (corpus / "done").is_file():
        return corpus
    corpus.mkdir(parents=True, exist_ok=True)
    per_file = megabytes * 1_000_000 // files
    outs = [open(corpus / f"part-{i:03d}.jsonl", "w") for i in range(files)]
    size, i = 0, 0
    for doc in texts(megabytes * 1_000_000):
        line = json.dumps({"text": doc}) + "\n"
        outs[min(size // per_file, files - 1)].write(line)
        size += len(line)
        i += 1
    for f in outs:
        f.close()
    (corpus / "done").write_text("")
    return corpus


def datatrove_stream(out: Path) -> bytes:
    """datatrove's tokens in the order a reader of its output gets them: its files by name (one per task)."""
    return b"".join(p.read_bytes() for p in sorted((out / "tokens").glob("*.ds")))


def cpt_stream(data_dir: Path) -> bytes:
    """cpt's token stream: the train split then the val split, as the sampler reads them."""
    from cpt.data.shards import TokenShard

    [corpus] = data_dir.glob("c-*")
    shard = TokenShard.open(corpus)
    return np.asarray(shard.train.tokens).tobytes() + np.asarray(shard.val.tokens).tobytes()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def timed(command: list[str], kill_after: float | None = None) -> float:
    """Run ``command`` in its own process group; with ``kill_after``, SIGKILL the group after that many seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return time.perf_counter() - start
    assert proc.returncode == 0, err[-3000:]
    return time.perf_counter() - start


def run_datatrove(python: Path, corpus: Path, out: Path, tok: Path, eos: str, tasks: int, workers: int,
                  kill_after: float | None = None) -> float:
    return timed([str(python), "-c", DATATROVE_RUN, str(corpus), str(out), str(tok / "tokenizer.json"), eos,
                  str(tasks), str(workers)], kill_after)


def cpt_recipe(work: Path, corpus: Path, tok: Path, task_mb: float) -> Path:
    recipe = work / "dt-compare.yaml"
    recipe.write_text(json.dumps({
        "name": "compare", "model": {"init": "scratch", "arch": {"layers": 2, "hidden": 32, "heads": 2}},
        "tokenizer": {"path": str(tok)},
        "corpora": {"c": {"source": str(corpus / "*.jsonl"), "val_fraction": 0.001, "val_max_docs": 200}},
        "eval": {"sets": {"upstream": "c"}}, "stages": [{"name": "s", "steps": 1, "mixture": {"c": 1.0}}],
        "run": {"dir": str(work / "dt-run")}, "data": {"task_mb": task_mb}}))
    return recipe


def run_cpt(recipe: Path, data_dir: Path, workers: int, kill_after: float | None = None,
            part: tuple[int, int] | None = None) -> float:
    extra = ["--task", str(part[0]), "--tasks", str(part[1])] if part else []
    return timed([sys.executable, "-m", "cpt", "prepare", str(recipe), f"run.data_dir={data_dir}",
                  "--workers", str(workers), *extra], kill_after)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cpt-bench-datatrove"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["rm", "-rf", *map(str, work.glob("out-*"))], check=True)
    python = datatrove_python(work)
    tok = tokenizer_dir(work)
    from cpt.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tok)
    corpus = write_corpus(work, args.mb, args.files)
    tokens = sum(len(ids) + 1 for ids in tokenizer(
        [json.loads(line)["text"] for f in sorted(corpus.glob("*.jsonl")) for line in open(f)],
        add_special_tokens=False, split_special_tokens=True)["input_ids"])
    task_mb = args.mb / args.files + 0.01  # one file per task
    recipe = cpt_recipe(work, corpus, tok, task_mb)
    rows, checks = {}, {}
    for workers in (1, 2):
        rows[f"datatrove, {workers} worker(s)"] = run_datatrove(python, corpus, work / f"out-dt-{workers}", tok,
                                                                tokenizer.eos_token, args.files, workers)
        rows[f"cpt prepare, {workers} worker(s)"] = run_cpt(recipe, work / f"out-cpt-{workers}", workers)
    dt, cpt = datatrove_stream(work / "out-dt-2"), cpt_stream(work / "out-cpt-2")
    checks["tokens written (datatrove, cpt)"] = (
        len(dt) // 2, len(cpt) // 2)
    # Killed halfway (the whole process group) and run again.
    half = rows["datatrove, 2 worker(s)"] / 2
    run_datatrove(python, corpus, work / "out-dt-kill", tok, tokenizer.eos_token, args.files, 2, kill_after=half)
    done = len(list((work / "out-dt-kill" / "logs" / "completions").glob("*")))
    rerun = run_datatrove(python, corpus, work / "out-dt-kill", tok, tokenizer.eos_token, args.files, 2)
    checks["datatrove: killed halfway, run again"] = {
        "tasks done at the kill": done, "rerun_s": round(rerun, 1),
        "same as uninterrupted": datatrove_stream(work / "out-dt-kill") == dt}
    half = rows["cpt prepare, 2 worker(s)"] / 2
    run_cpt(recipe, work / "out-cpt-kill", 2, kill_after=half)
    partial = next((work / "out-cpt-kill").glob(".c-*.partial"), None)
    done = len(list((partial / "shards").glob("*.docs.npz"))) if partial else 0
    rerun = run_cpt(recipe, work / "out-cpt-kill", 2)
    checks["cpt: killed halfway, run again"] = {
        "tasks done at the kill": done, "rerun_s": round(rerun, 1),
        "same as uninterrupted": cpt_stream(work / "out-cpt-kill") == cpt}
    # Another way of splitting the work.
    run_datatrove(python, corpus, work / "out-dt-half", tok, tokenizer.eos_token, args.files // 2, 2)
    checks[f"datatrove: tasks={args.files // 2} instead of {args.files}, same token stream"] = (
        datatrove_stream(work / "out-dt-half") == dt)
    for i in range(3):
        run_cpt(recipe, work / "out-cpt-parts", 1, part=(i, 3))
    run_cpt(recipe, work / "out-cpt-parts", 1)
    checks["cpt: 3 array parts then assembly, same token stream"] = cpt_stream(work / "out-cpt-parts") == cpt
    result = {"megabytes": args.mb, "files": args.files, "tokens": tokens, "wall_s": rows,
              "tokens_per_s": {k: tokens / v for k, v in rows.items()}, "checks": checks,
              "streams": {"datatrove": digest(dt), "cpt": digest(cpt)}}
    print(json.dumps(result, indent=1))
    if args.no_write:
        return
    where = ", ".join(f"{k} {v}" for k, v in benchmarks_md.machine().items())
    table = "\n".join(f"| {k} | {v:.1f} | {tokens / v:,.0f} |" for k, v in rows.items())
    dk, ck = checks["datatrove: killed halfway, run again"], checks["cpt: killed halfway, run again"]
    split_dt = checks[f"datatrove: tasks={args.files // 2} instead of {args.files}, same token stream"]
    written = checks["tokens written (datatrove, cpt)"]
    body = f"""`scripts/bench_datatrove.py --mb {args.mb} --files {args.files}` ({where}; {DATATROVE} in its own
environment; {benchmarks_md.code_version("cpt")}). {args.mb} MB of KJV + stdlib text in {args.files} JSONL files,
{tokens:,} tokens with the 4,096-token BPE, one task per file in both; wall time includes start-up.

| | wall s | tokens/s |
|---|---|---|
{table}

Killed with SIGKILL (process group) halfway and run again: datatrove had {dk['tasks done at the kill']} of
{args.files} tasks marked complete and took {dk['rerun_s']} s more, output identical: **{dk['same as uninterrupted']}**;
cpt had {ck['tasks done at the kill']} shards done and took {ck['rerun_s']} s more, identical:
**{ck['same as uninterrupted']}**. Split differently: datatrove with {args.files // 2} tasks gives the same token stream
as with {args.files}: **{split_dt}**; cpt as 3 slurm-array parts then assembly:
**{checks['cpt: 3 array parts then assembly, same token stream']}**. Tokens written: datatrove {written[0]:,}, cpt
{written[1]:,} (datatrove turns text that spells a special token into that token).
"""
    benchmarks_md.write_section(ROOT / "BENCHMARKS.md", HEADING, body)


if __name__ == "__main__":
    main()
