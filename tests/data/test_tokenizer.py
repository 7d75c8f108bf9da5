"""Tests for cpt.data.tokenizer: a trained sentencepiece tokenizer is exact, matches its model, loads, and is cached."""

import os
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from conftest import run_cpt, tiny_recipe, write_recipe

from cpt.data.sources import CorpusConfig, iter_documents
from cpt.data.tokenizer import TrainTokenizerConfig, load_tokenizer, tokenizer_fingerprint, train_sentencepiece
from cpt.errors import CptError

SAMPLES = [
    "def f(x):\n\tif x:\n\t\treturn  x   + 1\n",
    "    indented = [1,  2,   3]\n\n\n# trailing spaces   \n",
    "  leading spaces, then text",
    " ",
    "\n",
    "a\r\nb\r\n",
    "In the beginning God created the heaven and the earth.",
    "naïve café — 日本語のテキスト 🙂 Ωμέγα",
    "a literal </s> and <s> and <unk> and <0x41> in text",
]


def encode(tokenizer, text: str) -> list[int]:
    """Encode as cpt's shards do: no BOS/EOS added, special-token strings in the text kept as text."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


@pytest.fixture(scope="module")
def corpus_texts(tiny_corpora) -> list[str]:
    english = iter_documents(CorpusConfig(source=str(tiny_corpora / "english.jsonl")))
    code = iter_documents(CorpusConfig(source=str(tiny_corpora / "code")))
    return [*english, *code]


@pytest.fixture(scope="module")
def trained(corpus_texts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_sentencepiece(TrainTokenizerConfig(vocab_size=512), corpus_texts, "fp-512", out)
    return out


@pytest.fixture(scope="module")
def tokenizer(trained):
    return load_tokenizer(trained)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(tokenizer, text):
    assert tokenizer.decode(encode(tokenizer, text)) == text


def test_round_trip_every_corpus_document(tokenizer, corpus_texts):
    for text in corpus_texts:
        assert tokenizer.decode(encode(tokenizer, text)) == text


def test_ids_equal_the_sentencepiece_model(trained, tokenizer, corpus_texts):
    sp = spm.SentencePieceProcessor(model_file=str(trained / "tokenizer.model"))
    assert len(tokenizer) == sp.get_piece_size() == 512
    for text in SAMPLES + corpus_texts[:3] + corpus_texts[-3:]:
        assert encode(tokenizer, text) == sp.encode(text), text


def test_special_token_text_is_not_a_control_token(tokenizer):
    ids = encode(tokenizer, "x </s> y <s> z <unk>")
    assert not {tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id} & set(ids)


def test_loads_with_auto_tokenizer(trained, tokenizer):
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(trained, local_files_only=True)
    sp = spm.SentencePieceProcessor(model_file=str(trained / "tokenizer.model"))
    assert auto.eos_token == "</s>"
    assert auto.eos_token_id == tokenizer.eos_token_id == sp.eos_id() == 2
    for text in SAMPLES:
        assert encode(auto, text) == encode(tokenizer, text)
    assert tokenizer_fingerprint(auto) == tokenizer_fingerprint(tokenizer)


def test_train_returns_what_load_gives(trained, corpus_texts, tmp_path):
    out = tmp_path / "tokenizer"
    fresh = train_sentencepiece(TrainTokenizerConfig(vocab_size=512), corpus_texts, "fp-512", out)
    assert tokenizer_fingerprint(fresh) == tokenizer_fingerprint(load_tokenizer(trained))
    assert (out / "cpt_fingerprint.txt").read_text().strip() == "fp-512"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tokenizer-")], "temporary directory left behind"


def test_fingerprint_is_stable_and_tracks_vocab(trained, tokenizer, corpus_texts, tmp_path):
    fingerprint = tokenizer_fingerprint(tokenizer)
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0
    assert tokenizer_fingerprint(load_tokenizer(trained)) == fingerprint
    other = train_sentencepiece(TrainTokenizerConfig(vocab_size=600), corpus_texts, "fp-600", tmp_path / "tok600")
    assert len(other) == 600
    assert tokenizer_fingerprint(other) != fingerprint


def test_same_fingerprint_reuses_without_training(trained, corpus_texts, tmp_path, monkeypatch):
    out = tmp_path / "tokenizer"
    shutil.copytree(trained, out)
    before = {p.name: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in [out, *out.iterdir()]}

    def no_training(*args, **kwargs):
        raise AssertionError("sentencepiece was retrained although the fingerprint matched")

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", no_training)
    reused = train_sentencepiece(TrainTokenizerConfig(vocab_size=512), corpus_texts, "fp-512", out)
    assert tokenizer_fingerprint(reused) == tokenizer_fingerprint(load_tokenizer(trained))
    assert {p.name: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in [out, *out.iterdir()]} == before
    # A different fingerprint does train (and so hits the patched trainer).
    with pytest.raises(AssertionError, match="retrained"):
        train_sentencepiece(TrainTokenizerConfig(vocab_size=512), corpus_texts, "another", out)


def test_new_fingerprint_replaces_the_directory(trained, corpus_texts, tmp_path):
    out = tmp_path / "tokenizer"
    shutil.copytree(trained, out)
    (out / "stale.txt").write_text("from the old tokenizer")
    retrained = train_sentencepiece(TrainTokenizerConfig(vocab_size=600), corpus_texts, "fp-600", out)
    assert len(retrained) == 600
    assert (out / "cpt_fingerprint.txt").read_text().strip() == "fp-600"
    assert not (out / "stale.txt").exists()


def test_unigram_round_trips_and_follows_its_model(corpus_texts, tmp_path):
    out = tmp_path / "unigram"
    tokenizer = train_sentencepiece(TrainTokenizerConfig(vocab_size=512, model_type="unigram"), corpus_texts, "u", out)
    assert type(tokenizer.backend_tokenizer.model).__name__ == "Unigram"
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    for text in SAMPLES:
        assert tokenizer.decode(encode(tokenizer, text)) == text
    assert not {0, 1, 2} & set(encode(tokenizer, "x </s> y <s> z <unk> <0x41>"))
    # Two Viterbi implementations may break ties between equal-score segmentations differently; anything
    # but near-total agreement means the pieces or scores were not carried over.
    same = sum(encode(tokenizer, text) == sp.encode(text) for text in corpus_texts)
    assert same >= 0.9 * len(corpus_texts)


def test_vocab_too_large_for_the_text_is_a_cpt_error(tmp_path):
    with pytest.raises(CptError, match="vocab_size"):
        train_sentencepiece(TrainTokenizerConfig(vocab_size=5000), ["tiny text"] * 3, "fp", tmp_path / "tok")
    assert not list(tmp_path.iterdir())


def test_load_tokenizer_missing_directory(tmp_path):
    with pytest.raises(CptError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")


def test_load_tokenizer_empty_directory(tmp_path):
    with pytest.raises(CptError, match="could not load a tokenizer"):
        load_tokenizer(tmp_path)


def test_an_error_reading_the_texts_passes_through_unchanged(corpus_texts, tmp_path):
    problem = CptError("corpus.jsonl line 7: not valid JSON")

    def texts():
        yield from corpus_texts
        raise problem

    with pytest.raises(CptError) as info:
        train_sentencepiece(TrainTokenizerConfig(vocab_size=512), texts(), "fp", tmp_path / "tok")
    assert info.value is problem and "vocab_size" not in str(info.value)
    assert not list(tmp_path.iterdir())


def test_prepare_with_a_malformed_jsonl_line_says_only_that(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine text"}\n{"text": oops}\n')
    recipe = tiny_recipe(tmp_path, tmp_path / "run")
    recipe["corpora"] = {"english": {"source": str(tmp_path / "bad.jsonl")}}
    recipe["eval"]["sets"] = {"upstream": "english"}
    recipe["stages"] = [{"name": "only", "steps": 2, "mixture": {"english": 1.0}}]
    done = run_cpt("prepare", str(write_recipe(tmp_path / "bad.yaml", recipe)))
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("cpt: error:")]
    assert errors == [f"cpt: error: {tmp_path / 'bad.jsonl'} line 2: not valid JSON (Expecting value: line 1 column 10 "
                      "(char 9)); each line must be one JSON object"]
    assert "Traceback" not in done.stderr and "vocab_size" not in done.stderr
    assert done.stderr.endswith(errors[0] + "\n")
