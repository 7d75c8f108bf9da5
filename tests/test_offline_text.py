"""Tests for scripts/offline_text.py (the Debian text corpora of scripts/results_smollm2.py): roff pages rendered
to their running text, sources interleaved in proportion to their size, the JSONL written whole."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "offline_text.py"


@pytest.fixture(scope="module")
def offline_text():
    spec = importlib.util.spec_from_file_location("offline_text", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["offline_text"] = module
    spec.loader.exec_module(module)
    return module


MAN_PAGE = r""".\" -*- coding: UTF-8 -*-
.TH LS 1 "September 2022" "GNU coreutils 9.1" "Dienstprogramme für Benutzer"
.SH BEZEICHNUNG
ls \- Verzeichnisinhalte auflisten
.SH ÜBERSICHT
\fBls\fP [\fI\,OPTION\/\fP]… [\fI\,DATEI\/\fP]…
.SH BESCHREIBUNG
.\" Add any additional description here
.PP
Einträge, die mit \(Bq.\(lq beginnen \(em nicht \fB\-\-all\fP.
.TP
.BR \-a ", " \-\-all
alle auflisten
.IP "\(bu" 2
Punkt
"""

MDOC_PAGE = r""".Dd $Mdocdate$
.Dt SSH-KEYGEN 1
.Os
.Sh BEZEICHNUNG
.Nm ssh-keygen
.Nd Werkzeug
.Sh ÜBERSICHT
.Nm
.Op Fl q
.Op Fl b Ar Bits
.Pp
Siehe
.Xr ssh 1 .
"""


def test_roff_man_macros_become_running_text(offline_text):
    assert offline_text.roff_to_text(MAN_PAGE) == (
        "BEZEICHNUNG\nls - Verzeichnisinhalte auflisten\n\n"
        "ÜBERSICHT\nls [OPTION]… [DATEI]…\n\n"
        "BESCHREIBUNG\n\n"
        "Einträge, die mit .“ beginnen — nicht --all.\n\n"
        "-a, --all\nalle auflisten\n\n•\nPunkt")


def test_roff_mdoc_macros_keep_their_words(offline_text):
    assert offline_text.roff_to_text(MDOC_PAGE) == (
        "BEZEICHNUNG\nssh-keygen\n\nWerkzeug\n\nÜBERSICHT\nssh-keygen\n-q\n-b Bits\n\nSiehe\nssh 1.")


def test_interleave_keeps_every_prefix_in_proportion(offline_text):
    sources = {"big": ["x" * 30] * 10, "small": ["y" * 10] * 10}  # 300 and 100 characters: 3 to 1
    order = [name for name, _ in offline_text.interleave(sources)]
    assert sorted(order) == ["big"] * 10 + ["small"] * 10
    given = {"big": 0, "small": 0}
    for name in order:
        given[name] += 30 if name == "big" else 10
        # after each document, neither source is more than one document ahead of its share
        assert abs(given["big"] / 300 - given["small"] / 100) <= 0.1 + 1e-9


def test_write_corpus_is_jsonl_with_sources_and_counts(offline_text, tmp_path):
    stats = offline_text.write_corpus(tmp_path / "c.jsonl", {"de": ["Grüße", "zwei"], "en": ["one"]})
    lines = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted((r["source"], r["text"]) for r in lines) == [("de", "Grüße"), ("de", "zwei"), ("en", "one")]
    assert stats == {"de": {"documents": 2, "chars": 9, "bytes": 11}, "en": {"documents": 1, "chars": 3, "bytes": 3}}
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_package_is_one_line_naming_the_install(offline_text):
    with pytest.raises(offline_text.OfflineTextError, match=r"^package no-such-pkg-cpt is not installed; install it "
                                                            r"with: apt-get install no-such-pkg-cpt$"):
        offline_text.package_files("no-such-pkg-cpt")
