"""Do cpt's corpus readers stream with constant memory? (issue 17, "inputs users have")

For each input format (JSONL, JSONL.zst, Parquet as pyarrow writes it, Parquet as HF ``datasets`` writes it, and a
saved HF dataset) and two sizes of the same text (``--sizes``, MB), a fresh process reads every document with
``cpt.data.sources.iter_documents`` and records its anonymous resident memory (``RssAnon``: the heap, not the pages
of memory-mapped files, which the kernel can drop at any time) every 500 documents, and at the end its peak RSS
(``VmHWM``, mapped file pages included). Memory that does not grow from the small to the large size is constant.

Usage::

    .venv/bin/python scripts/bench_streaming.py [--sizes 50 500] [--work DIR] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmarks_md  # noqa: E402
from bench_data import texts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Streaming readers' memory"
FORMATS = ("jsonl", "jsonl.zst", "parquet (pyarrow)", "parquet (datasets)", "hf dataset")

# argv: source, format; prints documents, peak RssAnon MiB, VmHWM MiB, RssAnon MiB after the imports.
READ = """
import json, sys
from cpt.data.sources import CorpusConfig, iter_documents

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

import datasets, pyarrow.parquet, zstandard  # imported before the baseline: their code is not the corpus
base = status("RssAnon")
peak, n = base, 0
for n, doc in enumerate(iter_documents(CorpusConfig(source=sys.argv[1], format=sys.argv[2])), 1):
    if n % 500 == 0:
        peak = max(peak, status("RssAnon"))
print(json.dumps({"documents": n, "anon_peak": max(peak, status("RssAnon")), "hwm": status("VmHWM"), "base": base}))
"""


def make(work: Path, fmt: str, megabytes: int) -> tuple[str, str]:
    """The corpus of ``megabytes`` MB of text in ``fmt``: (source, format option)."""
    name = work / f"{fmt.replace(' ', '_').replace('(', '').replace(')', '')}-{megabytes}"
    docs = lambda: texts(megabytes * 1_000_000)  # noqa: E731
    if fmt == "hf dataset":
        if not (name / "dataset_info.json").is_file():
            import datasets

            ds = datasets.Dataset.from_generator(lambda: ({"text": d} for d in docs()), cache_dir=str(work / "cache"))
            ds.save_to_disk(str(name))
        return str(name), "hf"
    path = name.with_name(name.name + {"jsonl": ".jsonl", "jsonl.zst": ".jsonl.zst"}.get(fmt, ".parquet"))
    if path.is_file():
        return str(path), "auto"
    tmp = path.with_name(path.name + ".tmp")
    if fmt.startswith("jsonl"):
        import zstandard

        with open(tmp, "wb") as raw:
            out = zstandard.ZstdCompressor().stream_writer(raw) if fmt.endswith("zst") else raw
            for d in docs():
                out.write((json.dumps({"text": d}) + "\n").encode())
            out.close() if out is not raw else None
    elif fmt == "parquet (pyarrow)":  # row groups of 1,000 documents
        import pyarrow as pa
        import pyarrow.parquet as pq

        with pq.ParquetWriter(tmp, pa.schema([("text", pa.string())])) as writer:
            batch: list[str] = []
            for d in docs():
                batch.append(d)
                if len(batch) == 1_000:
                    writer.write_table(pa.table({"text": batch}))
                    batch = []
            writer.write_table(pa.table({"text": batch}))
    else:
        import datasets

        ds = datasets.Dataset.from_generator(lambda: ({"text": d} for d in docs()), cache_dir=str(work / "cache"))
        ds.to_parquet(str(tmp))
    tmp.rename(path)
    return str(path), "auto"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[50, 500])
    parser.add_argument("--work", type=Path, default=Path("/tmp/cpt-bench-streaming"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = {}
    for fmt in FORMATS:
        for size in args.sizes:
            source, option = make(args.work, fmt, size)
            out = subprocess.run([sys.executable, "-c", READ, source, option], capture_output=True, text=True)
            assert out.returncode == 0, out.stderr[-3000:]
            results[f"{fmt} {size}"] = json.loads(out.stdout)
            print(fmt, size, results[f"{fmt} {size}"], flush=True)
    if args.no_write:
        return
    small, large = args.sizes
    rows = []
    for fmt in FORMATS:
        a, b = results[f"{fmt} {small}"], results[f"{fmt} {large}"]
        rows.append(f"| {fmt} | {a['documents']:,} / {b['documents']:,} | {a['anon_peak'] - a['base']:.0f} / "
                    f"{b['anon_peak'] - b['base']:.0f} | {a['hwm']:.0f} / {b['hwm']:.0f} |")
    where = ", ".join(f"{k} {v}" for k, v in benchmarks_md.machine().items())
    body = f"""`scripts/bench_streaming.py --sizes {small} {large}` ({where}; {benchmarks_md.code_version("cpt")}).
Each format holds the same KJV + stdlib text, {small} MB and {large} MB of it; a fresh process reads every document
with `iter_documents`. Heap: the growth of anonymous resident memory (`RssAnon`) over the process after its imports,
at its peak; peak RSS (`VmHWM`) includes the pages of memory-mapped files (a saved HF dataset is an Arrow file
mapped whole), which the kernel reclaims under pressure.

| format | documents ({small} / {large} MB) | heap growth MiB ({small} / {large} MB) | peak RSS MiB ({small} / {large} MB) |
|---|---|---|---|
{chr(10).join(rows)}

"parquet (pyarrow)" is written in row groups of 1,000 documents (about 8 MB of text); "parquet (datasets)" by
`Dataset.to_parquet`, which makes row groups of about 100 MB (one for the {small} MB file). A Parquet reader holds one
row group's column at a time, so the heap it needs follows the file's largest row group, not the file's size.
"""
    benchmarks_md.write_section(ROOT / "BENCHMARKS.md", HEADING, body)


if __name__ == "__main__":
    main()
