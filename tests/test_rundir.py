"""The run directory is the user's: --overwrite removes only what cpt wrote, one process at a time holds it,
a start that failed is no run to protect, and a full disk is one line with the finished work intact."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cpt import rundir
from cpt.checkpoint import verify_checkpoint
from cpt.errors import CptError

from conftest import read_rows, run_cpt as cpt, tiny_recipe, write_recipe


def one_line_error(result, *parts: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    err = result.stderr.strip().splitlines()[-1]
    assert err.startswith("cpt: error: ") and "Traceback" not in result.stderr, result.stderr[-3000:]
    for part in parts:
        assert part in err, err


@pytest.fixture(scope="module")
def short(tiny_corpora, tmp_path_factory):
    """``make(name, **changes)``: a 2+2-step tiny recipe with its run in ROOT/NAME (data shared in ROOT/data)."""
    root = tmp_path_factory.mktemp("rundir")

    def make(name: str, pretrain: int = 2, cpt_steps: int = 2, checkpoint: dict | None = None, **run) -> Path:
        recipe = tiny_recipe(tiny_corpora, root / name, pretrain=pretrain, cpt=cpt_steps)
        recipe["data"] = {"max_epochs": 1000}
        if checkpoint:
            recipe["checkpoint"] = checkpoint
        recipe["eval"]["every"] = 1000
        recipe["run"].update(data_dir=str(root / "data"), **run)
        return write_recipe(root / f"{name}.yaml", recipe)
    return make, root


def test_overwrite_removes_only_what_cpt_wrote(short):
    make, root = short
    path, run_dir = make("mine"), root / "mine"
    assert cpt("run", str(path)).returncode == 0
    (run_dir / "report" / "q3.xlsx").write_bytes(b"the user's own table")
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "checkpoints" / "cpt" / "keep-this").mkdir()
    result = cpt("run", str(path), "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "removing the run" in result.stderr and "kept" in result.stderr and "q3.xlsx" in result.stderr
    assert (run_dir / "report" / "q3.xlsx").read_bytes() == b"the user's own table"
    assert (run_dir / "notes.txt").read_text() == "mine" and (run_dir / "checkpoints" / "cpt" / "keep-this").is_dir()
    steps = [r["step"] for r in read_rows(run_dir) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]  # the new run's rows only
    assert (run_dir / "report" / "curves.png").is_file()


def test_overwrite_never_follows_a_link_nor_clears_a_directory_cpt_did_not_make(short, tmp_path):
    make, root = short
    path, run_dir = make("linked"), root / "linked"
    assert cpt("run", str(path)).returncode == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "metrics.jsonl").write_text("precious\n")
    (elsewhere / "curves.png").write_text("precious")
    for name in [p.name for p in (run_dir / "report").iterdir()]:
        (run_dir / "report" / name).unlink()
    (run_dir / "report").rmdir()
    (run_dir / "report").symlink_to(elsewhere)
    one_line_error(cpt("run", str(path), "--overwrite"), "is a symbolic link")
    assert (elsewhere / "metrics.jsonl").read_text() == "precious\n" and (elsewhere / "curves.png").exists()
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "run.json").is_file()

    # A directory with cpt's output names but no run.json of cpt's: nothing is removed.
    foreign = tmp_path / "foreign"
    (foreign / "checkpoints").mkdir(parents=True)
    (foreign / "checkpoints" / "model.bin").write_text("theirs")
    (foreign / "metrics.jsonl").write_text('{"kind": "train"}\n')
    one_line_error(cpt("run", str(path), "--overwrite", f"run.dir={foreign}"), "is not a cpt run")
    assert (foreign / "checkpoints" / "model.bin").read_text() == "theirs"
    assert (foreign / "metrics.jsonl").read_text() == '{"kind": "train"}\n'


def test_a_start_that_failed_is_replaced_without_overwrite(short, tiny_corpora):
    make, root = short
    path, run_dir = make("retry"), root / "retry"
    one_line_error(cpt("run", str(path), "corpora.code.source=" + str(tiny_corpora / "missing")), "missing")
    assert (run_dir / "run.json").is_file() and not rundir.has_progress(run_dir)
    result = cpt("run", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stopped before its first training step" in result.stderr


def test_run_dir_that_is_a_file_is_one_line(short, tmp_path):
    make, _ = short
    (tmp_path / "afile").write_text("x")
    one_line_error(cpt("run", str(make("unused")), f"run.dir={tmp_path / 'afile' / 'run'}"), "is a file")


def test_one_process_at_a_time_holds_a_run_directory(short):
    """While `cpt run` trains, a second run, `--overwrite`, resume and branch into its directory are refused
    with the holder's pid and host, and its files are untouched; the lock goes with the process."""
    make, root = short
    path, run_dir = make("busy", pretrain=2, cpt_steps=3000, checkpoint={"every": 1, "keep_last": 1}), root / "busy"
    proc = subprocess.Popen([sys.executable, "-m", "cpt", "run", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run_dir / "metrics.jsonl").exists() or not any(
                r["kind"] == "train" and r["step"] >= 3 for r in read_rows(run_dir)):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        holder = f"pid {proc.pid} on host {socket.gethostname()}"
        for args in (["run", str(path)], ["run", str(path), "--overwrite"], ["resume", str(run_dir)],
                     ["run", str(path), "--auto-resume"]):
            one_line_error(cpt(*args), "is in use by", holder)
        assert proc.poll() is None and (run_dir / "run.json").is_file()
        steps = [r["step"] for r in read_rows(run_dir) if r["kind"] == "train"]
        assert steps == list(range(1, len(steps) + 1))  # no second writer
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    result = cpt("resume", str(run_dir), "stages.cpt.steps=6")  # the lock died with its holder
    assert "is in use" not in result.stderr


def test_lock_is_exclusive_within_the_kernels_rules(tmp_path):
    with rundir.locked(tmp_path / "run"):
        info = json.loads((tmp_path / "run" / rundir.LOCK).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        other = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from cpt import rundir\n"
                                "with rundir.locked(Path(sys.argv[1])): pass", str(tmp_path / "run")],
                               capture_output=True, text=True)
        assert other.returncode == 1 and f"pid {os.getpid()}" in other.stderr
    with rundir.locked(tmp_path / "run"):  # released
        pass


def test_stale_staging_directories_are_removed_at_resume(tmp_path):
    run_dir = tmp_path / "run"
    stale = run_dir / "checkpoints" / "cpt" / ".step-50-k2j3"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 100)
    kept = run_dir / "checkpoints" / "cpt" / "step-40"
    kept.mkdir()
    rundir.remove_stale_staging(run_dir)
    assert not stale.exists() and kept.is_dir()


def test_a_full_disk_in_a_checkpoint_is_one_line_and_the_previous_one_stays(short, small_disk):
    make, root = short
    disk = small_disk(1200)
    path = make("full", pretrain=2, cpt_steps=6, dir=str(disk / "run"), checkpoint={"every": 2, "keep_last": 1})
    result = cpt("run", str(path))
    one_line_error(result, "no space left on the device writing", "free", "needed")
    checkpoints = sorted((disk / "run" / "checkpoints").glob("*/step-*"))
    assert checkpoints and all(verify_checkpoint(p) is None for p in checkpoints)
    assert not list((disk / "run" / "checkpoints").glob("*/.step-*"))  # no half-written one left


def test_a_full_disk_in_resumes_metrics_rewrite_leaves_the_file(small_disk):
    disk = small_disk(64)
    metrics = disk / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"kind": "train", "step": i, "pad": "x" * 100}) + "\n" for i in range(300)))
    before = metrics.read_bytes()
    with pytest.raises(CptError, match="no space left"):
        rundir.keep_rows(metrics, 290)
    assert metrics.read_bytes() == before and not (disk / "metrics.tmp").exists()


def test_export_refuses_a_file_and_a_metrics_row_that_does_not_fit_is_one_line(short, small_disk, tmp_path):
    make, root = short
    run_dir = root / "exported"
    assert cpt("run", str(make("exported"))).returncode == 0
    final = run_dir / "checkpoints" / "cpt" / "step-4"
    (tmp_path / "model").write_text("not a directory")
    one_line_error(cpt("export", str(final), str(tmp_path / "model")), "is a file")
    assert (tmp_path / "model").read_text() == "not a directory"

    from cpt.metrics import MetricsLogger, WandbConfig

    disk = small_disk(16)
    metrics = MetricsLogger(disk, WandbConfig(), "run", {})
    with pytest.raises(CptError, match="no space left on the device writing a metrics row"):
        for step in range(10_000):
            metrics.log({"kind": "train", "step": step, "pad": "x" * 200})
    metrics.close()
    assert read_rows(disk)  # the complete rows before it are all there
