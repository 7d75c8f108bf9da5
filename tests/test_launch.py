"""``cpt launch --slurm`` and ``cpt sweep --slurm``: scripts rendered from slurm/, run against stub ``sbatch``,
``srun`` and ``scontrol`` executables that record their arguments and run the job here (2 CPU processes for a
2-"GPU" job); SIGUSR1 mid-run writes a checkpoint, requeues the job, and the job resumes bit-identically."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from conftest import comparable, read_rows, tiny_recipe, write_recipe
from cpt import preemption
from cpt.cli import main
from cpt.sweep import read_results, write_results

# The stubs stand in for slurm's executables only: they log their argv to $STUB_DIR/calls.jsonl and run the job
# here. sbatch runs the script (each array task in parallel) with slurm's environment and the #SBATCH --output
# file, synchronously, and runs it again with SLURM_RESTART_COUNT set when `scontrol requeue` asked for that;
# with $STUB_SUBMIT_ONLY set it only prints a job id.
SBATCH = r'''
import json, os, re, subprocess, sys, threading
from pathlib import Path
stub = Path(os.environ["STUB_DIR"])
with open(stub / "calls.jsonl", "a") as f:
    f.write(json.dumps(["sbatch", *sys.argv[1:]]) + "\n")
script = Path(sys.argv[-1])
options = dict(re.findall(r"^#SBATCH --([\w-]+)=?(\S*)", script.read_text(), re.M))
options.update(arg[2:].partition("=")[::2] for arg in sys.argv[1:-1] if arg.startswith("--"))
counter = stub / "next_job_id"
first = int(counter.read_text()) if counter.exists() else 1000
tasks = [None]
if options.get("array"):
    tasks = [i for part in options["array"].split(",") for i in
             range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)]
counter.write_text(str(first + len(tasks) + 1))
print(first if "parsable" in options else f"Submitted batch job {first}", flush=True)
if os.environ.get("STUB_SUBMIT_ONLY"):
    sys.exit(0)
nodes = int(options.get("nodes", 1))

def run(job_id, task):
    env = {**os.environ, "SLURM_JOB_ID": str(job_id), "SLURM_NNODES": str(nodes),
           "SLURM_JOB_NODELIST": ",".join(["localhost"] * nodes)}
    name, log = options.get("job-name", "job"), options.get("output", "slurm-%j.out")
    if task is not None:
        env.update(SLURM_ARRAY_JOB_ID=str(first), SLURM_ARRAY_TASK_ID=str(task))
        log = log.replace("%A", str(first)).replace("%a", str(task))
    log = log.replace("%j", str(job_id)).replace("%x", name)
    for restart in range(3):
        if restart:
            env["SLURM_RESTART_COUNT"] = str(restart)
        with open(log, "a") as out:
            proc = subprocess.Popen(["bash", str(script)], stdout=out, stderr=subprocess.STDOUT, env=env)
            (stub / f"job-{job_id}.pid").write_text(str(proc.pid))
            code = proc.wait()
        with open(stub / "exit_codes.jsonl", "a") as f:
            f.write(json.dumps([job_id, code]) + "\n")
        requeued = stub / f"requeue-{job_id}"
        if not requeued.exists():
            break
        requeued.unlink()

ids = [first] if tasks == [None] else [first + 1 + i for i in range(len(tasks))]  # array tasks: ids of their own
threads = [threading.Thread(target=run, args=(job_id, task)) for job_id, task in zip(ids, tasks)]
for t in threads:
    t.start()
for t in threads:
    t.join()
'''

# srun runs the command once per node (SLURM_NODEID etc. set) and passes USR1/TERM on to those processes.
SRUN = r'''
import json, os, signal, subprocess, sys
from pathlib import Path
stub = Path(os.environ["STUB_DIR"])
with open(stub / "calls.jsonl", "a") as f:
    f.write(json.dumps(["srun", *sys.argv[1:]]) + "\n")
args, options = sys.argv[1:], {}
while args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    options[key] = value
nodes = int(options.get("nodes", os.environ.get("SLURM_NNODES", 1)))
procs = [subprocess.Popen(args, env={**os.environ, "SLURM_NODEID": str(i), "SLURM_PROCID": str(i),
                                     "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": str(nodes)})
         for i in range(nodes)]
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda signum, frame: [p.send_signal(signum) for p in procs if p.poll() is None])
codes = [p.wait() for p in procs]
sys.exit(max(c if c >= 0 else 128 - c for c in codes))
'''

SCONTROL = r'''
import json, os, signal, sys
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head -n 1` closes the pipe early, as it does to scontrol
from pathlib import Path
stub = Path(os.environ["STUB_DIR"])
with open(stub / "calls.jsonl", "a") as f:
    f.write(json.dumps(["scontrol", *sys.argv[1:]]) + "\n")
if sys.argv[1:3] == ["show", "hostnames"]:
    print("\n".join(sys.argv[3].split(",")))
elif sys.argv[1] == "requeue":
    (stub / f"requeue-{sys.argv[2]}").touch()
'''


def install_stubs(root: Path) -> dict[str, str]:
    """Write the stubs into ROOT/bin; returns an environment with them first on PATH, recording into ROOT/calls."""
    bin_dir, record = root / "bin", root / "calls"
    bin_dir.mkdir()
    record.mkdir()
    for name, source in (("sbatch", SBATCH), ("srun", SRUN), ("scontrol", SCONTROL)):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(source))
        path.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "STUB_DIR": str(record)}


@pytest.fixture
def stub_env(tmp_path) -> dict[str, str]:
    return install_stubs(tmp_path)


def calls(record: Path, program: str) -> list[list[str]]:
    lines = (record / "calls.jsonl").read_text().splitlines() if (record / "calls.jsonl").exists() else []
    return [c[1:] for c in map(json.loads, lines) if c[0] == program]


@pytest.fixture(scope="module")
def base_recipe(tiny_corpora, tmp_path_factory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("launch")
    recipe = tiny_recipe(tiny_corpora, root / "unused", pretrain=6, cpt=60)
    recipe["eval"]["every"] = 30
    recipe["checkpoint"] = {"every": 25, "keep_last": 5}
    recipe["run"]["data_dir"] = str(root / "data")
    return recipe, root


def recipe_at(base_recipe, name: str) -> tuple[Path, Path]:
    recipe, root = base_recipe
    run_dir = root / name
    return write_recipe(root / f"{name}.yaml", recipe | {"run": recipe["run"] | {"dir": str(run_dir)}}), run_dir


def cpt(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cpt", *args], capture_output=True, text=True, env=env)


def test_scripts_hold_the_checked_values(base_recipe, capsys):
    path, run_dir = recipe_at(base_recipe, "render")
    assert main(["launch", str(path), "--slurm", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu,gpu-long",
                 "--time", "2-00:00:00", "--account", "proj_1", "--cpus-per-task", "64", "--requeue", "--grace",
                 "600", "--port", "29400", "--dry-run", "train.micro_batch=2"]) == 0
    script = capsys.readouterr().out
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --partition=gpu,gpu-long", "#SBATCH --time=2-00:00:00", "#SBATCH --account=proj_1",
                 "#SBATCH --cpus-per-task=64", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@600",
                 f"#SBATCH --output={run_dir}/slurm/%j.out", "MAIN_PORT=29400", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600",
                 'MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                 f"CPT=(run {path} train.micro_batch=2 --auto-resume)", 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in script.splitlines() or line in script, line
    assert "--num_processes $((SLURM_NNODES * 8)) --num_machines \"$SLURM_NNODES\"" in script
    assert '--machine_rank "$SLURM_NODEID"' in script and "--main_process_ip \"$MAIN_HOST\"" in script
    assert not (run_dir / "slurm").exists(), "--dry-run wrote files"

    assert main(["launch", str(path), "--slurm", "--gpus-per-node", "2", "--dry-run"]) == 0
    single = capsys.readouterr().out
    assert [line for line in single.splitlines() if line.startswith("#SBATCH")] == [
        "#SBATCH --job-name=cpt-tiny", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=2",
        f"#SBATCH --output={run_dir}/slurm/%j.out"]
    assert "scontrol show hostnames" not in single
    assert "--num_processes 2 --num_machines 1 --machine_rank 0" in single


def test_values_are_shell_quoted(base_recipe, tmp_path, capsys, monkeypatch):
    path, _ = recipe_at(base_recipe, "quoted")
    monkeypatch.chdir(tmp_path)
    hostile = ["name=a$(touch pwned)b", "wandb.project='; touch pwned2; '"]
    assert main(["launch", str(path), *hostile, "--slurm", "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --job-name=cpt-a--touch-pwned-b" in script
    cpt_line = next(line for line in script.splitlines() if line.startswith("CPT=("))
    # bash reads the array back as exactly the arguments given, running nothing
    shown = subprocess.run(["bash", "-c", cpt_line + '\nprintf "%s\\n" "${CPT[@]}"'], capture_output=True, text=True,
                           cwd=tmp_path)
    assert shown.stdout.splitlines() == ["run", str(path), *hostile, "--auto-resume"]
    assert not list(tmp_path.glob("pwned*"))


@pytest.mark.parametrize("options, message", [
    (["--partition", "gpu; rm -rf /"], "--partition: 'gpu; rm -rf /' is not a slurm partition name"),
    (["--partition", "gpu\n#SBATCH --uid=0"], "is not a slurm partition name"),
    (["--account", "$(whoami)"], "--account: '$(whoami)' is not a slurm account name"),
    (["--time", "1 hour"], "--time: '1 hour' is not a slurm time limit"),
    (["--time", "10:00:00;reboot"], "is not a slurm time limit"),
    (["--nodes", "0"], "--nodes: expected a positive whole number, got '0'"),
    (["--gpus-per-node", "two"], "--gpus-per-node: expected a positive whole number"),
    (["--cpus-per-task", "-4"], "--cpus-per-task: expected a positive whole number"),
    (["--port", "80"], "--port: expected a port in 1024..65535"),
    (["--requeue", "--time", "5", "--grace", "300"], "--grace: 300 s before the time limit is not inside --time 5"),
])
def test_bad_values_are_refused_in_one_line(base_recipe, capsys, options, message):
    path, run_dir = recipe_at(base_recipe, "refused")
    assert main(["launch", str(path), "--slurm", *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cpt: error: ") and message in err and err.count("\n") == 1, err
    assert not run_dir.exists()


def test_refusals_of_the_run_directory_and_of_options_without_slurm(base_recipe, capsys):
    path, run_dir = recipe_at(base_recipe, "busy")
    (run_dir / "checkpoints" / "cpt" / "step-4").mkdir(parents=True)  # progress: a run not to start over
    cases = [(["launch", str(path), "--slurm"], "already holds a run (checkpoints); pass run.dir=NEW_DIR"),
             (["launch", str(path), "run.dir=" + str(run_dir.parent / "free"), "--slurm", "--resume"],
              "holds no run to continue"),
             (["launch", str(path), "run.dir=" + str(run_dir.parent / "with space"), "--slurm", "--dry-run"],
              "#SBATCH lines carry no quotes"),
             (["launch", str(path), "--dry-run"], "add --slurm"),
             (["sweep", str(path), "--partition", "gpu"], "--partition is a slurm job option: add --slurm"),
             (["run", str(path), "--auto-resume", "--overwrite"], "drop --resume/--overwrite")]
    for args, message in cases:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("cpt: error: ") and message in err and err.count("\n") == 1, err


def test_stop_signals_set_a_flag_and_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with preemption.stop_signals():
        assert preemption.received() is None
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.received() == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.fixture(scope="module")
def reference_run(base_recipe, tmp_path_factory):
    """The recipe as a 1-node x 2-"GPU" job on stub slurm: `accelerate launch` with 2 CPU processes (gloo)."""
    path, run_dir = recipe_at(base_recipe, "reference")
    env = install_stubs(tmp_path_factory.mktemp("stubs"))
    result = cpt("launch", str(path), "--slurm", "--gpus-per-node", "2", env=env)
    return run_dir, Path(env["STUB_DIR"]), result


def job_log(run_dir: Path, stdout: str) -> tuple[str, str]:
    """(job id, the job's output) of a `cpt launch` that submitted one job."""
    job = stdout.split("submitted job ")[1].split(":")[0]
    return job, (run_dir / "slurm" / f"{job}.out").read_text()


def test_single_node_job_runs_two_processes(reference_run):
    run_dir, record, result = reference_run
    assert result.returncode == 0, result.stderr[-3000:]
    job, log = job_log(run_dir, result.stdout)
    assert calls(record, "sbatch") == [["--parsable", str(run_dir / "slurm" / "launch.sbatch")]]
    assert calls(record, "srun") == [["--nodes=1", "--ntasks=1", sys.executable, "-m", "accelerate.commands.launch",
                                      "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--machine_rank",
                                      "0", "--main_process_ip", "127.0.0.1", "--main_process_port",
                                      str(10000 + int(job) % 20000), "-m", "cpt", "run",
                                      str(run_dir.parent / "reference.yaml"), "--auto-resume"]]
    assert calls(record, "scontrol") == []
    assert "2 process(es)" in log and "stage 1 'cpt': 60 steps of 16 x 32 tokens" in log
    assert [r["step"] for r in read_rows(run_dir) if r["kind"] == "train"] == list(range(1, 67))
    assert (run_dir / "checkpoints" / "cpt" / "step-66" / "meta.json").is_file()


def test_multi_node_job_runs_one_launcher_per_node(reference_run, base_recipe, tmp_path):
    """2 nodes x 1 "GPU" (two `accelerate launch`es, machine ranks 0 and 1) training with DeepSpeed ZeRO-3 (set by
    command-line overrides, which the script passes on), with --resume into a run directory left by a job
    stopped before its first checkpoint: the job starts the run afresh."""
    path, run_dir = recipe_at(base_recipe, "multi")
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"recipe": None, "base_dir": str(path.parent), "lineage": None}))
    (run_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 99.0}\n')
    env = install_stubs(tmp_path)
    record = Path(env["STUB_DIR"])
    overrides = ["distributed.engine=deepspeed", "distributed.zero_stage=3"]
    result = cpt("launch", str(path), *overrides, "--slurm", "--nodes", "2", "--gpus-per-node", "1", "--resume", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    job, log = job_log(run_dir, result.stdout)
    assert calls(record, "scontrol") == [["show", "hostnames", "localhost,localhost"]]
    [srun] = calls(record, "srun")
    assert srun[:5] == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", "-c"]
    assert srun[6:] == [sys.executable, "--multi_gpu", "--num_processes", "2", "--num_machines", "2",
                        "--main_process_ip", "localhost", "--main_process_port", str(10000 + int(job) % 20000),
                        "-m", "cpt", "run", str(path), *overrides, "--auto-resume"]
    assert "2 process(es) on cpu (DeepSpeed ZeRO-3)" in log and "resuming" not in log
    # the stale row is gone; the same global batch on 2 ranks as the 1-node DDP job gives the same losses (ZeRO-3
    # reduces gradients in another order across "nodes", so not bit for bit: 1.6e-5 apart at most after 66 steps)
    rows, reference = read_rows(run_dir), read_rows(reference_run[0])
    keys = [[(r["kind"], r["step"], r.get("set")) for r in run] for run in (rows, reference)]
    assert keys[0] == keys[1]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses == pytest.approx([r["loss"] for r in reference if "loss" in r], rel=1e-4)


def test_requeued_job_checkpoints_on_sigusr1_and_resumes_bit_identically(reference_run, base_recipe, tmp_path):
    reference = reference_run[0]
    path, run_dir = recipe_at(base_recipe, "requeued")
    env = install_stubs(tmp_path)
    record = Path(env["STUB_DIR"])
    launch = subprocess.Popen([sys.executable, "-m", "cpt", "launch", str(path), "--slurm", "--gpus-per-node", "2",
                               "--requeue", "--time", "10", "--grace", "60"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        rows = read_rows(run_dir) if (run_dir / "metrics.jsonl").exists() else []
        if any(r["kind"] == "train" and r["step"] >= 12 for r in rows):
            break
        time.sleep(0.02)
    assert launch.poll() is None, "the job finished before it could be signalled"
    # what slurm does --grace seconds before the time limit: SIGUSR1 to the batch shell only
    os.kill(int(next(record.glob("job-*.pid")).read_text()), signal.SIGUSR1)
    out, err = launch.communicate(timeout=180)
    assert launch.returncode == 0, err[-3000:]
    job, log = job_log(run_dir, out)
    stopped = [line for line in log.splitlines() if "stopping on SIGUSR1" in line]
    assert len(stopped) == 1, log[-3000:]
    step = int(stopped[0].split("at global step ")[1].split(":")[0])
    assert 12 <= step < 60 and f"exit code {preemption.EXIT_CODE}" in stopped[0]
    checkpoint = run_dir / "checkpoints" / "cpt" / f"step-{step}"
    assert json.loads((checkpoint / "meta.json").read_text())["global_step"] == step
    assert calls(record, "scontrol") == [["requeue", job]]
    assert len(calls(record, "srun")) == 2 and f"resuming from {checkpoint}" in log
    # the requeued attempt continued exactly: same losses, evals and rows as the uninterrupted 2-process job
    assert comparable(read_rows(run_dir)) == comparable(read_rows(reference))


def sweep_file(root: Path, corpora: Path, stages: list[str]) -> Path:
    """A sweep over code ratios of the tiny recipe cut to ``stages``, sizes h16 and h32."""
    base = tiny_recipe(corpora, root / "unused", pretrain=4, cpt=6)
    base["stages"] = [s for s in base["stages"] if s["name"] in stages]
    base["eval"]["every"] = 3
    base["run"]["data_dir"] = str(root / "data")
    write_recipe(root / "base.yaml", base)
    sweep = {"name": "tiny-sweep", "base": "base.yaml", "stage": "cpt", "domain": "code", "general": "english",
             "ratios": [0.2, 0.9], "dir": str(root / "sweep"),
             "sizes": {"h16": {"model.arch.hidden": 16}, "h32": {"model.arch.hidden": 32}}}
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def test_sweep_array_runs_base_runs_first(tiny_corpora, tmp_path, stub_env, monkeypatch, capsys):
    path = sweep_file(tmp_path, tiny_corpora, ["pretrain", "cpt"])
    (tmp_path / "sweep").mkdir()
    write_results(tmp_path / "sweep" / "results.csv", [{"run_id": "h16-r0.2", "status": "ok"},
                                                       {"run_id": "h32-r0.2", "status": "failed"}])
    assert main(["sweep", str(path), "--slurm", "--partition", "debug", "--requeue", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    base, points = printed.split("# ---- ")[1:]
    assert base.startswith(str(tmp_path / "sweep" / "slurm" / "base.sbatch"))
    assert "#SBATCH --array=0-1" in base and f"CPT=(sweep {path} --base \"$SLURM_ARRAY_TASK_ID\")" in base
    # grid points in file order: h16-r0.2 (finished), h16-r0.9, h32-r0.2 (failed: again), h32-r0.9
    assert "#SBATCH --array=1-3" in points and f"CPT=(sweep {path} --point \"$SLURM_ARRAY_TASK_ID\")" in points
    for script in (base, points):
        assert "#SBATCH --partition=debug" in script and "#SBATCH --signal=B:USR1@300" in script
        assert f"#SBATCH --output={tmp_path}/sweep/slurm/%x-%A_%a.out" in script
    assert not (tmp_path / "sweep" / "slurm").exists()

    monkeypatch.setenv("PATH", stub_env["PATH"])
    monkeypatch.setenv("STUB_DIR", stub_env["STUB_DIR"])
    monkeypatch.setenv("STUB_SUBMIT_ONLY", "1")
    assert main(["sweep", str(path), "--slurm"]) == 0
    slurm_dir = tmp_path / "sweep" / "slurm"
    assert calls(Path(stub_env["STUB_DIR"]), "sbatch") == [
        ["--parsable", str(slurm_dir / "base.sbatch")],
        ["--parsable", "--dependency=afterany:1000", str(slurm_dir / "points.sbatch")]]
    assert "submitted base array 1000" in capsys.readouterr().out

    assert main(["sweep", str(path), "--slurm", "--gpus-per-node", "2"]) == 2
    assert "one process on one GPU" in capsys.readouterr().err
    for point, message in (("4", "the sweep has 4 grid points, 0 to 3"), ("-1", "0 to 3")):
        assert main(["sweep", str(path), "--point", point]) == 2
        assert message in capsys.readouterr().err
    assert main(["sweep", str(path), "--base", "h23"]) == 2
    assert "no size 'h23' (did you mean 'h32'?)" in capsys.readouterr().err


def test_sweep_array_task_runs_its_grid_point(tiny_corpora, tmp_path, stub_env, monkeypatch, capsys):
    """A one-stage base (no base runs): the array's task runs `cpt sweep --point` and writes the point's rows."""
    path = sweep_file(tmp_path, tiny_corpora, ["cpt"])
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump(raw | {"ratios": [0.9], "sizes": {"h16": {"model.arch.hidden": 16}}}))
    monkeypatch.setenv("PATH", stub_env["PATH"])
    monkeypatch.setenv("STUB_DIR", stub_env["STUB_DIR"])
    assert main(["sweep", str(path), "--slurm", "--requeue"]) == 0  # the stub sbatch runs the array here
    record = Path(stub_env["STUB_DIR"])
    assert [c[-1] for c in calls(record, "sbatch")] == [str(tmp_path / "sweep" / "slurm" / "points.sbatch")]
    assert calls(record, "srun") == [["--ntasks=1", sys.executable, "-m", "cpt", "sweep", str(path), "--point", "0"]]
    rows = read_results(tmp_path / "sweep" / "results.csv")
    assert [(r["run_id"], r["status"], r["step"]) for r in rows] == [("h16-r0.9", "ok", str(s)) for s in (0, 3, 6)]
    capsys.readouterr()
    assert main(["sweep", str(path), "--slurm"]) == 0
    assert "all 1 runs finished" in capsys.readouterr().out and len(calls(record, "sbatch")) == 1


RECORDER = """
import sys
from pathlib import Path
from cpt.sweep import record
for i in range(25):
    record(Path(sys.argv[1]), f"{sys.argv[2]}-{i}", [{"run_id": f"{sys.argv[2]}-{i}", "status": "ok"}])
"""


def test_results_rows_survive_tasks_finishing_together(tmp_path):
    table = tmp_path / "results.csv"
    writers = [subprocess.Popen([sys.executable, "-c", RECORDER, str(table), f"task{k}"]) for k in range(4)]
    assert [w.wait() for w in writers] == [0] * 4
    expected = sorted(f"task{k}-{i}" for k in range(4) for i in range(25))
    assert sorted(r["run_id"] for r in read_results(table)) == expected
