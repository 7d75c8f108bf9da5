"""Tests for cpt.data.prepare: shards and the trained tokenizer are cached by content fingerprint; `cpt prepare`."""

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import sentencepiece as spm
from conftest import corpus_bytes, tiny_recipe, write_recipe

from cpt.cli import main
from cpt.data import prepare as prepare_module
from cpt.data.prepare import prepare
from cpt.data.shards import SPLITS, TokenShard
from cpt.recipe import load_recipe


def snapshot(data_dir: Path) -> dict[str, int]:
    """Every file under ``data_dir`` with its modification time in ns (rewritten files get a new one)."""
    return {str(p.relative_to(data_dir)): p.stat().st_mtime_ns for p in sorted(data_dir.rglob("*")) if p.is_file()}


class Setup:
    """A private copy of the tiny corpora and a recipe over it, prepared into ``tmp_path/data``."""

    def __init__(self, corpora: Path, tmp_path: Path, tokenizer_corpora: list[str] | None = None):
        self.corpora = tmp_path / "corpora"
        shutil.copytree(corpora, self.corpora)
        self.raw = tiny_recipe(self.corpora, tmp_path / "run")
        if tokenizer_corpora:
            self.raw["tokenizer"]["train"]["corpora"] = tokenizer_corpora
        self.tmp_path = tmp_path
        self.data_dir = tmp_path / "data"

    def prepare(self):
        recipe, base_dir = load_recipe(write_recipe(self.tmp_path / "tiny.yaml", self.raw))
        return prepare(recipe, base_dir, self.data_dir)


def total_bytes(shard) -> int:
    return sum(counts["bytes"] for counts in shard.manifest["splits"].values())


def no_call(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} was called although everything was cached")
    return fail


def test_second_prepare_reuses_everything(tiny_corpora, tmp_path, monkeypatch):
    setup = Setup(tiny_corpora, tmp_path)
    first = setup.prepare()
    before = snapshot(setup.data_dir)
    assert {p.split("/")[0] for p in before} == {"tokenizer", first.corpora["english"].path.name,
                                                  first.corpora["code"].path.name, ".prepare.lock"}
    monkeypatch.setattr(prepare_module, "write_corpus", no_call("write_corpus"))
    monkeypatch.setattr(spm.SentencePieceTrainer, "train", no_call("sentencepiece training"))
    second = setup.prepare()
    assert second.tokenizer_fingerprint == first.tokenizer_fingerprint
    for name in ("english", "code"):
        assert second.corpora[name].path == first.corpora[name].path
        assert np.array_equal(second.corpora[name].train.tokens, first.corpora[name].train.tokens)
    assert snapshot(setup.data_dir) == before


def test_changed_source_file_retokenizes_only_its_corpus(tiny_corpora, tmp_path):
    # The tokenizer is trained on English only, so changing a code file leaves it (and English) untouched.
    setup = Setup(tiny_corpora, tmp_path, tokenizer_corpora=["english"])
    first = setup.prepare()
    before = snapshot(setup.data_dir)
    target = setup.corpora / "code" / "bisect.py"
    target.write_text(target.read_text() + "\n# one more line\n")
    second = setup.prepare()
    assert second.tokenizer_fingerprint == first.tokenizer_fingerprint
    assert second.corpora["english"].path == first.corpora["english"].path
    assert second.corpora["code"].path != first.corpora["code"].path
    assert second.corpora["code"].manifest["source_fingerprint"] != first.corpora["code"].manifest["source_fingerprint"]
    assert total_bytes(second.corpora["code"]) == total_bytes(first.corpora["code"]) + len("\n# one more line\n")
    after = snapshot(setup.data_dir)
    unchanged = {p: t for p, t in before.items() if not p.startswith(first.corpora["code"].path.name)}
    assert {p: after[p] for p in unchanged} == unchanged, "the tokenizer and English shard must not be rewritten"


def test_changed_training_corpus_retrains_the_tokenizer(tiny_corpora, tmp_path):
    setup = Setup(tiny_corpora, tmp_path, tokenizer_corpora=["english"])
    setup.prepare()
    stamp = (setup.data_dir / "tokenizer" / "cpt_fingerprint.txt").read_text()
    with open(setup.corpora / "english.jsonl", "a") as f:
        f.write('{"text": "A new chapter of plain English text."}\n')
    setup.prepare()
    assert (setup.data_dir / "tokenizer" / "cpt_fingerprint.txt").read_text() != stamp


def test_changed_vocab_size_retrains_and_retokenizes(tiny_corpora, tmp_path):
    setup = Setup(tiny_corpora, tmp_path)
    first = setup.prepare()
    setup.raw["tokenizer"]["train"]["vocab_size"] = 600
    second = setup.prepare()
    assert len(second.tokenizer) == 600
    assert second.tokenizer_fingerprint != first.tokenizer_fingerprint
    for name in ("english", "code"):
        shard = second.corpora[name]
        assert shard.path != first.corpora[name].path
        assert shard.manifest["tokenizer_fingerprint"] == second.tokenizer_fingerprint
        assert shard.manifest["vocab_size"] == 600


@pytest.mark.parametrize("key, value", [("val_fraction", 0.3), ("val_max_docs", 1), ("split_seed", 1)])
def test_changed_split_setting_retokenizes_that_corpus(tiny_corpora, tmp_path, key, value):
    setup = Setup(tiny_corpora, tmp_path)
    first = setup.prepare()
    setup.raw["corpora"]["english"][key] = value
    second = setup.prepare()
    assert second.tokenizer_fingerprint == first.tokenizer_fingerprint
    assert second.corpora["code"].path == first.corpora["code"].path
    assert second.corpora["english"].path != first.corpora["english"].path
    split = second.corpora["english"].manifest["split"]
    assert split[{"split_seed": "seed"}.get(key, key)] == value


def test_tokenizer_by_path_reuses_shards_of_the_same_tokenizer(tiny_corpora, tmp_path, monkeypatch):
    # Shards are keyed by the tokenizer's content, not by how the recipe names it.
    setup = Setup(tiny_corpora, tmp_path)
    first = setup.prepare()
    shutil.copytree(setup.data_dir / "tokenizer", tmp_path / "my-tokenizer")
    setup.raw["tokenizer"] = {"path": str(tmp_path / "my-tokenizer")}
    monkeypatch.setattr(prepare_module, "write_corpus", no_call("write_corpus"))
    second = setup.prepare()
    assert second.tokenizer_fingerprint == first.tokenizer_fingerprint
    assert {n: s.path for n, s in second.corpora.items()} == {n: s.path for n, s in first.corpora.items()}


def test_cli_workers_reach_write_shard_and_change_no_byte(tiny_corpora, tmp_path, monkeypatch, capsys):
    setup = Setup(tiny_corpora, tmp_path)
    one = setup.prepare()
    workers = []
    write_shard = prepare_module.write_corpus

    def spy(*args, **kwargs):
        workers.append(kwargs["workers"])
        return write_shard(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "write_corpus", spy)
    assert main(["prepare", str(tmp_path / "tiny.yaml"), f"run.data_dir={tmp_path / 'two'}", "--workers", "2"]) == 0
    assert workers == [2, 2]
    printed = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    for name, shard in one.corpora.items():
        two = Path(printed[name])
        assert two.parent == tmp_path / "two"
        assert two.name == shard.path.name, "the worker count must not be part of the fingerprint"
        assert corpus_bytes(two) == corpus_bytes(shard.path)


@pytest.mark.parametrize("command", ["prepare", "run"])
@pytest.mark.parametrize("workers", ["0", "-2"])
def test_cli_refuses_workers_below_one_in_one_line(recipe_file, capsys, command, workers):
    assert main([command, str(recipe_file), "--workers", workers]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"cpt: error: --workers: expected a positive number of processes, got {workers}\n"
    assert not (recipe_file.parent / "run").exists()


@pytest.mark.parametrize("kib, fails, finished", [(20, "the trained tokenizer", []),
                                                  (100, "the token shard of corpus 'code'", ["english", "tokenizer"])])
def test_full_disk_is_one_line_and_a_bigger_disk_finishes(tiny_corpora, tmp_path, small_disk, capsys, kib, fails,
                                                          finished):
    """A tmpfs too small for the tokenizer (20 KiB), or for the second corpus (100 KiB: the tokenizer and 'english'
    fit): one line, nothing half-written, and the same disk made bigger finishes without redoing what was done."""
    setup = Setup(tiny_corpora, tmp_path)
    reference = setup.prepare()
    capsys.readouterr()  # what that logged (to a handler an earlier test's main() may have left on a closed stream)
    recipe = str(write_recipe(tmp_path / "tiny.yaml", setup.raw))
    disk = small_disk(kib)
    assert main(["prepare", recipe, f"run.data_dir={disk}"]) == 2
    out, err = capsys.readouterr()
    [line] = [line for line in err.splitlines() if line.startswith("cpt: error:")]
    assert err.endswith(line + "\n")
    target = disk / ("tokenizer" if fails.endswith("tokenizer") else reference.corpora["code"].path.name)
    assert line.startswith(f"cpt: error: no space left on the device writing {fails} to {target} (")
    assert "KiB needed" in line and "Traceback" not in err
    left = sorted(p.name for p in disk.iterdir() if p.name != ".prepare.lock")
    assert [name.split("-")[0] for name in left] == finished, "no hidden temporary directory, no half shard"
    done = snapshot(disk)
    for name in left:
        assert (disk / name / ("cpt_fingerprint.txt" if name == "tokenizer" else "manifest.json")).is_file()

    subprocess.run(["mount", "-o", "remount,size=1024k", str(disk)], check=True)
    assert main(["prepare", recipe, f"run.data_dir={disk}"]) == 0
    capsys.readouterr()
    after = snapshot(disk)
    assert {k: after[k] for k in done} == done, "what was finished before is reused, not rewritten"
    for name, shard in reference.corpora.items():
        assert corpus_bytes(disk / shard.path.name) == corpus_bytes(shard.path)


PREPARE_ONE = """
import signal
import sys
import time
from cpt.cli import main
sys.exit(main(["prepare", sys.argv[1], "run.data_dir=" + sys.argv[2]]))
"""


def test_processes_sharing_a_data_directory_prepare_one_at_a_time(tiny_corpora, tmp_path):
    """Two `cpt prepare`s into one data directory at once (a sweep's array tasks): the second waits for the first and
    reuses its tokenizer and shards; before the lock, both trained the tokenizer and one's rename failed."""
    setup = Setup(tiny_corpora, tmp_path)
    recipe = str(write_recipe(tmp_path / "tiny.yaml", setup.raw))
    procs = [subprocess.Popen([sys.executable, "-c", PREPARE_ONE, recipe, str(setup.data_dir)], stderr=subprocess.PIPE,
                              text=True)
             for _ in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    both = "\n".join(errs)
    assert both.count("reusing") >= len(setup.raw["corpora"]), "one of them reused the other's shards"
    assert not [p for p in setup.data_dir.iterdir() if p.name.startswith(".") and p.name != ".prepare.lock"]


PREPARE_TASKS = """
import signal
import sys
import time
from cpt.cli import main
sys.exit(main(["prepare", sys.argv[1], "run.data_dir=" + sys.argv[2], "--workers", sys.argv[3]]))
"""


def test_a_killed_preparation_continues_to_the_same_bytes(tiny_corpora, tmp_path):
    """The standard library's sources (about 40 tasks of 200 KB) prepared once uninterrupted, and once killed
    with SIGKILL after a few shards (2 worker processes) and run again with 2 workers: the rerun keeps the finished shards, and the
    corpus is byte for byte the uninterrupted one (shards, ranges, per-document tables)."""
    setup = Setup(tiny_corpora, tmp_path)
    setup.prepare()
    raw = dict(setup.raw, tokenizer={"path": str(setup.data_dir / "tokenizer")})
    raw["corpora"] = {"english": raw["corpora"]["english"], "code": {"source": "python-stdlib", "val_fraction": 0.05}}
    raw["data"] = {"task_mb": 0.2}  # python-stdlib in about 40 tasks
    recipe = str(write_recipe(tmp_path / "stdlib.yaml", raw))

    def run(data_dir: Path, workers: int = 1) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", PREPARE_TASKS, recipe, str(data_dir), str(workers)],
                                stderr=subprocess.PIPE, text=True)

    whole = run(tmp_path / "whole")
    assert whole.wait(timeout=600) == 0, whole.stderr.read()[-2000:]
    [reference] = (tmp_path / "whole").glob("code-*")
    shards = len(list((reference / "shards").glob("*.bin")))
    assert shards >= 20

    killed = run(tmp_path / "killed", workers=2)  # its workers must die with it, not hold the task's lock
    deadline = time.time() + 300
    workers = []
    while len(list((tmp_path / "killed").glob(".code-*.partial/shards/*.docs.npz"))) < 3 or not workers:
        assert killed.poll() is None and time.time() < deadline, "finished before it could be killed"
        time.sleep(0.005)
        workers = psutil.Process(killed.pid).children(recursive=True)  # a task's pool, while it tokenizes
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    # Its tokenizing processes die with it (they would hold the locks they inherited and block the rerun).
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert workers and not alive
    [partial] = (tmp_path / "killed").glob(".code-*.partial")
    done = len(list((partial / "shards").glob("*.docs.npz")))
    assert 3 <= done < shards
    again = run(tmp_path / "killed", workers=2)
    err = again.communicate(timeout=600)[1]
    assert again.returncode == 0, err[-2000:]
    assert f"continuing an interrupted preparation: {done} of {shards} shard(s) done" in err
    assert not list((tmp_path / "killed").glob(".code-*"))
    assert corpus_bytes(tmp_path / "killed" / reference.name) == corpus_bytes(reference)


@pytest.mark.parametrize("args, message", [
    (["--task", "2", "--tasks", "2"], "--task 2: expected 0 <= I < N with --tasks N, got --tasks 2"),
    (["--task", "0"], "--task 0: expected 0 <= I < N with --tasks N, got --tasks None"),
    (["--tasks", "2"], "--tasks N without --slurm needs --task I"),
    (["--slurm", "--task", "0", "--tasks", "2"], "cpt prepare --slurm needs --tasks N (the array's size) and no --task"),
    (["--slurm", "--tasks", "0"], "--tasks: expected a positive number of array tasks, got 0"),
    (["--partition", "cpu"], "--partition is a slurm job option: add --slurm to submit it as a job"),
])
def test_prepare_parts_are_checked_in_one_line(recipe_file, capsys, args, message):
    assert main(["prepare", str(recipe_file), *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"cpt: error: {message}") and err.count("\n") == 1, err
    assert not (recipe_file.parent / "run").exists()


def test_parts_of_a_preparation_then_the_whole_give_the_same_corpus(tiny_corpora, tmp_path, capsys):
    """What the array tasks of `cpt prepare --slurm --tasks 3` run, here one after another: each part writes its
    tasks' shards and no corpus; the plain `cpt prepare` after them tokenizes nothing and assembles. English is one
    JSONL file, cut into byte ranges of 10 KB: its token stream is that of the file read whole."""
    setup = Setup(tiny_corpora, tmp_path)
    reference = setup.prepare()
    raw = dict(setup.raw, data={"task_mb": 0.01})  # the 10 code files in 3+ tasks, english.jsonl in 4+ ranges
    recipe = str(write_recipe(tmp_path / "parts.yaml", raw))
    for part in range(3):
        assert main(["prepare", recipe, f"run.data_dir={tmp_path / 'parts'}", "--task", str(part), "--tasks", "3"]) == 0
    assert capsys.readouterr().out == ""  # no corpus is finished yet
    assert not list((tmp_path / "parts").glob("code-*"))
    assert main(["prepare", recipe, f"run.data_dir={tmp_path / 'parts'}"]) == 0
    err = capsys.readouterr().err
    for name, least in (("code", 3), ("english", 4)):
        shards = len(list((tmp_path / "parts").glob(f"{name}-*/shards/*.bin")))
        assert shards >= least and f"continuing an interrupted preparation: {shards} of {shards} shard(s) done" in err
    whole = setup.data_dir.parent / "whole"
    assert main(["prepare", recipe, f"run.data_dir={whole}"]) == 0
    for name, shard in reference.corpora.items():
        [parts] = (tmp_path / "parts").glob(f"{name}-*")
        assert corpus_bytes(parts) == corpus_bytes(whole / parts.name)
        for split in SPLITS:  # and the token stream of the one-shard corpus
            assert np.array_equal(np.asarray(getattr(TokenShard.open(parts), split).tokens),
                                  np.asarray(getattr(shard, split).tokens))


def test_a_preparation_left_for_changed_sources_is_removed_unless_it_is_being_written(tiny_corpora, tmp_path):
    """Part 0 of 3 leaves a corpus's finished shards as a kill would; after a source file changes, the next
    preparation (another fingerprint) removes them, except while a process holds one of their task locks."""
    import fcntl
    import os

    setup = Setup(tiny_corpora, tmp_path)
    setup.raw["data"] = {"task_mb": 0.01}
    recipe = str(write_recipe(tmp_path / "parts.yaml", setup.raw))
    data = f"run.data_dir={setup.data_dir}"
    assert main(["prepare", recipe, data, "--task", "0", "--tasks", "3"]) == 0
    [left] = setup.data_dir.glob(".code-*.partial")
    assert list((left / "shards").glob("*.docs.npz"))
    (setup.corpora / "code" / "bisect.py").write_text("changed = True\n")
    fd = os.open(next((left / "shards").glob(".*.lock")), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a process writing that task would
    try:
        assert main(["prepare", recipe, data]) == 0
        assert left.is_dir()
    finally:
        os.close(fd)
    (setup.corpora / "code" / "bisect.py").write_text("changed = 2\n")
    assert main(["prepare", recipe, data]) == 0
    assert not left.exists() and not list(setup.data_dir.glob(".*.partial"))
    assert len(list(setup.data_dir.glob("code-*"))) == 2  # both changed versions, prepared
