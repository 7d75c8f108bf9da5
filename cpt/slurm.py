"""``cpt launch RECIPE --slurm`` and ``cpt sweep SWEEP --slurm``: render an sbatch script from ``cpt/slurm_templates/``
(linked from ``slurm/``) and submit it.

The templates are plain bash with ``{{name}}`` placeholders. Every value put into a script is either checked
against a conservative pattern (what goes into ``#SBATCH`` lines, which sbatch reads without a shell) or quoted
with :func:`shlex.quote` (what goes into the bash body), so that no option value can run a command.

``cpt.cli`` calls :func:`add_commands` and :func:`add_slurm_options` while building its parser and
:func:`dispatch` with the parsed arguments.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cpt.errors import CptError

# Package data, so that an installed cpt (not only a checkout) can launch; slurm/ in the checkout links to them.
TEMPLATES = Path(__file__).resolve().parent / "slurm_templates"
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# [days-]first[:second[:third]]: MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS, DAYS-HOURS[:MINUTES[:SECONDS]]
TIME = re.compile(r"(?:([0-9]{1,3})-)?([0-9]{1,6})((?::[0-9]{1,2}){0,2})")
# Paths that go into #SBATCH lines (sbatch does not read them through a shell).
SBATCH_PATH = re.compile(r"[A-Za-z0-9_./+,=@-]+")
# Derived from the job id so that two jobs sharing a node do not collide; below Linux's ephemeral port range.
DEFAULT_PORT = "$((10000 + SLURM_JOB_ID % 20000))"


def time_seconds(text: str) -> int | None:
    """Seconds in a slurm time limit (``30``, ``1:30:00``, ``2-12``, ``2-12:00:00``), or None when it is not one."""
    m = TIME.fullmatch(text)
    if m is None:
        return None
    days, first, rest = m.groups()
    parts = [int(first), *(int(p) for p in rest.split(":")[1:])]
    if days is not None:
        hours, minutes, seconds = (parts + [0, 0])[:3]
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if len(parts) == 3:
        return (parts[0] * 60 + parts[1]) * 60 + parts[2]
    return parts[0] * 60 + (parts[1] if len(parts) == 2 else 0)


def _count(text: str | None, option: str, default: int | None, minimum: int = 1) -> int | None:
    if text is None:
        return default
    if not re.fullmatch(r"[0-9]{1,6}", text) or int(text) < minimum:
        what = "a positive whole number" if minimum == 1 else f"a whole number from {minimum}"
        raise CptError(f"{option}: expected {what}, got {text!r}")
    return int(text)


def _name(text: str | None, option: str, what: str, several: bool = False) -> str | None:
    if text is None:
        return None
    names = text.split(",") if several else [text]
    if not all(NAME.fullmatch(n) for n in names):
        listed = "; several separated by commas" if several else ""
        raise CptError(f"{option}: {text!r} is not a slurm {what} name (letters, digits, '_', '.', '-', starting "
                       f"with a letter or digit{listed})")
    return text


@dataclass
class SlurmConfig:
    """What a job asks slurm for; built from the command line by :meth:`from_args`, every value checked."""

    nodes: int = 1
    gpus_per_node: int = 1  # 0: CPU nodes, one process each (gloo)
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None
    requeue: bool = False
    grace: int = 300
    port: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SlurmConfig:
        """The job options given on the command line, checked.

        Raises:
            CptError: one line naming the option, the bad value and what is allowed.
        """
        config = cls(nodes=_count(args.nodes, "--nodes", 1),
                     gpus_per_node=_count(args.gpus_per_node, "--gpus-per-node", 1, minimum=0),
                     partition=_name(args.partition, "--partition", "partition", several=True),
                     account=_name(args.account, "--account", "account"),
                     cpus_per_task=_count(args.cpus_per_task, "--cpus-per-task", None), requeue=args.requeue,
                     grace=_count(args.grace, "--grace", 300), port=_count(args.port, "--port", None))
        if args.time is not None:
            seconds = time_seconds(args.time)
            if seconds is None:
                raise CptError(f"--time: {args.time!r} is not a slurm time limit; use MINUTES, HH:MM:SS or D-HH:MM:SS")
            if config.requeue and config.grace >= seconds:
                raise CptError(f"--grace: {config.grace} s before the time limit is not inside --time {args.time}")
            config.time = args.time
        if config.grace > 65535:
            raise CptError(f"--grace: at most 65535 seconds, got {config.grace}")
        if config.port is not None and not 1024 <= config.port <= 65535:
            raise CptError(f"--port: expected a port in 1024..65535, got {config.port}")
        return config

    def sbatch_lines(self) -> str:
        """The optional ``#SBATCH`` lines, each after a newline; every value in them was checked against a pattern."""
        options = [("partition", self.partition), ("time", self.time), ("account", self.account),
                   ("cpus-per-task", self.cpus_per_task)]
        lines = [f"#SBATCH --{key}={value}" for key, value in options if value is not None]
        if self.requeue:
            lines += ["#SBATCH --requeue", f"#SBATCH --signal=B:USR1@{self.grace}"]
        return "".join("\n" + line for line in lines)

    @property
    def per_node(self) -> int:
        """Training processes per node: one per GPU, or one on a CPU node."""
        return max(self.gpus_per_node, 1)


def add_slurm_options(p: argparse.ArgumentParser) -> None:
    """The job options of ``cpt launch`` and ``cpt sweep``; values stay strings here and are checked by
    :meth:`SlurmConfig.from_args`, which reports a bad one in one line."""
    p.add_argument("--slurm", action="store_true", help="submit to slurm with sbatch")
    p.add_argument("--nodes", metavar="N", help="nodes (default 1)")
    p.add_argument("--gpus-per-node", metavar="G", help="GPUs per node, one process each (default 1; 0: CPU nodes, "
                   "one process each)")
    p.add_argument("--partition", metavar="P", help="slurm partition(s), comma-separated")
    p.add_argument("--time", metavar="T", help="time limit: MINUTES, HH:MM:SS or D-HH:MM:SS")
    p.add_argument("--account", metavar="A", help="slurm account to charge")
    p.add_argument("--cpus-per-task", metavar="C", help="CPU cores per node's task")
    p.add_argument("--requeue", action="store_true",
                   help="before the time limit, checkpoint and put the job back in the queue; it resumes there")
    p.add_argument("--grace", metavar="SECONDS", help="with --requeue: warn the job this long before its time limit "
                   "and give the training processes this long to checkpoint (default 300)")
    p.add_argument("--port", metavar="PORT", help="rendezvous port of the first node (default: from the job id)")


def add_commands(sub) -> None:
    """Add ``launch`` to ``cpt``'s subparsers."""
    p = sub.add_parser("launch", help="run a recipe as a slurm job (one node or several)",
                       description="Render an sbatch script for RECIPE into RUN_DIR/slurm/launch.sbatch and submit it "
                                   "with sbatch: one srun task per node running `accelerate launch` with one process "
                                   "per GPU. The job runs `cpt run RECIPE --auto-resume`, so a requeued job continues "
                                   "from its newest checkpoint. Templates and placeholders: slurm/README.md.")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted key=value recipe overrides")
    add_slurm_options(p)
    p.add_argument("--resume", action="store_true", help="the run directory holds a run: continue it in the job")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="processes that tokenize the data in the "
                   "job (default 1)")
    p.add_argument("--prepare-tasks", type=int, metavar="N", help="when the data is not prepared: tokenize it in "
                   "an array of N CPU jobs first (default 1), training after them")
    p.add_argument("--dry-run", action="store_true", help="print the script, write and submit nothing")


def dispatch(args: argparse.Namespace) -> bool:
    """Run ``launch``, or ``sweep --slurm``, if that is what ``args`` asks; False otherwise.

    Raises:
        CptError: a bad option value, a recipe or sweep that does not validate, a run directory already in use,
            sbatch missing or refusing the script.
    """
    if args.command == "launch":
        launch(args)
    elif args.command == "sweep" and args.slurm:
        submit_sweep(args)
    elif args.command == "prepare" and args.slurm:
        if args.tasks is None or args.task is not None:
            raise CptError("cpt prepare --slurm needs --tasks N (the array's size) and no --task, which is what "
                           "its array tasks run")
        submit_prepare(args, args.tasks)
    else:
        return False
    return True


def refuse_slurm_options(args: argparse.Namespace) -> None:
    """``cpt sweep`` without ``--slurm``: job options would be silently ignored, so name the first one given."""
    for option in ("nodes", "gpus_per_node", "partition", "time", "account", "cpus_per_task", "grace", "port",
                   "requeue"):
        if getattr(args, option):
            raise CptError(f"--{option.replace('_', '-')} is a slurm job option: add --slurm to submit it as a job")


def render(template: str, values: dict[str, str]) -> str:
    """Fill ``slurm/TEMPLATE``'s ``{{name}}`` placeholders; the values must already be checked or quoted."""
    path = TEMPLATES / template
    if not path.is_file():
        raise CptError(f"slurm template {path} is missing; reinstall cpt (the templates are package data)")
    text = path.read_text()
    missing = sorted(set(PLACEHOLDER.findall(text)) - set(values))
    if missing:
        raise KeyError(f"{template}: no value for {', '.join(missing)}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def words(items: list[str]) -> str:
    """Shell words for a bash array: each item quoted on its own."""
    return " ".join(shlex.quote(str(item)) for item in items)


def log_path(directory: Path, pattern: str) -> str:
    """``DIRECTORY/PATTERN`` for ``#SBATCH --output``, refused when the path needs quoting."""
    directory = str(directory.resolve())
    if not SBATCH_PATH.fullmatch(directory):
        raise CptError(f"slurm cannot log into {directory!r}: #SBATCH lines carry no quotes, so its path may hold "
                       "only letters, digits and _ . / + , = @ -; choose another run.dir")
    return f"{directory}/{pattern}"


def workers_args(args: argparse.Namespace) -> list[str]:
    """``--workers N`` for the job's ``cpt`` command, checked here at submission; nothing for the default 1."""
    from cpt.cli import workers_count

    return ["--workers", str(workers_count(args.workers))] if args.workers != 1 else []


def common_values(config: SlurmConfig) -> dict[str, str]:
    gpu_line = f"\n#SBATCH --gpus-per-node={config.gpus_per_node}" if config.gpus_per_node else ""
    return {"sbatch_options": config.sbatch_lines(), "workdir": shlex.quote(str(Path.cwd())),
            "python": shlex.quote(sys.executable), "gpus_per_node": str(config.gpus_per_node), "gpu_line": gpu_line,
            "per_node": str(config.per_node)}


def launch(args: argparse.Namespace) -> str | None:
    """``cpt launch``: check the options and the recipe, render the script, then print it (``--dry-run``) or write
    it to RUN_DIR/slurm/launch.sbatch and submit it. Returns the job id when submitted."""
    if not args.slurm:
        raise CptError("cpt launch submits slurm jobs only: add --slurm (on one machine, `accelerate launch -m cpt "
                       "run RECIPE` runs one process per GPU)")
    config = SlurmConfig.from_args(args)
    from cpt.recipe import load_recipe
    from cpt import rundir

    recipe, base_dir = load_recipe(args.recipe, args.overrides)  # a recipe that does not validate fails here
    run_dir = recipe.run_dir
    existing = [name for name in rundir.OUTPUTS if (run_dir / name).exists()]
    if existing and not args.resume and rundir.has_progress(run_dir):
        raise CptError(f"run directory '{run_dir}' already holds a run ({', '.join(existing)}); pass run.dir=NEW_DIR "
                       "for a new run, or --resume to continue it in the job")
    if args.resume and not (run_dir / "run.json").is_file():
        raise CptError(f"--resume: '{run_dir}' holds no run to continue (no run.json); drop --resume to start it")
    processes = config.nodes * config.per_node
    workers = workers_args(args)
    values = {**common_values(config), "job_name": "cpt-" + re.sub(r"[^A-Za-z0-9_.-]", "-", recipe.name)[:60],
              "nodes": str(config.nodes), "processes": str(processes), "output": log_path(run_dir / "slurm", "%j.out"),
              "port": str(config.port) if config.port else DEFAULT_PORT, "grace": str(config.grace),
              "cpt_args": words(["run", str(Path(args.recipe).resolve()), *args.overrides, "--auto-resume", *workers])}
    script = render("single-node.sbatch" if config.nodes == 1 else "multi-node.sbatch", values)
    if args.dry_run:
        print(script, end="")
        return None
    from cpt.data.prepare import is_prepared
    from cpt.runner import data_dir

    after = []
    if not is_prepared(recipe, base_dir, data_dir(recipe, base_dir)):
        # Tokenizing is a job of its own, on CPU: the training ranks never wait for it inside a collective.
        prepared = submit_prepare(args, args.prepare_tasks or 1)
        after = [f"--dependency=afterok:{prepared}"]
    path = run_dir / "slurm" / "launch.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    job = submit(path, after)
    shape = f"{config.gpus_per_node} GPU(s)" if config.gpus_per_node else "1 CPU process"
    print(f"submitted job {job}: {path} ({config.nodes} node(s) x {shape}); log {run_dir / 'slurm' / f'{job}.out'}")
    return job


def submit_prepare(args: argparse.Namespace, tasks: int) -> str:
    """``cpt prepare RECIPE --slurm --tasks N``: an array of N jobs, task I tokenizing every N-th task of each
    corpus from the I-th (``cpt prepare --task I --tasks N``), then one job, after all of them succeeded, that
    assembles the corpora (``cpt prepare``). On CPU nodes unless ``--gpus-per-node`` says otherwise; ``--workers``
    processes tokenize in each. Returns the assembling job's id (what training waits for)."""
    from cpt.recipe import load_recipe
    from cpt.runner import data_dir

    if tasks < 1:
        raise CptError(f"--tasks: expected a positive number of array tasks, got {tasks}")
    gpus = args.gpus_per_node if args.command == "prepare" else None  # launch's GPUs are for training
    cpu = argparse.Namespace(**{**vars(args), "nodes": None, "gpus_per_node": gpus or "0"})
    config = SlurmConfig.from_args(cpu)
    recipe, _ = load_recipe(args.recipe, args.overrides)
    logs = data_dir(recipe, None) / "slurm"
    name = "cpt-prepare-" + re.sub(r"[^A-Za-z0-9_.-]", "-", recipe.name)[:50]
    command = ["prepare", str(Path(args.recipe).resolve()), *args.overrides, *workers_args(args)]
    scripts = {
        "prepare-tasks": render("sweep-array.sbatch", {
            **common_values(config), "job_name": f"{name}-tasks", "array": f"0-{tasks - 1}", "task_option": "--task",
            "output": log_path(logs, "%x-%A_%a.out"), "cpt_args": words([*command, "--tasks", str(tasks), "--task"])}),
        "prepare": render("single-node.sbatch", {
            **common_values(config), "job_name": name, "nodes": "1", "processes": "1",
            "output": log_path(logs, "%x-%j.out"), "port": DEFAULT_PORT, "grace": str(config.grace),
            "cpt_args": words(command)}),
    }
    jobs = submit_chain(scripts, logs, "afterok", args.command == "prepare" and args.dry_run)
    return jobs[-1] if jobs else ""


def array_spec(indices: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"`` for ``#SBATCH --array``."""
    parts, start = [], None
    for i, index in enumerate(indices):
        start = index if start is None else start
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            parts.append(str(index) if start == index else f"{start}-{index}")
            start = None
    return ",".join(parts)


def submit_sweep(args: argparse.Namespace) -> list[str]:
    """``cpt sweep SWEEP --slurm``: one array task per grid point still to run, after an array of the base runs
    those points need (``--dependency=afterany``: a point whose base failed records the failure, as ``cpt sweep``
    does). Returns the submitted job ids."""
    from cpt.sweep import Sweep, base_done, read_results

    if args.point is not None or args.base is not None:
        raise CptError("--slurm submits the whole sweep; --point and --base are what its array tasks run")
    config = SlurmConfig.from_args(args)
    if config.nodes != 1 or config.gpus_per_node > 1:
        raise CptError("cpt sweep --slurm runs each grid point as one process on one GPU (--nodes 1 "
                       "--gpus-per-node 1, or 0 on CPU nodes); sweep runs are small. Use `cpt launch` for a large run")
    sweep = Sweep(args.sweep)
    workers = workers_args(args)
    finished = {row["run_id"] for row in read_results(sweep.results) if row["status"] == "ok"}
    grid = sweep.grid()
    todo = [i for i, point in enumerate(grid) if sweep.run_id(*point) not in finished]
    if not todo:
        print(f"sweep '{sweep.config.name}': all {len(grid)} runs finished; results in {sweep.results}")
        return []
    sizes = list(sweep.config.sizes)
    needed = {grid[i][0] for i in todo}
    base_jobs = {size: sweep.base_job(size) for size in sizes}
    bases = [i for i, size in enumerate(sizes)
             if size in needed and base_jobs[size] is not None and not base_done(sweep, base_jobs[size])]
    name = "cpt-sweep-" + re.sub(r"[^A-Za-z0-9_.-]", "-", sweep.config.name)[:50]
    sweep_path = str(Path(args.sweep).resolve())
    scripts = {}
    for kind, indices, option in (("base", bases, "--base"), ("points", todo, "--point")):
        if indices:
            scripts[kind] = render("sweep-array.sbatch", {
                **common_values(config), "job_name": f"{name}-{kind}", "array": array_spec(indices),
                "task_option": option, "output": log_path(sweep.dir / "slurm", "%x-%A_%a.out"),
                "cpt_args": words(["sweep", sweep_path, *workers, option])})
    return submit_chain(scripts, sweep.dir / "slurm", "afterany", args.dry_run)


def submit_chain(scripts: dict[str, str], directory: Path, dependency: str, dry_run: bool) -> list[str]:
    """Write each of ``scripts`` (kind -> text) to ``DIRECTORY/KIND.sbatch`` and submit them in order, every one
    after the first waiting on it (``--dependency=DEPENDENCY:FIRST``); with ``dry_run``, print them instead.
    Returns the job ids."""
    if dry_run:
        for kind, script in scripts.items():
            print(f"# ---- {directory / f'{kind}.sbatch'}\n{script}", end="")
        return []
    directory.mkdir(parents=True, exist_ok=True)
    jobs: list[str] = []
    for kind, script in scripts.items():
        path = directory / f"{kind}.sbatch"
        path.write_text(script)
        jobs.append(submit(path, [f"--dependency={dependency}:{jobs[0]}"] if jobs else []))
        array = " array" if "\n#SBATCH --array=" in script else ""
        print(f"submitted {kind}{array} {jobs[-1]}: {path}")
    return jobs


def submit(script: Path, extra: list[str] = ()) -> str:
    """``sbatch --parsable [EXTRA] SCRIPT``; returns the job id."""
    if shutil.which("sbatch") is None:
        raise CptError("sbatch is not on PATH (is this a slurm login node?); --dry-run prints the script instead")
    result = subprocess.run(["sbatch", "--parsable", *extra, str(script)], capture_output=True, text=True)
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    if result.returncode != 0:
        raise CptError(f"sbatch refused {script}: {lines[-1] if lines else f'exit code {result.returncode}'}")
    job = result.stdout.strip().splitlines()[-1].split(";")[0] if result.stdout.strip() else ""
    if not job.isdigit():
        raise CptError(f"sbatch printed no job id for {script}: {lines[-1] if lines else 'no output'}")
    return job
