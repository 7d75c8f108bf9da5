"""Corpora that are already tokens: Megatron ``.bin``/``.idx`` datasets and OLMo-style ``.npy`` token memmaps, read
in place.

Preparing such a corpus copies no tokens. It reads the files once to find the documents (Megatron's index; the
EOS tokens of an OLMo memmap), checks every id against the recipe's tokenizer, holds out documents by a seeded
hash of their token bytes (as text corpora are held out by a hash of their text), and writes the split as a small
index of ranges into the user's files (``ranges.npz`` beside ``manifest.json``). Training then gathers its windows
through :class:`TokenRanges`, a read-only view that behaves like one flat token array per split.

Layouts read (the formats' own documentation and writers):

- Megatron (``megatron/core/datasets/indexed_dataset.py``): ``PREFIX.idx`` is ``b"MMIDIDX\\x00\\x00"``, a
  little-endian u64 version (1), a u8 dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16), u64
  sequence count S, u64 document count D, then int32 lengths[S], int64 byte pointers[S] into ``PREFIX.bin`` and
  int64 document_indices[D] (sequence boundaries, starting at 0). Document ``i`` is sequences
  ``document_indices[i]:document_indices[i + 1]``. A document that does not end with EOS (written without
  ``--append-eod``) is followed by a virtual EOS, so documents stay separated as in cpt's own shards.
- OLMo / Dolma (``olmo_core.data.numpy_dataset``): a flat memmap of token ids (``dtype`` from the recipe, no
  header; a true ``.npy`` with a header is read too), each document ending with EOS.

The fingerprint of such a corpus is each file's size, modification time and the sha256 of its first and last MiB:
hashing 10^9 tokens on every start would cost minutes.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cpt.errors import CptError

TOKEN_FORMATS = ("megatron", "olmo")
MEGATRON_HEADER = b"MMIDIDX\x00\x00"
MEGATRON_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
RANGES = "ranges.npz"
_EDGE = 1 << 20


def is_tokens(config) -> bool:
    """Whether a corpus config names token files rather than text."""
    return config.format in TOKEN_FORMATS


@dataclass
class TokenFile:
    """One token file and its documents as ``(start, length)`` in tokens; ``ends_with_eos`` per document."""

    path: Path
    dtype: np.dtype
    offset: int  # bytes before the first token (a .npy header)
    starts: np.ndarray
    lengths: np.ndarray

    def tokens(self) -> np.ndarray:
        return memmap_tokens(self.path, self.dtype, self.offset)


def memmap_tokens(path: Path, dtype: np.dtype, offset: int = 0) -> np.ndarray:
    """The tokens of ``path`` after ``offset`` header bytes, memory-mapped (an empty array for none)."""
    size = (path.stat().st_size - offset) // dtype.itemsize
    if size == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(size,))


def token_files(config, base_dir: Path | None) -> list[Path]:
    """The data files of a token corpus, sorted: each Megatron ``.bin`` (its ``.idx`` beside it), or each
    ``.npy`` memmap. ``source`` is a file, a Megatron prefix, a directory or a glob.

    Raises:
        CptError: nothing matches, or a Megatron ``.bin`` has no ``.idx``.
    """
    path = Path(config.source).expanduser()
    path = path if path.is_absolute() else (base_dir or Path.cwd()) / path
    suffix = ".bin" if config.format == "megatron" else ".npy"
    if config.format == "megatron" and path.suffix in (".bin", ".idx"):
        path = path.with_suffix("")
    if config.format == "megatron" and Path(str(path) + ".bin").is_file():
        files = [Path(str(path) + ".bin")]
    elif path.is_dir():
        files = sorted(p for p in path.rglob(f"*{suffix}") if p.is_file())
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        files = [p for p in files if p.suffix == suffix] if config.format == "megatron" else files
    if not files:
        example = "PREFIX (with PREFIX.bin and PREFIX.idx)" if config.format == "megatron" else "a .npy token file"
        raise CptError(f"corpus source '{config.source}' matches no {config.format} token files; give {example}, "
                       "a directory or a glob")
    for file in files:
        if config.format == "megatron" and not file.with_suffix(".idx").is_file():
            raise CptError(f"Megatron dataset '{file}' has no index {file.with_suffix('.idx')}; give both files")
    return files


def fingerprint(config, base_dir: Path | None) -> str:
    """sha256 of the reading options and, per file, its name, size, mtime and first and last MiB."""
    options = {name: getattr(config, name) for name in ("source", "format", "dtype", "max_docs")}
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for data in token_files(config, base_dir):
        for path in ([data, data.with_suffix(".idx")] if config.format == "megatron" else [data]):
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
            with open(path, "rb") as f:
                digest.update(f.read(_EDGE))
                if stat.st_size > _EDGE:
                    f.seek(max(_EDGE, stat.st_size - _EDGE))
                    digest.update(f.read())
    return digest.hexdigest()


def read_megatron(bin_path: Path) -> TokenFile:
    """A Megatron dataset's documents from its ``.idx``.

    Raises:
        CptError: the index is not a Megatron index, or does not fit its ``.bin``.
    """
    idx = bin_path.with_suffix(".idx")
    raw = idx.read_bytes()
    head = len(MEGATRON_HEADER) + 8 + 1 + 8 + 8
    if len(raw) < head or not raw.startswith(MEGATRON_HEADER):
        raise CptError(f"'{idx}' is not a Megatron index (no MMIDIDX header); give the .idx written with its .bin")
    version, code, sequences, documents = struct.unpack("<QBQQ", raw[len(MEGATRON_HEADER):head])
    if version != 1 or code not in MEGATRON_DTYPES:
        raise CptError(f"'{idx}': Megatron index version {version} with dtype code {code} is not one cpt reads "
                       f"(version 1, codes {sorted(MEGATRON_DTYPES)})")
    dtype = np.dtype(MEGATRON_DTYPES[code])
    if len(raw) < head + sequences * 12 + documents * 8:
        raise CptError(f"'{idx}' is truncated: {sequences:,} sequences and {documents:,} documents do not fit its "
                       f"{len(raw):,} bytes")
    lengths = np.frombuffer(raw, np.int32, sequences, head).astype(np.int64)
    pointers = np.frombuffer(raw, np.int64, sequences, head + sequences * 4)
    bounds = np.frombuffer(raw, np.int64, documents, head + sequences * 12)
    if documents < 1 or bounds[0] != 0 or bounds[-1] != sequences or np.any(np.diff(bounds) < 0):
        raise CptError(f"'{idx}': its document index does not cover its {sequences:,} sequences")
    ends = pointers // dtype.itemsize + lengths
    if sequences and ends.max() * dtype.itemsize > bin_path.stat().st_size:
        raise CptError(f"'{bin_path}' is shorter than its index says ({bin_path.stat().st_size:,} bytes); the "
                       ".bin and .idx do not belong together, or the .bin was cut")
    cumulative = np.concatenate([[0], np.cumsum(lengths)])
    doc_first, doc_last = bounds[:-1], bounds[1:]
    keep = doc_last > doc_first
    starts = (pointers[doc_first[keep]] // dtype.itemsize).astype(np.int64)
    doc_lengths = cumulative[doc_last[keep]] - cumulative[doc_first[keep]]
    # A document's sequences are written one after another; check, since the view assumes it.
    contiguous = pointers[1:] // dtype.itemsize == ends[:-1]
    inner = np.ones(sequences, dtype=bool)
    inner[doc_first[doc_first < sequences]] = False
    if sequences > 1 and not np.all(contiguous[inner[1:]]):
        raise CptError(f"'{idx}': a document's sequences are not stored one after another in the .bin")
    return TokenFile(bin_path, dtype, 0, starts, doc_lengths)


def read_olmo(path: Path, dtype: str | None, eos: int) -> TokenFile:
    """An OLMo-style token memmap's documents: the runs ending with EOS (a last run without one is a document).

    Raises:
        CptError: a headerless file without ``dtype`` in the recipe, or a size that is not whole tokens.
    """
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        array = np.load(path, mmap_mode="r")
        if array.ndim != 1 or array.dtype.kind not in "ui":
            raise CptError(f"'{path}' holds a {array.ndim}-d {array.dtype} array; a token file is 1-d integers")
        file_dtype, offset = array.dtype, array.offset
    else:
        if dtype is None:
            raise CptError(f"'{path}' is a raw token memmap: set the corpus's dtype (uint16 or uint32, as it was "
                           "written)")
        file_dtype, offset = np.dtype(dtype), 0
    size = path.stat().st_size - offset
    if size % file_dtype.itemsize:
        raise CptError(f"'{path}' is {size:,} bytes, not a whole number of {file_dtype} tokens; is dtype right?")
    tokens = memmap_tokens(path, file_dtype, offset)
    ends = []
    for start in range(0, len(tokens), 1 << 24):
        ends.append(np.flatnonzero(tokens[start:start + (1 << 24)] == eos) + start + 1)
    ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
    if len(tokens) and (not len(ends) or ends[-1] != len(tokens)):
        ends = np.append(ends, len(tokens))
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64) if len(ends) else np.zeros(0, np.int64)
    return TokenFile(path, file_dtype, offset, starts, (ends - starts).astype(np.int64))


class TokenRanges:
    """A read-only flat token array made of ranges of memory-mapped files, each range optionally followed by a
    virtual EOS token. Indexing with an int, a slice or an integer array reads only the tokens asked for (one
    ``searchsorted`` over the ranges, then one fancy read per file), as a memmap does."""

    def __init__(self, files: list[np.ndarray], file_of: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                 eos_after: np.ndarray, eos: int, dtype: np.dtype):
        self.files, self.eos, self.dtype = files, eos, np.dtype(dtype)
        self.file_of, self.starts, self.lengths = file_of, starts, lengths
        self.extent = lengths + eos_after  # tokens each range contributes
        self.offsets = np.concatenate([[0], np.cumsum(self.extent)]).astype(np.int64)
        self.shape = (int(self.offsets[-1]),)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self._gather(np.arange(*key.indices(len(self)), dtype=np.int64))
        if np.isscalar(key):
            return self._gather(np.asarray([key], dtype=np.int64))[0]
        return self._gather(np.asarray(key, dtype=np.int64))

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def _gather(self, index: np.ndarray) -> np.ndarray:
        flat = index.reshape(-1)
        flat = np.where(flat < 0, flat + len(self), flat)
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"token index out of range for {len(self)} tokens")
        piece = np.searchsorted(self.offsets, flat, side="right") - 1
        within = flat - self.offsets[piece]
        virtual = within >= self.lengths[piece]
        physical = self.starts[piece] + np.minimum(within, np.maximum(self.lengths[piece] - 1, 0))
        out = np.empty(flat.shape, dtype=self.dtype)
        which = self.file_of[piece]
        for f in np.unique(which):
            mask = which == f
            out[mask] = self.files[f][physical[mask]]
        out[virtual] = self.eos
        return out.reshape(index.shape)


def ranges_of(documents: list[tuple[int, int, int, bool]]) -> dict[str, np.ndarray]:
    """``(file, start, length, needs_eos)`` per document, in order, as arrays of maximal ranges: consecutive
    documents that follow each other in one file and end with EOS merge into one range."""
    file_of, starts, lengths, eos_after = [], [], [], []
    for f, start, length, needs_eos in documents:
        if file_of and not eos_after[-1] and file_of[-1] == f and starts[-1] + lengths[-1] == start:
            lengths[-1] += length
            eos_after[-1] = int(needs_eos)
            continue
        file_of.append(f)
        starts.append(start)
        lengths.append(length)
        eos_after.append(int(needs_eos))
    return {"file_of": np.asarray(file_of, np.int32), "starts": np.asarray(starts, np.int64),
            "lengths": np.asarray(lengths, np.int64), "eos_after": np.asarray(eos_after, np.int64)}


def open_ranges(path: Path, manifest: dict, split: str) -> TokenRanges:
    """The ``split`` of a prepared token corpus as a :class:`TokenRanges` over the user's files.

    Raises:
        CptError: a file changed size since it was prepared (its ranges would read other tokens).
    """
    files = []
    for entry in manifest["token_files"]:
        file = path / entry["path"]  # relative: a shard of the corpus's own; absolute: a user's file
        if not file.is_file() or file.stat().st_size != entry["size"]:
            if not Path(entry["path"]).is_absolute():
                raise CptError(f"token shard '{file}' is missing or truncated; delete '{path}' and run `cpt prepare`")
            raise CptError(f"token file '{file}' is missing or changed since it was prepared into '{path}'; run "
                           "`cpt prepare` again")
        files.append(memmap_tokens(file, np.dtype(entry["dtype"]), entry["offset"]))
    with np.load(path / RANGES) as ranges:
        arrays = {k: ranges[f"{split}_{k}"] for k in ("file_of", "starts", "lengths", "eos_after")}
    return TokenRanges(files, **arrays, eos=manifest["eos_id"], dtype=manifest["dtype"])


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` with fixed zip timestamps, so the same arrays always give the same bytes."""
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for key, array in arrays.items():
            with archive.open(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w") as f:
                np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)


def prepare_tokens(name: str, config, base_dir: Path | None, out_dir: Path, tokenizer, made_with, fingerprint_: str,
                   info: dict) -> None:
    """Find the documents of a token corpus, check its ids and tokenizer, split it by document and write
    ``out_dir`` (a manifest and the ranges of each split), atomically.

    Raises:
        CptError: the corpus was tokenized with another tokenizer than the recipe's, holds ids the tokenizer
            does not have, or has no documents.
    """
    import shutil
    import tempfile

    from cpt.data.shards import held_out_bytes
    from cpt.data.tokenizer import tokenizer_fingerprint

    if tokenizer_fingerprint(made_with) != tokenizer_fingerprint(tokenizer):
        raise CptError(f"corpus '{name}' was tokenized with the tokenizer in '{config.tokenizer}' ({len(made_with):,} "
                       f"tokens, {type(made_with).__name__}), not with this recipe's ({len(tokenizer):,} tokens, "
                       f"{getattr(tokenizer, 'name_or_path', '')}); train with the tokenizer the tokens were made "
                       "with (tokenizer.path, or the model's own), or tokenize the text again")
    eos, vocab = tokenizer.eos_token_id, len(tokenizer)
    paths = token_files(config, base_dir)
    files = [read_megatron(p) if config.format == "megatron" else read_olmo(p, config.dtype, eos) for p in paths]
    dtypes = {f.dtype for f in files}
    if len(dtypes) > 1:
        raise CptError(f"corpus '{name}': its token files mix dtypes {sorted(map(str, dtypes))}; give one dtype")
    dtype = dtypes.pop()
    splits = {"train": [], "val": []}
    counts = {s: {"documents": 0, "tokens": 0, "bytes": 0} for s in splits}
    val_docs, total, seen_max = 0, 0, -1
    for f_index, file in enumerate(files):
        tokens = file.tokens()
        for start, length in zip(file.starts.tolist(), file.lengths.tolist()):
            if config.max_docs is not None and total == config.max_docs:
                break
            doc = tokens[start:start + length]
            if length == 0:
                continue
            seen_max = max(seen_max, int(doc.max()))
            needs_eos = int(doc[-1]) != eos
            held = (held_out_bytes(doc.tobytes(), config.split_seed, config.val_fraction)
                    and (config.val_max_docs is None or val_docs < config.val_max_docs))
            split = "val" if held else "train"
            val_docs += held
            total += 1
            splits[split].append((f_index, start, length, needs_eos))
            counts[split]["documents"] += 1
            counts[split]["tokens"] += length + needs_eos
            if held:  # bits per byte need the text's bytes: decode the held-out documents
                text = doc if needs_eos else doc[:-1]
                counts["val"]["bytes"] += len(tokenizer.decode(text.tolist()).encode("utf-8"))
    if seen_max >= vocab:
        raise CptError(f"corpus '{name}' holds token id {seen_max:,}, beyond the tokenizer's {vocab:,} ids; the "
                       "files were not made with this tokenizer (or dtype is wrong)")
    if counts["train"]["documents"] == 0:
        raise CptError(f"corpus '{name}': no training documents in {len(files)} token file(s)")
    # Train bytes are estimated at the held-out documents' bytes per token (decoding every token would cost
    # as much as tokenizing again); the manifest says so.
    per_token = counts["val"]["bytes"] / max(counts["val"]["tokens"], 1)
    counts["train"]["bytes"] = int(round(counts["train"]["tokens"] * per_token))
    arrays = {f"{split}_{k}": v for split, docs in splits.items() for k, v in ranges_of(docs).items()}
    manifest = {"corpus": name, "format_version": info["format_version"], "fingerprint": fingerprint_,
                "dtype": str(dtype), "eos_id": eos, "splits": counts, "bytes_estimated": ["train"],
                "in_place": config.format,
                "token_files": [{"path": str(f.path.resolve()), "size": f.path.stat().st_size, "dtype": str(f.dtype),
                                 "offset": f.offset} for f in files],
                **{k: v for k, v in info.items() if k != "format_version"}}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        save_arrays(tmp / RANGES, **arrays)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
