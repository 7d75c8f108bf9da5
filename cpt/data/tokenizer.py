"""Tokenizers: load a local Hugging Face tokenizer, or train a sentencepiece model on the recipe's corpora.

A trained tokenizer is saved in Hugging Face format (so checkpoints load with ``AutoTokenizer``) and cached
by a fingerprint of its settings and of the corpora it was trained on.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal, Optional

from cpt.config import check, field
from cpt.errors import CptError, space_for


# Part of a trained tokenizer's fingerprint: bump it when the trainer's settings change, so that tokenizers
# cached by an older cpt are retrained instead of reused (2: no dummy prefix, exact round trip).
TRAINER_VERSION = 2
# A saved tokenizer takes about this many times the bytes of its sentencepiece model (4.2x measured for a
# 512-token BPE model: tokenizer.model, tokenizer.json, the configs); a full disk is told this much is needed.
SAVED_SIZE_FACTOR = 5


@dataclass
class TrainTokenizerConfig:
    kind: Literal["sentencepiece"] = field("sentencepiece", doc="tokenizer trainer")
    vocab_size: int = field(8192, doc="vocabulary size, special and byte-fallback tokens included")
    model_type: Literal["bpe", "unigram"] = field("bpe", doc="sentencepiece model type")
    corpora: Optional[list[str]] = field(None, doc="corpora to train on (default: all the recipe's corpora)")
    max_chars_per_corpus: int = field(20_000_000, doc="characters read from each corpus for training")

    def __post_init__(self):
        check(300 <= self.vocab_size <= 1_000_000, "vocab_size", f"must be in [300, 1000000], got {self.vocab_size}")
        check(self.max_chars_per_corpus > 0, "max_chars_per_corpus", "must be positive")


@dataclass
class TokenizerConfig:
    path: Optional[str] = field(None, doc="a local Hugging Face tokenizer directory")
    train: Optional[TrainTokenizerConfig] = field(None, doc="train a tokenizer on the recipe's corpora instead")

    def __post_init__(self):
        check(not (self.path and self.train), "path", "give either tokenizer.path or tokenizer.train, not both")


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of everything that decides token ids: the fast tokenizer's full JSON, or the vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def load_tokenizer(path: str | Path):
    """Load a local Hugging Face tokenizer directory (never from the Hub)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise CptError(f"tokenizer directory '{path}' does not exist; set tokenizer.path to a local HF tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CptError(f"could not load a tokenizer from '{path}': {str(e).splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise CptError(f"tokenizer at '{path}' has no EOS token; cpt separates documents with it")
    return tokenizer


def train_sentencepiece(config: TrainTokenizerConfig, texts: Iterable[str], fingerprint: str, out_dir: Path):
    """Train a sentencepiece model and save it as a Hugging Face tokenizer (Llama for BPE) in ``out_dir``.

    Reuses ``out_dir`` when it already holds a tokenizer trained with the same ``fingerprint``. The
    settings keep text exactly recoverable (identity normalisation, byte fallback, whitespace kept, no dummy
    prefix), which code needs, and the saved tokenizer gives the sentencepiece model's own ids.

    Raises:
        CptError: sentencepiece cannot train on the text (too little of it for the vocabulary), or what
            ``texts`` raised while training read it (a malformed corpus file), unchanged.
        DiskFullError: ``out_dir``'s disk is full; the tokenizer that was there, if any, is intact.
    """
    import sentencepiece as spm

    stamp = out_dir / "cpt_fingerprint.txt"
    if stamp.is_file() and stamp.read_text().strip() == fingerprint:
        return load_tokenizer(out_dir)
    model = io.BytesIO()
    failed: list[BaseException] = []
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_remembering(texts, failed), model_writer=model, vocab_size=config.vocab_size,
            model_type=config.model_type, byte_fallback=True, split_digits=True, remove_extra_whitespaces=False,
            add_dummy_prefix=False, normalization_rule_name="identity", allow_whitespace_only_pieces=True,
            max_sentence_length=1 << 24, input_sentence_size=1_000_000, shuffle_input_sentence=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=2, minloglevel=2,
        )
    except RuntimeError as e:
        if failed:
            # sentencepiece wraps what the iterator raised in a RuntimeError holding its traceback as text; the
            # reader's own error (a malformed JSONL line, garbage bytes) is the one to show, as it was raised.
            raise failed[0] from None
        raise CptError(f"sentencepiece training failed: {str(e).strip()}; lower tokenizer.train.vocab_size "
                       "or add text") from None
    if failed:
        raise failed[0]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with space_for(out_dir, "the trained tokenizer", SAVED_SIZE_FACTOR * len(model.getvalue())):
        tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=out_dir.parent))
        try:
            (tmp / "tokenizer.model").write_bytes(model.getvalue())
            _hf_tokenizer(model.getvalue(), config.model_type, tmp).save_pretrained(tmp)
            (tmp / "cpt_fingerprint.txt").write_text(fingerprint + "\n")
            if out_dir.exists():
                shutil.rmtree(out_dir)
            tmp.rename(out_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return load_tokenizer(out_dir)


def _remembering(texts: Iterable[str], failed: list[BaseException]) -> Iterator[str]:
    """``texts``, keeping in ``failed`` what iterating them raised (sentencepiece turns it into text)."""
    try:
        yield from texts
    except BaseException as e:
        failed.append(e)
        raise


def _hf_tokenizer(model_proto: bytes, model_type: str, tmp: Path):
    """The Hugging Face tokenizer that reproduces a sentencepiece model (also saved as ``tmp/tokenizer.model``)."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    if model_type == "bpe":
        # add_prefix_space=False matches add_dummy_prefix=False: Llama's default would prepend "▁" to text that
        # does not start with a space and strip one leading space on decode, losing a document's first space.
        return LlamaTokenizer.from_pretrained(tmp, add_bos_token=False, add_eos_token=False, add_prefix_space=False)
    # LlamaTokenizer is BPE only; a unigram model is rebuilt from its pieces and scores. Control and byte
    # pieces get a prohibitive score: sentencepiece never matches them against text ("</s>" in a document is
    # text, not EOS), while the tokenizers Unigram model would match them by their score.
    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    vocab = [(sp.id_to_piece(i), -1e9 if sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i) else sp.get_score(i))
             for i in range(sp.get_piece_size())]
    backend = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=sp.id_to_piece(sp.unk_id()),
                                   bos_token=sp.id_to_piece(sp.bos_id()), eos_token=sp.id_to_piece(sp.eos_id()))
