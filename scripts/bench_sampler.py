"""Benchmark the mixture sampler + loader against the training loop and `datasets.interleave_datasets`.

What is measured, on synthetic token shards (random uint16 ids, one ``.bin`` memmap per source, written to a
temporary directory and opened with ``np.memmap`` like ``TokenShard.open`` does):

- **Sampler throughput**: the full ``MixtureSampler.next_batch`` path (source assignment + per-source
  permutation + ``PackedSequences.gather``) for 1, 4 and 16 sources with Dirichlet weights and 2 sources at
  0.95/0.05, at the demo recipe's shape (global batch 8 x seq 256) and one larger row (512 x 2048).
  Tokens/s counts ``seq_len`` target tokens per sequence, as the trainer does. Median of repeats, each from a
  fresh ``SamplerState``.
- **`interleave_datasets` throughput**: the same mixture as one ``IterableDataset.from_generator`` per source,
  each yielding the same packed windows from the same memmaps in the sampler's seeded epoch-0 order,
  interleaved with ``probabilities`` = the weights, the same seed and ``stopping_strategy="all_exhausted"``
  (an exhausted source restarts in the same order, where the sampler moves on to a new epoch permutation); rows
  are stacked into the same ``[batch, seq_len + 1]`` int64 array the sampler returns. Other ways of feeding it
  (``Features`` declared; the windows copied into an Arrow ``Dataset.from_dict(...).to_iterable_dataset()``,
  with and without ``with_format("numpy")``) are timed on the 4-source row, and the "faster than" verdict
  compares against the fastest way measured for each row.
- **Training loop consumption**: real steps of the demo model (``cpt.model.build_model``: Llama, 4 layers,
  hidden 128, heads 4, vocab 4096) with ``cpt.optim.build_optimizer`` and ``cpt.trainer.train_step`` on
  Accelerate (CPU, fp32 as ``mixed_precision: auto`` resolves there), micro-batch 8 x seq 256, each step timed
  like the trainer's ``tokens_per_s``: drawing the batch + the step.
- **Proportion error**: ``|count - weight x window|`` in sequences, the maximum over sources and over *every*
  window start position of a long stream of source choices, for windows of 100 and 10,000 sequences. For
  ``interleave_datasets`` the long stream is drawn with label-only generators of the same lengths (its source
  choice depends only on the seed and probabilities, not on example contents); the script checks that its
  prefix equals the sources of the timed run.

Usage::

    .venv/bin/python scripts/bench_sampler.py            # full run (~2-4 min on 2 cores); rewrites the
                                                         # "Data sampler throughput" section of BENCHMARKS.md
    .venv/bin/python scripts/bench_sampler.py --quick    # short run; prints only
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from cpt.data.loader import PackedSequences
from cpt.data.mixing import MixtureSampler, MixtureSchedule, SamplerState, seed_int
from cpt.data.shards import token_dtype
import benchmarks_md
from benchmarks_md import write_section

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Data sampler throughput"
VOCAB = 4096
SEED = 0
WINDOWS = (100, 10_000)
TRAIN_FACTOR = 100  # target: the sampler feeds at least this many training loops


@dataclass
class Case:
    """One row: a mixture (one source per weight) read at ``batch x seq_len``."""

    label: str
    weights: np.ndarray
    batch: int
    seq_len: int
    batches: int  # timed batches per repeat (sampler)
    interleave_batches: int  # timed batches per repeat (interleave_datasets)
    errors: bool = True  # measure window proportion errors for this row


def write_sources(directory: Path, num_sources: int, total_tokens: int) -> list[np.memmap]:
    """``total_tokens`` random token ids split evenly over ``num_sources`` memmapped ``.bin`` files."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed_int(SEED, "shards", num_sources))
    dtype = token_dtype(VOCAB)
    out = []
    for k in range(num_sources):
        path = directory / f"source{k:02d}.bin"
        rng.integers(0, VOCAB, total_tokens // num_sources, dtype=dtype).tofile(path)
        out.append(np.memmap(path, dtype=dtype, mode="r"))
    return out


def names_of(weights: np.ndarray) -> list[str]:
    return [f"source{k:02d}" for k in range(len(weights))]


def make_sampler(tokens: list[np.ndarray], weights: np.ndarray, seq_len: int, batch: int) -> MixtureSampler:
    names = names_of(weights)
    sources = {n: PackedSequences(t, seq_len, n) for n, t in zip(names, tokens)}
    schedule = MixtureSchedule.constant({n: float(w) for n, w in zip(names, weights)})
    return MixtureSampler(sources, schedule, SEED, SamplerState(), batch)


def time_sampler(tokens: list[np.ndarray], case: Case) -> tuple[float, float]:
    """Tokens/s of ``next_batch`` from a fresh state, and the share of its time that ``assign`` alone takes."""
    sampler = make_sampler(tokens, case.weights, case.seq_len, case.batch)
    sampler.next_batch(case.batch)  # warm-up: imports, first pages; rare sources still draw their first time
    start = time.perf_counter()
    for _ in range(case.batches):
        sampler.next_batch(case.batch)
    total = time.perf_counter() - start
    sampler = make_sampler(tokens, case.weights, case.seq_len, case.batch)
    sampler.assign(case.batch)
    start = time.perf_counter()
    for _ in range(case.batches):
        sampler.assign(case.batch)
    return case.batches * case.batch * case.seq_len / total, (time.perf_counter() - start) / total


def sampler_choices(tokens: list[np.ndarray], case: Case, count: int) -> np.ndarray:
    """Source index of the first ``count`` stage positions, drawn batch by batch as training does."""
    sampler = make_sampler(tokens, case.weights, case.seq_len, case.batch)
    index = {n: k for k, n in enumerate(sampler.schedule.names)}
    picks: list[str] = []
    while len(picks) < count:
        picks += sampler.assign(case.batch)
    return np.array([index[p] for p in picks[:count]])


def window_generator(tokens: np.ndarray, seq_len: int, name: str, source: int):
    """One epoch of a source's packed windows, in the sampler's seeded permutation for epoch 0."""
    packed = PackedSequences(tokens, seq_len, name)
    for i in np.random.default_rng(seed_int(SEED, name, 0)).permutation(len(packed)):
        yield {"input_ids": packed[int(i)], "source": source}


def label_generator(length: int, source: int):
    for _ in range(length):
        yield {"source": source}


def interleaved(parts: list, weights: np.ndarray):
    import datasets

    return datasets.interleave_datasets(parts, probabilities=[float(w) for w in weights], seed=SEED,
                                        stopping_strategy="all_exhausted")


def from_generators(generators: list, features=None) -> list:
    import datasets

    return [datasets.IterableDataset.from_generator(g, gen_kwargs=kw, features=features) for g, kw in generators]


def window_sources(tokens: list[np.ndarray], case: Case, variant: str = "generator") -> list:
    """One iterable dataset per source, yielding the sampler's windows in its epoch-0 order.

    Variants: ``generator`` (``from_generator``, nothing declared), ``features`` (the same with ``Features``
    declared), ``arrow`` (the windows copied into an Arrow table, ``to_iterable_dataset()``; the copy is not
    timed).
    """
    import datasets

    names = names_of(case.weights)
    if variant == "arrow":
        parts = []
        for k, (name, t) in enumerate(zip(names, tokens)):
            packed = PackedSequences(t, case.seq_len, name)
            order = np.random.default_rng(seed_int(SEED, name, 0)).permutation(len(packed))
            table = {"input_ids": packed.gather(order).astype(t.dtype), "source": np.full(len(order), k)}
            parts.append(datasets.Dataset.from_dict(table).to_iterable_dataset())
        return parts
    features = None
    if variant == "features":
        features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value(tokens[0].dtype.name)),
                                      "source": datasets.Value("int64")})
    generators = [(window_generator, {"tokens": t, "seq_len": case.seq_len, "name": n, "source": k})
                  for k, (n, t) in enumerate(zip(names, tokens))]
    return from_generators(generators, features)


def time_interleave(tokens: list[np.ndarray], case: Case, variant: str = "generator",
                    numpy_format: bool = False) -> tuple[float, np.ndarray]:
    """Tokens/s of batches ``[batch, seq_len + 1]`` (int64) from a fresh ``interleave_datasets``, and the source
    of every timed row.

    Args:
        variant: how each source is built (see ``window_sources``).
        numpy_format: batch with ``with_format("numpy").iter(batch_size)`` instead of stacking the rows.
    """
    mixture = interleaved(window_sources(tokens, case, variant), case.weights)
    taken = []
    if numpy_format:
        batches = mixture.with_format("numpy").iter(batch_size=case.batch)
        start = time.perf_counter()
        for _ in range(case.interleave_batches):
            examples = next(batches)
            batch = np.asarray(examples["input_ids"], dtype=np.int64)
            taken += list(examples["source"])
    else:
        rows = iter(mixture)
        start = time.perf_counter()
        for _ in range(case.interleave_batches):
            examples = list(islice(rows, case.batch))
            batch = np.asarray([e["input_ids"] for e in examples], dtype=np.int64)
            taken += [e["source"] for e in examples]
    elapsed = time.perf_counter() - start
    assert batch.shape == (case.batch, case.seq_len + 1)
    return case.interleave_batches * case.batch * case.seq_len / elapsed, np.array(taken)


def interleave_choices(tokens: list[np.ndarray], case: Case, count: int, timed: np.ndarray) -> np.ndarray:
    """Source index of the first ``count`` rows of the same interleave, drawn with label-only generators."""
    lengths = [(len(t) - 1) // case.seq_len for t in tokens]
    parts = from_generators([(label_generator, {"length": n, "source": k}) for k, n in enumerate(lengths)])
    choices = np.array([e["source"] for e in islice(iter(interleaved(parts, case.weights)), count)])
    if not np.array_equal(choices[:len(timed)], timed[:len(choices)]):
        raise RuntimeError("label-only interleave chose different sources than the timed run")
    return choices


def max_window_error(choices: np.ndarray, weights: np.ndarray, window: int) -> float:
    """max over sources and every window start of ``|count - weight * window|`` (in sequences)."""
    onehot = choices[None, :] == np.arange(len(weights))[:, None]
    cumulative = np.concatenate([np.zeros((len(weights), 1), np.int64), np.cumsum(onehot, axis=1)], axis=1)
    counts = cumulative[:, window:] - cumulative[:, :-window]
    return float(np.abs(counts - weights[:, None] * window).max())


class _Vocab:
    """The three things ``build_model`` reads from a tokenizer."""

    bos_token_id, eos_token_id = 1, 2

    def __len__(self) -> int:
        return VOCAB


def time_training(tokens: list[np.ndarray], steps: int, warmup: int) -> tuple[float, float]:
    """Tokens/s of the demo model's training steps (batch draw + step, as the trainer times them): at the median
    step and at the fastest step (the least disturbed by other jobs on the machine)."""
    import torch
    from accelerate import Accelerator

    from cpt.data.mixing import rank_rows
    from cpt.model import ArchConfig, ModelConfig, build_model
    from cpt.recipe import TrainConfig
    from cpt.optim import build_optimizer
    from cpt.trainer import train_step

    torch.manual_seed(SEED)
    train = TrainConfig(seq_len=256, micro_batch=8, grad_accum=1, mixed_precision="no")
    accelerator = Accelerator(mixed_precision="no", cpu=True)
    model = build_model(ModelConfig(init="scratch", arch=ArchConfig(layers=4, hidden=128, heads=4)), _Vocab(),
                        train.seq_len, ROOT)
    model = accelerator.prepare(model)
    optimizer = accelerator.prepare(build_optimizer(model, train, 3e-3))
    sampler = make_sampler(tokens, np.array([0.95, 0.05]), train.seq_len, train.micro_batch)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        rows, _, _ = sampler.next_batch(train.micro_batch)
        micro_batches = [torch.from_numpy(s) for s in rank_rows(rows, train.grad_accum, 1, 0)]
        train_step(model, optimizer, micro_batches, accelerator, train.grad_clip)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    tokens_per_step = train.micro_batch * train.seq_len
    return tokens_per_step / statistics.median(times), tokens_per_step / min(times)


def machine() -> dict[str, str]:
    import datasets
    import torch

    return benchmarks_md.machine(torch=torch.__version__, numpy=np.__version__, datasets=datasets.__version__,
                                 threads=str(torch.get_num_threads()))


def code_version() -> str:
    """The commit, and a hash of the measured modules as imported, so a table names the code it measured."""
    import cpt.data.loader
    import cpt.data.mixing

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "cpt/data/mixing.py", "cpt/data/loader.py"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", ""
    digest = hashlib.sha256()
    for module in (cpt.data.mixing, cpt.data.loader):
        digest.update(Path(module.__file__).read_bytes())
    return f"commit {commit}{' + uncommitted changes' if dirty else ''}, mixing.py + loader.py sha256 " \
           f"{digest.hexdigest()[:12]}"


def rate(x: float) -> str:
    return f"{x / 1e6:.2f} M" if x >= 1e6 else f"{x / 1e3:.1f} k"


def describe_weights(weights: np.ndarray) -> str:
    if len(weights) <= 2:
        return "/".join(f"{w:g}" for w in weights)
    return f"Dirichlet(1), min {weights.min():.2g}, max {weights.max():.2g}"


VARIANTS = {"generator, `Features` declared": ("features", False),
            "Arrow table, `.to_iterable_dataset()`": ("arrow", False),
            "Arrow table, `with_format(\"numpy\").iter(batch_size)`": ("arrow", True)}
USED = "generator, no `Features` (used in the table above)"


def run(quick: bool) -> str:
    """Run every measurement; return the markdown section body."""
    code = code_version()  # before measuring: others may edit the tree while this runs
    load_start = os.getloadavg()
    scale = 0.15 if quick else 1.0
    repeats = 3
    total_tokens = 4_000_000 if quick else 16_000_000
    positions = 20_000 if quick else 100_000
    dirichlet = {k: np.random.default_rng(SEED).dirichlet(np.ones(k)) for k in (4, 16)}
    demo = dict(batch=8, seq_len=256, batches=int(2000 * scale), interleave_batches=int(500 * scale))
    cases = [
        Case("1 source", np.array([1.0]), **demo),
        Case("4 sources", dirichlet[4], **demo),
        Case("16 sources", dirichlet[16], **demo),
        Case("2 sources, skewed", np.array([0.95, 0.05]), **demo),
        Case("16 sources", dirichlet[16], 512, 2048, max(int(20 * scale), 3), max(int(4 * scale), 1), errors=False),
    ]
    variant_case = cases[1]  # other ways to feed interleave_datasets, timed on the 4-source demo-shape row
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-sampler-") as tmp:
        shards = {k: write_sources(Path(tmp) / f"k{k}", k, total_tokens) for k in (1, 2, 4, 16)}
        log(f"wrote {total_tokens:,} tokens per mixture as uint16 memmaps in {tmp}")
        train = time_training(shards[2], steps=5 if quick else 20, warmup=2 if quick else 3)
        log(f"training loop: {rate(train[0])} tokens/s at the median step, {rate(train[1])} at the fastest")
        for case in cases:
            tokens = shards[len(case.weights)]
            runs: dict[str, list] = {"sampler": [], "assign": [], "interleave": []}
            if case is variant_case:
                runs.update({label: [] for label in VARIANTS})
            # Repeats alternate the methods, so a burst of load from other jobs hits them alike.
            for _ in range(repeats):
                sampler_rate, assign_share = time_sampler(tokens, case)
                interleave_rate, timed = time_interleave(tokens, case)
                runs["sampler"].append(sampler_rate)
                runs["assign"].append(assign_share)
                runs["interleave"].append(interleave_rate)
                if case is variant_case:
                    for label, (variant, numpy_format) in VARIANTS.items():
                        runs[label].append(time_interleave(tokens, case, variant, numpy_format)[0])
            row = {"case": case, **{k: statistics.median(v) for k, v in runs.items()}}
            row["best_interleave"] = max([row["interleave"], *(row[label] for label in VARIANTS if label in row)])
            if case.errors:
                ours = sampler_choices(tokens, case, positions)
                theirs = interleave_choices(tokens, case, positions, timed)
                for window in WINDOWS:
                    row[("sampler", window)] = max_window_error(ours, case.weights, window)
                    row[("interleave", window)] = max_window_error(theirs, case.weights, window)
                row["positions"] = len(theirs)
            results.append(row)
            log(f"{case.label} {case.batch}x{case.seq_len}: sampler {rate(row['sampler'])} tokens/s, "
                f"interleave {rate(row['interleave'])} tokens/s")
    if code_version().split("sha256 ")[1] != code.split("sha256 ")[1]:
        raise RuntimeError(f"the sampler's code changed during the run ({code} -> {code_version()}); run again")
    return format_section(results, variant_case, train, positions, total_tokens, quick, code, load_start)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def format_section(results: list[dict], variant_case: Case, train: tuple[float, float], positions: int,
                   total_tokens: int, quick: bool, code: str, load_start: tuple[float, ...]) -> str:
    info = machine()
    command = "python scripts/bench_sampler.py" + (" --quick" if quick else "")
    load = [" / ".join(f"{x:.2f}" for x in values) for values in (load_start, os.getloadavg())]
    train_median, train_best = train
    lines = [
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}). Machine: {info['nproc']} CPUs ({info['cpu']}), torch "
        f"{info['torch']} ({info['threads']} threads), numpy {info['numpy']}, datasets {info['datasets']}, Python "
        f"{info['python']}. Code: {code}. Load average (1/5/15 min) {load[0]} at the start of the run and "
        f"{load[1]} at the end: other jobs shared this machine, so absolute numbers are noisy. Each figure is "
        "the median of 3 repeats, and the repeats of the "
        "sampler and of `interleave_datasets` alternate so that load hits both alike.",
        "",
        f"Data: {total_tokens:,} random uint16 token ids per mixture, split evenly over the sources, one `.bin` "
        "memmap per source (freshly written, so reads hit the page cache, not the disk). Weights: Dirichlet(1) "
        f"with seed {SEED}, and 0.95/0.05 for the skewed pair. Tokens/s counts `seq_len` target tokens per "
        "sequence, as the trainer does. At 512 x 2048 the sources hold few windows, so every repeat runs "
        "through several epochs of each (a new permutation per epoch for the sampler).",
        "",
        f"Training loop (demo model: 4 layers, hidden 128, 4 heads, vocab {VOCAB}; micro-batch 8 x seq 256, fp32; "
        "batch draw + `train_step`, as the trainer times a step): "
        f"**{rate(train_median)} tokens/s** at the median step, {rate(train_best)} at the fastest. The ratio "
        "below uses the fastest step, the least flattering one for the sampler.",
        "",
        "| mixture | batch x seq | sampler tokens/s | share in `assign` | `interleave_datasets` tokens/s "
        "| sampler / interleave | sampler / training loop |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        c = r["case"]
        versus_train = f"{r['sampler'] / train_best:,.0f}x" if (c.batch, c.seq_len) == (8, 256) else "n/a"
        lines.append(f"| {c.label}: {describe_weights(c.weights)} | {c.batch} x {c.seq_len} | {rate(r['sampler'])} "
                     f"| {r['assign']:.0%} | {rate(r['interleave'])} | {r['sampler'] / r['interleave']:.1f}x "
                     f"| {versus_train} |")
    row = next(r for r in results if r["case"] is variant_case)
    lines += ["", f"`interleave_datasets` fed other ways ({variant_case.label}, {variant_case.batch} x "
              f"{variant_case.seq_len}; the Arrow tables are built from the same windows before timing):", "",
              "| variant | tokens/s | sampler / variant |", "|---|---:|---:|"]
    for label in [USED, *VARIANTS]:
        value = row["interleave" if label == USED else label]
        lines.append(f"| {label} | {rate(value)} | {row['sampler'] / value:.1f}x |")
    lines += [
        "",
        "Largest proportion error `|count - weight x window|` in sequences, max over sources and over every window "
        f"start position of the first {positions:,} positions (batch 8):",
        "",
        "| mixture | sampler, window 100 | sampler, window 10,000 | `interleave_datasets`, window 100 "
        "| `interleave_datasets`, window 10,000 |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        if r["case"].errors:
            c = r["case"]
            lines.append(f"| {c.label} | {r[('sampler', 100)]:.2f} | {r[('sampler', 10_000)]:.2f} "
                         f"| {r[('interleave', 100)]:.2f} | {r[('interleave', 10_000)]:.2f} |")
    for r in results:
        if r["case"].errors and r["positions"] < positions:
            lines += ["", f"({r['case'].label}: `interleave_datasets` stops after {r['positions']:,} positions, "
                          "when every source has been exhausted.)"]
    lines += ["", "Targets:", ""] + verdicts(results, train_best)
    return "\n".join(lines) + "\n"


def verdicts(results: list[dict], train_rate: float) -> list[str]:
    """One line per target of the issue, met or missed, from the measured numbers."""
    demo = [r for r in results if (r["case"].batch, r["case"].seq_len) == (8, 256)]
    slowest = min(demo, key=lambda r: r["sampler"])
    factor = slowest["sampler"] / train_rate
    closest = min(results, key=lambda r: r["sampler"] / r["best_interleave"])
    margin = closest["sampler"] / closest["best_interleave"]
    errors = [r for r in results if r["case"].errors]
    small = max(r[("sampler", 100)] for r in errors)
    large = max(r[("sampler", 10_000)] for r in errors)
    where = f"{closest['case'].label} at {closest['case'].batch} x {closest['case'].seq_len}"
    return [
        f"- At least {TRAIN_FACTOR}x the training loop's consumption: "
        + ("**met**" if factor >= TRAIN_FACTOR else "**missed**")
        + f"; the slowest demo-shape mixture ({slowest['case'].label}) gives {factor:,.0f}x. It would be missed "
          f"only by a training loop faster than {rate(slowest['sampler'] / TRAIN_FACTOR)} tokens/s.",
        "- Faster than `interleave_datasets` (against the fastest way of feeding it measured for each row): "
        + ("**met** on every row" if margin > 1 else "**missed**")
        + f"; the smallest margin is {margin:.1f}x ({where}).",
        "- Window error bounded by a constant: "
        + ("**met**" if large <= max(small, 2.0) else "**missed**")
        + f"; the sampler's largest error is {small:.2f} sequences over windows of 100 and {large:.2f} over windows "
          "of 10,000, while `interleave_datasets` draws each source at random, so its error grows with the window "
          "(roughly as its square root).",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (less data, fewer batches); prints only")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="file to write the section into")
    parser.add_argument("--no-write", action="store_true", help="print the table without writing it")
    args = parser.parse_args()
    started = time.time()
    body = run(args.quick)
    print(f"{HEADING}\n\n{body}")
    log(f"({time.time() - started:.0f} s)")
    if not args.quick and not args.no_write:
        write_section(args.out, HEADING, body)
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
