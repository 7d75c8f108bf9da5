"""``cpt launch --slurm`` and ``cpt sweep --slurm`` against a real slurm cluster on this machine (the ``slurm``
fixture: munged, slurmctld and two one-CPU slurmd from Debian's packages, see tests/slurm_cluster.py): CPU jobs on
one and two nodes, SIGUSR1 pre-emption and requeue, scancel and a fresh launch, a job that fails, and a sweep's two
dependent arrays. The rendered scripts and their refusals need no slurm. One machine's slurm has no GPUs: the
job of a 2-GPU node runs against stub ``sbatch``/``srun`` executables instead, named as such."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from conftest import comparable, corpus_bytes, read_rows, tiny_recipe, write_recipe
from cpt import preemption
from cpt.checkpoint import latest_intact
from cpt.cli import main
from cpt.sweep import read_results, write_results

# GPU-count stubs: a real slurm on this machine has no GPUs to give a --gpus-per-node 2 job. They log their argv
# to $STUB_DIR/calls.jsonl; sbatch runs the script here, synchronously, with slurm's environment and the
# #SBATCH --output file, and records its exit code; srun runs the command once.
STUB_SBATCH = r'''
import json, os, re, subprocess, sys
from pathlib import Path
stub = Path(os.environ["STUB_DIR"])
with open(stub / "calls.jsonl", "a") as f:
    f.write(json.dumps(["sbatch", *sys.argv[1:]]) + "\n")
script = Path(sys.argv[-1])
options = dict(re.findall(r"^#SBATCH --([\w-]+)=?(\S*)", script.read_text(), re.M))
print(1000, flush=True)
env = {**os.environ, "SLURM_JOB_ID": "1000", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost"}
with open(options["output"].replace("%j", "1000"), "a") as out:
    code = subprocess.run(["bash", str(script)], stdout=out, stderr=subprocess.STDOUT, env=env).returncode
(stub / "exit_code").write_text(str(code))
'''

STUB_SRUN = r'''
import json, os, subprocess, sys
from pathlib import Path
with open(Path(os.environ["STUB_DIR"]) / "calls.jsonl", "a") as f:
    f.write(json.dumps(["srun", *sys.argv[1:]]) + "\n")
args = sys.argv[1:]
while args[0].startswith("--"):  # srun's own options come before the command
    args.pop(0)
sys.exit(subprocess.run(args, env={**os.environ, "SLURM_NODEID": "0", "SLURM_PROCID": "0"}).returncode)
'''


def install_stubs(root: Path) -> dict[str, str]:
    """Write the stubs into ROOT/bin; returns an environment with them first on PATH, recording into ROOT/calls."""
    bin_dir, record = root / "bin", root / "calls"
    bin_dir.mkdir()
    record.mkdir()
    for name, source in (("sbatch", STUB_SBATCH), ("srun", STUB_SRUN)):
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
                 'FIRST_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                 'MAIN_HOST=$(scontrol show node -o "$FIRST_NODE" | tr \' \' \'\\n\' | sed -n \'s/^NodeAddr=//p\')',
                 f"CPT=(run {path} train.micro_batch=2 --auto-resume)", 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in script.splitlines() or line in script, line
    assert "--num_processes $((SLURM_NNODES * 8)) --num_machines \"$SLURM_NNODES\"" in script
    assert '--machine_rank "$SLURM_NODEID"' in script and "--main_process_ip \"$MAIN_HOST\"" in script
    assert not (run_dir / "slurm").exists(), "--dry-run wrote files"

    assert main(["launch", str(path), "--slurm", "--gpus-per-node", "2", "--dry-run"]) == 0
    single = capsys.readouterr().out
    assert [line for line in single.splitlines() if line.startswith("#SBATCH")] == [
        "#SBATCH --job-name=cpt-tiny", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=2",
        f"#SBATCH --output={run_dir}/slurm/%j.out", "#SBATCH --open-mode=append"]
    assert "scontrol show hostnames" not in single
    assert "--num_processes 2 --num_machines 1 --machine_rank 0" in single

    # CPU nodes: no GPU line; one process per node.
    assert main(["launch", str(path), "--slurm", "--nodes", "3", "--gpus-per-node", "0", "--workers", "2",
                 "--dry-run"]) == 0
    cpu = capsys.readouterr().out
    assert "--gpus-per-node" not in cpu and "--num_processes $((SLURM_NNODES * 1))" in cpu
    assert f"CPT=(run {path} --auto-resume --workers 2)" in cpu


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
    (["--gpus-per-node", "two"], "--gpus-per-node: expected a whole number from 0, got 'two'"),
    (["--workers", "0"], "--workers: expected a positive number of processes, got 0"),
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


def test_two_gpu_node_runs_two_processes_stub(base_recipe, tmp_path):
    """GPU counts, on stub slurm: a 1-node x 2-GPU job runs `accelerate launch` with 2 processes (CPU here, gloo)."""
    recipe, root = base_recipe
    run_dir = tmp_path / "gpus"
    path = write_recipe(tmp_path / "gpus.yaml", recipe | {"run": recipe["run"] | {"dir": str(run_dir),
                                                                                  "data_dir": str(tmp_path / "data")},
                                                           "stages": [recipe["stages"][0]]})
    assert main(["prepare", str(path)]) == 0  # prepared: the stub would run a preparation array as one job
    env = install_stubs(tmp_path)
    record = Path(env["STUB_DIR"])
    result = cpt("launch", str(path), "--slurm", "--gpus-per-node", "2", "train.micro_batch=2", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "submitted job 1000" in result.stdout and "(1 node(s) x 2 GPU(s))" in result.stdout
    assert calls(record, "sbatch") == [["--parsable", str(run_dir / "slurm" / "launch.sbatch")]]
    assert calls(record, "srun") == [["--nodes=1", "--ntasks=1", sys.executable, "-m", "accelerate.commands.launch",
                                      "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--machine_rank",
                                      "0", "--main_process_ip", "127.0.0.1", "--main_process_port", "11000", "-m",
                                      "cpt", "run", str(path), "train.micro_batch=2", "--auto-resume"]]
    log = (run_dir / "slurm" / "1000.out").read_text()
    assert (record / "exit_code").read_text() == "0", log[-3000:]
    assert "global batch 8 = micro-batch 2 x grad_accum 2 x 2 process(es)" in log
    assert [r["step"] for r in read_rows(run_dir) if r["kind"] == "train"] == list(range(1, 7))


# --- a real slurm cluster --------------------------------------------------------------------------------------

def launch(slurm, path: Path, *args: str, env: dict[str, str] | None = None, printed: list | None = None) -> str:
    """``cpt launch PATH --slurm --gpus-per-node 0 ARGS`` submitted to the test cluster; returns the job id (and
    appends what it printed to ``printed``)."""
    result = cpt("launch", str(path), "--slurm", "--gpus-per-node", "0", *args, env={**slurm.env, **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    if printed is not None:
        printed.append(result.stdout)
    return result.stdout.split("submitted job ")[1].split(":")[0]


def wait_for_step(slurm, job: str, run_dir: Path, step: int, timeout: float = 240) -> None:
    """Wait until the running job has logged training step ``step``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = read_rows(run_dir) if (run_dir / "metrics.jsonl").exists() else []
        if any(r["kind"] == "train" and r["step"] >= step for r in rows):
            return
        state = slurm.job(job)["JobState"]
        assert state in ("PENDING", "RUNNING"), f"job {job} is {state} before step {step}: {job_log(run_dir, job)[-3000:]}"
        time.sleep(0.05)
    raise TimeoutError(f"job {job} did not reach step {step} in {timeout} s")


def job_log(run_dir: Path, job: str) -> str:
    path = run_dir / "slurm" / f"{job}.out"
    return path.read_text(errors="replace") if path.exists() else "(no log)"


def finished(slurm, job: str, run_dir: Path, state: str = "COMPLETED") -> dict[str, str]:
    info = slurm.wait(job)
    assert info["JobState"] == state, f"job {job}: {info['JobState']} {info.get('Reason')}\n{job_log(run_dir, job)[-4000:]}"
    return info


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_rows(run_dir) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def cpu_run(slurm, base_recipe):
    """The recipe as a real slurm job on one CPU node: one process, no launcher. The reference of the tests below."""
    path, run_dir = recipe_at(base_recipe, "cpu")
    printed = []
    job = launch(slurm, path, "--nodes", "1", "--prepare-tasks", "2", printed=printed)
    waiting = slurm.job(job)
    return run_dir, job, finished(slurm, job, run_dir), printed[0], waiting


def test_cpu_job_trains_the_recipe_and_finishes(slurm, cpu_run):
    """The data was not prepared: `cpt launch` submitted its preparation (an array of 2 CPU jobs, then the job
    that assembles the corpora) and the training job after it (afterok)."""
    run_dir, job, info, printed, waiting = cpu_run
    array, assemble = (line.split(":")[0].split()[-1] for line in printed.splitlines()[:2])
    assert printed.startswith(f"submitted prepare-tasks array {array}: ") and f"submitted prepare {assemble}: " in printed
    assert waiting["Dependency"] == f"afterok:{assemble}(unfulfilled)"
    tasks = slurm.wait_all(array)
    assert len(tasks) == 2 and {t["JobState"] for t in tasks} == {"COMPLETED"}
    assert slurm.job(assemble)["JobState"] == "COMPLETED"
    assert max(t["EndTime"] for t in tasks) <= slurm.job(assemble)["StartTime"] <= info["StartTime"]
    assert info["ExitCode"] == "0:0" and info["NumNodes"] == "1" and info["NodeList"] in ("n1", "n2")
    log = job_log(run_dir, job)
    assert "global batch 8 = micro-batch 4 x grad_accum 2 x 1 process(es)" in log
    assert [r["step"] for r in read_rows(run_dir) if r["kind"] == "train"] == list(range(1, 67))
    assert (run_dir / "checkpoints" / "cpt" / "step-66" / "meta.json").is_file()
    assert (run_dir / "report" / "index.html").is_file()


def test_two_node_job_runs_one_launcher_per_node_and_matches_one_process(slurm, cpu_run, base_recipe):
    """Two nodes x one CPU process: `accelerate launch` on each node (machine ranks 0 and 1 from SLURM_NODEID), the
    ranks meeting at the first node's NodeAddr over gloo. The same global batch (2 x 2 micro-batches x 2 ranks
    against 4 x 2 on one process) gives the same losses to float rounding: DDP averages the two ranks' gradients
    where one process sums its micro-batches, float additions in another order. The first step's losses differ
    in the last bit (7.6e-8 relative, measured on an AMD EPYC), and training at lr 1e-2 amplifies such
    differences, up to 9.8e-5 by step 66. Hence two bounds with 100x and 10x margins: 1e-5 over the first 20
    steps, where only rounding can differ, and 1e-3 over all 66; a wrong batch or a rank's lost gradient moves
    the loss by 1e-2 and more from the first step on."""
    reference = cpu_run[0]
    path, run_dir = recipe_at(base_recipe, "two-nodes")
    job = launch(slurm, path, "--nodes", "2", "train.micro_batch=2")
    info = finished(slurm, job, run_dir)
    assert info["NumNodes"] == "2" and info["NodeList"] == "n[1-2]"
    log = job_log(run_dir, job)
    assert "global batch 8 = micro-batch 2 x grad_accum 2 x 2 process(es)" in log
    ours, theirs = train_losses(run_dir), train_losses(reference)
    assert [step for step, _ in ours] == [step for step, _ in theirs] == list(range(1, 67))
    assert [loss for _, loss in ours[:20]] == pytest.approx([loss for _, loss in theirs[:20]], rel=1e-5)
    assert [loss for _, loss in ours] == pytest.approx([loss for _, loss in theirs], rel=1e-3)
    evals = [(r["step"], r["set"]) for r in read_rows(run_dir) if r["kind"] == "eval"]
    assert evals == [(r["step"], r["set"]) for r in read_rows(reference) if r["kind"] == "eval"]


def test_sigusr1_checkpoints_requeues_and_resumes_bit_identically(slurm, cpu_run, base_recipe):
    """What slurm does --grace seconds before the time limit, sent now: SIGUSR1 to the batch shell, which passes it
    to the job step; cpt writes a checkpoint at the next step and exits 75; the script asks slurm to requeue the
    job, which runs again (Restarts=1) and resumes: every row as in the uninterrupted run, none twice."""
    reference = cpu_run[0]
    path, run_dir = recipe_at(base_recipe, "requeued")
    job = launch(slurm, path, "--nodes", "1", "--requeue", "--time", "10", "--grace", "60")
    wait_for_step(slurm, job, run_dir, 12)
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    # slurm holds a requeued job back (BeginTime, about two minutes on); let it start again in 3 s. Not at once:
    # the node refuses to start a job whose credential was issued in the second its last run's was revoked.
    deadline = time.time() + 60
    while (info := slurm.job(job))["JobState"] != "PENDING" or info["Restarts"] != "1":
        assert time.time() < deadline and info["JobState"] in ("RUNNING", "COMPLETING", "REQUEUED", "PENDING"), info
        time.sleep(0.1)
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now+3")
    info = finished(slurm, job, run_dir)
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0"
    log = job_log(run_dir, job)
    stopped = [line for line in log.splitlines() if "stopping on SIGUSR1" in line]
    assert len(stopped) == 1, log[-3000:]
    step = int(stopped[0].split("at global step ")[1].split(":")[0])
    assert 12 <= step < 66 and f"exit code {preemption.EXIT_CODE}" in stopped[0]
    checkpoint = run_dir / "checkpoints" / ("pretrain" if step <= 6 else "cpt") / f"step-{step}"
    assert json.loads((checkpoint / "meta.json").read_text())["global_step"] == step
    assert f"cpt: SIGUSR1: checkpointing, then requeueing job {job}" in log and f"resuming from {checkpoint}" in log
    assert comparable(read_rows(run_dir)) == comparable(read_rows(reference))


def checkpoint_files(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_scancel_then_a_failing_job_then_a_fresh_launch_continues(slurm, cpu_run, base_recipe):
    """scancel mid-stage; a relaunch whose recipe was broken after submission (an unknown stage key) ends FAILED with
    exit code 2 and leaves the newest intact checkpoint as it was; fixed, a fresh `cpt launch --resume` continues
    from that checkpoint to the uninterrupted run's rows."""
    reference = cpu_run[0]
    path, run_dir = recipe_at(base_recipe, "cancelled")
    job = launch(slurm, path, "--nodes", "1")
    wait_for_step(slurm, job, run_dir, 30)  # past the step-25 checkpoint
    slurm.run("scancel", job)
    finished(slurm, job, run_dir, "CANCELLED")
    meta, newest = latest_intact(run_dir)
    assert meta["global_step"] >= 25
    before = checkpoint_files(newest)

    good = path.read_text()
    # Both nodes busy, so that the job waits in the queue while its recipe is broken.
    blocker = slurm.run("sbatch", "--parsable", "--nodes=2", "--output=/dev/null", "--wrap", "sleep 300").stdout.strip()
    held = launch(slurm, path, "--nodes", "1", "--resume")
    assert slurm.job(held)["JobState"] == "PENDING"
    broken = yaml.safe_load(good)
    broken["stages"][1]["stepz"] = 60
    path.write_text(yaml.safe_dump(broken, sort_keys=False))
    slurm.run("scancel", blocker)
    info = finished(slurm, held, run_dir, "FAILED")
    assert info["ExitCode"] == "2:0"
    log = job_log(run_dir, held)
    assert "cpt: error: " in log and "stepz" in log and "Traceback" not in log
    assert latest_intact(run_dir)[1] == newest and checkpoint_files(newest) == before

    path.write_text(good)
    again = launch(slurm, path, "--nodes", "1", "--resume")
    finished(slurm, again, run_dir)
    assert f"resuming from {newest}" in job_log(run_dir, again)
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


def test_sweep_scripts_hold_the_arrays_to_run(tiny_corpora, tmp_path, capsys):
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

    assert main(["sweep", str(path), "--slurm", "--gpus-per-node", "2"]) == 2
    assert "one process on one GPU" in capsys.readouterr().err
    for point, message in (("4", "the sweep has 4 grid points, 0 to 3"), ("-1", "0 to 3")):
        assert main(["sweep", str(path), "--point", point]) == 2
        assert message in capsys.readouterr().err
    assert main(["sweep", str(path), "--base", "h23"]) == 2
    assert "no size 'h23' (did you mean 'h32'?)" in capsys.readouterr().err


def test_sweep_runs_the_base_array_then_the_dependent_points_array(slurm, tiny_corpora, tmp_path):
    """`cpt sweep --slurm` on the real cluster: the base runs' array, then the grid points' array that depends on it
    (slurm starts no point before every base task ended); each task runs its run with --workers passed on;
    results.csv gets every point's rows; a second `cpt sweep --slurm` submits nothing."""
    path = sweep_file(tmp_path, tiny_corpora, ["pretrain", "cpt"])
    result = cpt("sweep", str(path), "--slurm", "--gpus-per-node", "0", "--workers", "2", env=slurm.env)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = dict(re.findall(r"^submitted (\w+) array (\d+):", result.stdout, re.M))
    assert list(jobs) == ["base", "points"], result.stdout
    bases, points = slurm.wait_all(jobs["base"]), slurm.wait_all(jobs["points"])
    assert len(bases) == 2 and len(points) == 4
    for task in bases + points:
        assert (task["JobState"], task["ExitCode"]) == ("COMPLETED", "0:0"), task
    assert min(t["StartTime"] for t in points) >= max(t["EndTime"] for t in bases)
    assert {t["Dependency"] for t in points} <= {"(null)", f"afterany:{jobs['base']}(unfulfilled)",
                                                   f"afterany:{jobs['base']}"}
    logs = tmp_path / "sweep" / "logs"
    assert "--workers 2" in (logs / "base-h16.log").read_text().splitlines()[0]
    rows = read_results(tmp_path / "sweep" / "results.csv")
    ids = ["h16-r0.2", "h16-r0.9", "h32-r0.2", "h32-r0.9"]
    assert sorted((r["run_id"], r["status"], r["step"]) for r in rows) == [(i, "ok", str(s)) for i in ids
                                                                            for s in (0, 3, 6)]
    again = cpt("sweep", str(path), "--slurm", "--gpus-per-node", "0", env=slurm.env)
    assert again.returncode == 0 and "all 4 runs finished" in again.stdout and "submitted" not in again.stdout


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


def test_an_installed_cpt_renders_its_scripts_without_the_checkout(base_recipe, tmp_path):
    """The templates are package data: cpt built and installed from a copy of the project's files (as `pip install .`
    does, into a directory outside the checkout) renders and checks a launch script; before, it looked for them
    in the source tree's slurm/ and could not."""
    root = Path(__file__).resolve().parent.parent
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    source = tmp_path / "source"
    for name in files:
        if (root / name).is_file() and not name.startswith("tests/"):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((root / name).read_bytes())
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--target", str(site), str(source)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    assert sorted(p.name for p in (site / "cpt" / "slurm_templates").iterdir()) == [
        "multi-node.sbatch", "single-node.sbatch", "sweep-array.sbatch"]
    path, run_dir = recipe_at(base_recipe, "installed")
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import cpt; print(cpt.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert where.stdout.strip() == str(site / "cpt" / "__init__.py"), where.stderr
    shown = subprocess.run([sys.executable, "-m", "cpt", "launch", str(path), "--slurm", "--nodes", "2", "--dry-run"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "#SBATCH --nodes=2" in shown.stdout and f"CPT=(run {path} --auto-resume)" in shown.stdout


def test_prepare_runs_as_an_array_then_assembles_the_same_corpus(slurm, tiny_corpora, tmp_path):
    """`cpt prepare --slurm --tasks 2`: two array tasks tokenize alternate tasks of the standard library's sources
    (about 40 tasks of 200 KB), then a job assembles them: the corpus is byte for byte what one local
    `cpt prepare` writes."""
    recipe = tiny_recipe(tiny_corpora, tmp_path / "run")
    recipe["corpora"]["code"] = {"source": "python-stdlib", "val_fraction": 0.05}
    recipe["tokenizer"]["train"]["corpora"] = ["english"]
    recipe["data"] = {"task_mb": 0.2}
    local = write_recipe(tmp_path / "local.yaml", recipe | {"run": recipe["run"] | {"data_dir": str(tmp_path / "l")}})
    arrayed = write_recipe(tmp_path / "array.yaml", recipe | {"run": recipe["run"] | {"data_dir": str(tmp_path / "a")}})
    assert main(["prepare", str(arrayed), "--slurm", "--tasks", "2", "--dry-run"]) == 0
    assert not (tmp_path / "a").exists()
    result = cpt("prepare", str(arrayed), "--slurm", "--tasks", "2", env=slurm.env)
    assert result.returncode == 0, result.stderr[-3000:]
    array, assemble = (line.split(":")[0].split()[-1] for line in result.stdout.splitlines()[:2])
    assert main(["prepare", str(local)]) == 0
    tasks = slurm.wait_all(array)
    assert [(t["JobState"], t["ExitCode"]) for t in tasks] == [("COMPLETED", "0:0")] * 2
    assert slurm.wait(assemble)["JobState"] == "COMPLETED", (tmp_path / "a" / "slurm").iterdir()
    logs = {p.name: p.read_text() for p in (tmp_path / "a" / "slurm").glob("*-tasks-*.out")}
    assert len(logs) == 2 and all("(part" in text for text in logs.values())
    [reference] = (tmp_path / "l").glob("code-*")
    shards = sorted(p.name for p in (reference / "shards").glob("*.bin"))
    assert len(shards) >= 20
    assert corpus_bytes(tmp_path / "a" / reference.name) == corpus_bytes(reference)
