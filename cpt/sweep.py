"""``cpt sweep SWEEP.yaml``: small runs over a grid of model sizes, CPT token budgets and domain ratios, the
raw material of a mixture-ratio law (D-CPT, CMR; ``cpt fit-law``).

A sweep file names a base recipe and the grid::

    name: sweep-demo
    base: demo.yaml              # relative to this file
    stage: cpt                   # the stage whose mixture is swept: the base recipe's last stage
    domain: code                 # the new-domain corpus; its share r is swept
    general: english             # the general corpus; its share is 1 - r
    ratios: [0.1, 0.3, 0.5, 0.7, 0.9]
    tokens: [153600]             # CPT tokens per run (the stage's steps follow from the batch); default: as is
    sizes:                       # name -> recipe overrides
      h64: {model.arch.hidden: 64, model.arch.layers: 2}
      h128: {model.arch.hidden: 128, model.arch.layers: 4}
    overrides: {eval.every: 10}  # for every run

For each size the stages before ``stage`` run once (``SWEEP_DIR/base/<size>``); each (size, tokens, ratio)
then branches from that run's final checkpoint and trains ``stage`` alone (``SWEEP_DIR/runs/<id>``). A base
recipe whose swept stage is its first stage (e.g. a pretrained model's CPT) has no base runs.

Every run is a separate ``cpt`` process (its log in ``SWEEP_DIR/logs/<id>.log``), so a failure stays in its
run. When one finishes, its rows go into ``SWEEP_DIR/results.csv``: one row per evaluation of the swept
stage (one run gives many D points, as the D-CPT paper uses them), with N (non-embedding and total
parameters), D (CPT tokens so far), r (the domain share) and the general (upstream) and domain (downstream)
eval losses. A failed run gets one ``status=failed`` row and is retried by the next ``cpt sweep``; finished
runs are skipped.

``cpt sweep SWEEP --point I`` runs grid point I alone and ``--base SIZE`` one base run: what the tasks of a slurm
job array run (``cpt sweep SWEEP --slurm``, see ``cpt.slurm``). Tasks that finish together update the results
table one at a time under a lock. A run stopped by SIGUSR1/SIGTERM (preemption) writes a checkpoint and leaves a
``logs/<id>.preempted`` marker; the next attempt at it resumes from the checkpoint instead of starting over.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from cpt import preemption
from cpt.config import build, check, field, suggest
from cpt.errors import CptError, RecipeError

log = logging.getLogger(__name__)

COLUMNS = ("run_id", "status", "size", "N", "N_total", "D", "r", "step", "general_loss", "domain_loss", "domain",
           "general_set", "domain_set")


@dataclass
class SweepConfig:
    name: str = field(doc="sweep name")
    base: str = field(doc="base recipe YAML, relative to the sweep file")
    stage: str = field(doc="the stage whose mixture is swept (the base recipe's last stage)")
    domain: str = field(doc="the domain corpus; its share r is swept")
    general: str = field(doc="the general corpus; its share is 1 - r")
    ratios: list[float] = field(doc="domain shares r to run, each in (0, 1]")
    sizes: dict[str, dict[str, Any]] = field(default_factory=lambda: {"base": {}},
                                             doc="size name -> recipe overrides (e.g. model.arch.hidden)")
    tokens: Optional[list[int]] = field(None, doc="CPT tokens per run (default: the stage's steps as they are)")
    overrides: dict[str, Any] = field(default_factory=dict, doc="recipe overrides for every run")
    general_set: Optional[str] = field(None, doc="eval set of the general loss (default: the upstream-tagged one)")
    domain_set: Optional[str] = field(None, doc="eval set of the domain loss (default: the downstream-tagged one)")
    dir: str = field("runs/{name}", doc="sweep directory, relative to the working directory")

    def __post_init__(self):
        check(len(self.ratios) > 0, "ratios", "list at least one domain ratio")
        for i, r in enumerate(self.ratios):
            check(0 < r <= 1, f"ratios[{i}]", f"a domain share must be in (0, 1], got {r}")
        check(len(set(self.ratios)) == len(self.ratios), "ratios", "ratios repeat")
        check(len(self.sizes) > 0, "sizes", "name at least one model size (an empty mapping {} for the base as is)")
        check(self.tokens is None or all(t > 0 for t in self.tokens), "tokens", "token budgets must be positive")
        check(self.domain != self.general, "general", "the general corpus must differ from the domain corpus")


@dataclass
class Job:
    """One run of the sweep: a command, its directory and what it stands for."""

    id: str
    run_dir: Path
    command: list[str]
    size: str = ""
    r: float | None = None


def overrides_list(mapping: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in mapping.items()]


class Sweep:
    def __init__(self, path: str | Path, workers: int = 1):
        path = Path(path)
        if not path.is_file():
            raise CptError(f"sweep file '{path}' does not exist; give a sweep YAML such as recipes/sweep-demo.yaml")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise RecipeError(f"sweep file '{path}' is not valid YAML: {getattr(e, 'problem', e)}") from None
        self.config = build(SweepConfig, raw, "sweep")
        self.base = (path.resolve().parent / self.config.base).resolve()
        self.dir = Path(self.config.dir.replace("{name}", self.config.name))
        self.results = self.dir / "results.csv"
        # Processes that tokenize a run's data, passed on to every run's command.
        self.workers = ["--workers", str(workers)] if workers > 1 else []
        self._check_recipes()

    def _recipe(self, size: str, extra: list[str] = ()):
        from cpt.recipe import load_recipe

        return load_recipe(self.base, [*self.common(size), *extra])[0]

    def common(self, size: str) -> list[str]:
        return [*overrides_list(self.config.overrides), *overrides_list(self.config.sizes[size]),
                f"run.data_dir={json.dumps(str((self.dir / 'data').resolve()))}"]

    def _check_recipes(self) -> None:
        """Every size's recipe validates, the swept stage is its last, and the corpora and eval sets exist,
        before anything runs."""
        c = self.config
        for size in c.sizes:
            recipe = self._recipe(size)
            names = [s.name for s in recipe.stages]
            if c.stage not in names:
                raise CptError(f"sweep.stage: the base recipe has no stage '{c.stage}'; its stages: {', '.join(names)}")
            if names[-1] != c.stage:
                raise CptError(f"sweep.stage: '{c.stage}' must be the base recipe's last stage (its stages: "
                               f"{', '.join(names)}); the runs end with the swept stage")
            for key in ("domain", "general"):
                if getattr(c, key) not in recipe.corpora:
                    raise CptError(f"sweep.{key}: '{getattr(c, key)}' is not a corpus of the base recipe "
                                   f"({', '.join(recipe.corpora)})")
            self.sets = self._eval_sets(recipe)
        self.index = [s.name for s in recipe.stages].index(c.stage)

    def _eval_sets(self, recipe) -> tuple[str, str]:
        resolved = recipe.eval.resolved
        chosen = []
        for key, tag in (("general_set", "upstream"), ("domain_set", "downstream")):
            name = getattr(self.config, key)
            if name is None:
                tagged = [n for n, s in resolved.items() if s.tag == tag]
                if len(tagged) != 1:
                    raise CptError(f"sweep.{key}: the base recipe has {len(tagged)} eval sets tagged {tag}; "
                                   f"name the one to use (sets: {', '.join(resolved) or 'none'})")
                name = tagged[0]
            elif name not in resolved:
                raise CptError(f"sweep.{key}: no eval set '{name}' in the base recipe ({', '.join(resolved)})")
            chosen.append(name)
        return chosen[0], chosen[1]

    def steps_for(self, size: str, tokens: int | None) -> int | None:
        if tokens is None:
            return None
        train = self._recipe(size).train
        per_step = train.micro_batch * train.grad_accum * train.seq_len
        if tokens < per_step:
            raise CptError(f"sweep.tokens: {tokens} is less than one step of {per_step} tokens")
        return tokens // per_step

    def run_id(self, size: str, tokens: int | None, r: float) -> str:
        return f"{size}-r{r:g}" + (f"-t{tokens}" if tokens is not None else "")

    def raw_stages(self, size: str) -> list[dict]:
        """The base recipe's stages as written (with this size's overrides applied), to pass on as YAML."""
        from cpt.config import apply_overrides

        raw = apply_overrides(yaml.safe_load(self.base.read_text()), self.common(size))
        return raw["stages"]

    def base_job(self, size: str) -> Job | None:
        if self.index == 0:
            return None
        run_dir = self.dir / "base" / size
        stages = self.raw_stages(size)[:self.index]
        return Job(f"base-{size}", run_dir, ["run", str(self.base), *self.common(size),
                                             f"stages={json.dumps(stages)}", f"run.dir={json.dumps(str(run_dir))}",
                                             "--overwrite", *self.workers], size)

    def cpt_job(self, size: str, tokens: int | None, r: float) -> Job:
        c = self.config
        job_id = self.run_id(size, tokens, r)
        run_dir = self.dir / "runs" / job_id
        stage = dict(self.raw_stages(size)[self.index])
        stage["mixture"] = {c.domain: r, c.general: round(1 - r, 12)} if r < 1 else {c.domain: 1.0}
        steps = self.steps_for(size, tokens)
        if steps is not None:
            stage["steps"] = steps
        stage.pop("start_from", None)
        extra = [f"stages={json.dumps([stage])}", f"run.dir={json.dumps(str(run_dir))}", f"name={job_id}"]
        if self.index == 0:
            command = ["run", str(self.base), *self.common(size), *extra, "--overwrite", *self.workers]
        else:
            command = ["branch", str(self.final_checkpoint(self.dir / "base" / size)), str(self.base),
                       *self.common(size), *extra, "--overwrite", *self.workers]
        return Job(job_id, run_dir, command, size, r)

    @staticmethod
    def final_checkpoint(run_dir: Path) -> Path:
        from cpt.checkpoint import list_checkpoints

        done = [path for meta, path in list_checkpoints(run_dir) if meta.get("stage_complete")]
        return done[-1] if done else run_dir / "checkpoints" / "(none yet)"

    def grid(self) -> list[tuple[str, int | None, float]]:
        c = self.config
        return [(size, tokens, r) for size in c.sizes for tokens in (c.tokens or [None]) for r in c.ratios]



def model_size(checkpoint: Path) -> tuple[int, int]:
    """(non-embedding, total) parameters of a checkpoint, read from its safetensors headers: non-embedding
    leaves out the token embedding and an untied output head (Kaplan et al.'s N)."""
    from safetensors import safe_open

    total = embedding = 0
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(file, "np") as f:
            for name in f.keys():
                n = 1
                for d in f.get_slice(name).get_shape():
                    n *= d
                total += n
                if "embed_tokens" in name or name.startswith("lm_head"):
                    embedding += n
    return total - embedding, total


def result_rows(sweep: Sweep, job: Job) -> list[dict]:
    """The results-table rows of a finished swept-stage run: one per evaluation of the stage."""
    from cpt.checkpoint import list_checkpoints

    general, domain = sweep.sets
    rows = [json.loads(line) for line in (job.run_dir / "metrics.jsonl").read_text().splitlines()]
    stage = [r for r in rows if r.get("stage") == sweep.config.stage]
    tokens_per_step = next(r for r in stage if r["kind"] == "train")["tokens"] / max(
        next(r for r in stage if r["kind"] == "train")["stage_step"], 1)
    evals: dict[int, dict] = {}
    for r in stage:
        if r["kind"] == "eval" and r["set"] in (general, domain):
            evals.setdefault(r["stage_step"], {})[r["set"]] = r["loss"]
    final = [path for meta, path in list_checkpoints(job.run_dir) if meta.get("stage_complete")][-1]
    n, n_total = model_size(final)
    return [{"run_id": job.id, "status": "ok", "size": job.size, "N": n, "N_total": n_total,
             "D": int(round(step * tokens_per_step)), "r": job.r, "step": step, "general_loss": losses[general],
             "domain_loss": losses[domain], "domain": sweep.config.domain, "general_set": general,
             "domain_set": domain}
            for step, losses in sorted(evals.items()) if general in losses and domain in losses]


def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``PATH.lock`` (fcntl.flock; the lock goes with the file's closing)."""
    with open(path.with_name(path.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def record(path: Path, run_id: str, rows: list[dict]) -> list[dict]:
    """Replace ``run_id``'s rows of the results table with ``rows``: read, modify and write under the table's lock,
    so that runs finishing at once (slurm array tasks) do not lose each other's rows. Returns the new table."""
    with locked(path):
        table = [row for row in read_results(path) if row["run_id"] != run_id] + rows
        write_results(path, table)
    return table


def write_results(path: Path, rows: list[dict]) -> None:
    """Rewrite the table atomically (a crash mid-write leaves the previous table)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in COLUMNS} for row in rows)
    tmp.replace(path)


def execute(job: Job, log_dir: Path) -> tuple[bool, str]:
    """Run one job's ``cpt`` command; returns (ok, the last error line of its log). A job that was preempted
    last time resumes from its newest checkpoint.

    Raises:
        Preempted: the run was stopped by SIGUSR1/SIGTERM (passed on to it) after writing a checkpoint.
    """
    from cpt.checkpoint import list_checkpoints

    log_dir.mkdir(parents=True, exist_ok=True)
    log_path, marker = log_dir / f"{job.id}.log", log_dir / f"{job.id}.preempted"
    resuming = marker.exists() and bool(list_checkpoints(job.run_dir))
    command = ["resume", str(job.run_dir)] if resuming else job.command
    with open(log_path, "a" if resuming else "w") as out:
        out.write("$ cpt " + " ".join(command) + "\n")
        out.flush()
        process = subprocess.Popen([sys.executable, "-m", "cpt", *command], stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        with preemption.forwarded_to(process):
            code = process.wait()
    if code == 130:  # the run's second Ctrl-C: stop the sweep too
        raise KeyboardInterrupt
    if code == preemption.EXIT_CODE:
        marker.touch()
        raise preemption.Preempted(f"{job.id} stopped after writing a checkpoint; the next attempt resumes it")
    marker.unlink(missing_ok=True)
    if code == 0:
        return True, ""
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("cpt: error")]
    return False, (errors or lines or [f"exit code {code}"])[-1][:300]


def base_done(sweep: Sweep, job: Job) -> bool:
    return (sweep.final_checkpoint(job.run_dir) / "meta.json").is_file()


def run_base_job(sweep: Sweep, job: Job) -> tuple[bool, str]:
    """Run a size's base run unless it finished; returns (ok, error)."""
    if base_done(sweep, job):
        return True, ""
    started = time.perf_counter()
    ok, error = execute(job, sweep.dir / "logs")
    log.info("%s: %s in %.0f s%s", job.id, "done" if ok else "FAILED", time.perf_counter() - started,
             f": {error}" if error else "")
    return ok, error


def run_point_job(sweep: Sweep, job: Job, blocked: str | None = None) -> tuple[bool, str, list[dict]]:
    """Run one swept-stage run (unless ``blocked`` says why it cannot) and record its rows, or one failed row.

    Returns:
        (ok, error, the results table after recording).
    """
    started = time.perf_counter()
    ok, error = (False, blocked) if blocked else execute(job, sweep.dir / "logs")
    rows = result_rows(sweep, job) if ok else []
    if ok and not rows:
        ok, error = False, "the run wrote no evaluation of both eval sets"
    failed = [{"run_id": job.id, "status": "failed", "size": job.size, "r": job.r}]
    table = record(sweep.results, job.id, rows or failed)
    log.info("%s: %s in %.0f s%s", job.id, f"{len(rows)} rows" if ok else "FAILED", time.perf_counter() - started,
             f": {error}" if error else "")
    return ok, error, table


def run_point(path: str | Path, index: int, workers: int = 1) -> Path:
    """``cpt sweep SWEEP --point INDEX``: run grid point INDEX (a slurm array task) unless it finished; its size's
    base run must have finished (``--base``). Returns the table path.

    Raises:
        CptError: no such point, or the run failed (its failed row is recorded).
    """
    sweep = Sweep(path, workers)
    sweep.dir.mkdir(parents=True, exist_ok=True)
    grid = sweep.grid()
    if not 0 <= index < len(grid):
        raise CptError(f"--point {index}: the sweep has {len(grid)} grid points, 0 to {len(grid) - 1}")
    job = sweep.cpt_job(*grid[index])
    if any(row["run_id"] == job.id and row["status"] == "ok" for row in read_results(sweep.results)):
        log.info("%s: finished already; results in %s", job.id, sweep.results)
        return sweep.results
    base = sweep.base_job(job.size)
    blocked = None
    if base is not None and not base_done(sweep, base):
        blocked = (f"its base run {base.id} has not finished (`cpt sweep {path} --base {job.size}` runs it; see "
                   f"logs/{base.id}.log)")
    ok, error, _ = run_point_job(sweep, job, blocked)
    if not ok:
        raise CptError(f"{job.id} failed: {error}")
    return sweep.results


def run_base(path: str | Path, size: str, workers: int = 1) -> None:
    """``cpt sweep SWEEP --base SIZE``: run the base run of SIZE (a name, or its 0-based index in ``sizes``) unless
    it finished.

    Raises:
        CptError: no such size, or the run failed.
    """
    sweep = Sweep(path, workers)
    names = list(sweep.config.sizes)
    if size.isdigit() and int(size) < len(names):
        size = names[int(size)]
    if size not in names:
        raise CptError(f"--base: no size '{size}'{suggest(size, names)}; sizes: {', '.join(names)} "
                       f"(or 0 to {len(names) - 1})")
    job = sweep.base_job(size)
    if job is None:
        log.info("no base run: the swept stage '%s' is the base recipe's first", sweep.config.stage)
        return
    ok, error = run_base_job(sweep, job)
    if not ok:
        raise CptError(f"{job.id} failed: {error}")


def run_sweep(path: str | Path, dry_run: bool = False, workers: int = 1) -> Path:
    """``cpt sweep``: run what is not finished yet, append each finished run's rows; returns the table path."""
    sweep = Sweep(path, workers)
    sweep.dir.mkdir(parents=True, exist_ok=True)
    table = read_results(sweep.results)
    finished = {row["run_id"] for row in table if row["status"] == "ok"}
    todo = [point for point in sweep.grid() if sweep.run_id(*point) not in finished]
    log.info("sweep '%s': %d runs, %d finished, %d to run; results in %s", sweep.config.name, len(sweep.grid()),
             len(sweep.grid()) - len(todo), len(todo), sweep.results)
    bases = {size: sweep.base_job(size) for size in dict.fromkeys(size for size, _, _ in todo)}
    if dry_run:
        for job in [j for j in bases.values() if j] + [sweep.cpt_job(*p) for p in todo]:
            print(f"{job.id}: cpt " + " ".join(job.command))
        return sweep.results
    failed_bases = {size for size, job in bases.items() if job is not None and not run_base_job(sweep, job)[0]}
    for point in todo:
        size = point[0]
        blocked = f"its base run base-{size} failed (see logs/base-{size}.log)" if size in failed_bases else None
        table = run_point_job(sweep, sweep.cpt_job(*point), blocked)[2]
    failed = sorted({row["run_id"] for row in table if row["status"] == "failed"})
    if failed:
        log.warning("%d run(s) failed: %s; fix the cause and run `cpt sweep %s` again to retry them", len(failed),
                    ", ".join(failed), path)
    return sweep.results
