"""Real text that is offline on a Debian machine, as JSONL corpora: manual pages (roff, rendered to plain text
here), fortune cookies, the Python documentation's reStructuredText sources.

Which files are read comes from the package's own file list (``dpkg -L``), never from a directory walk: the
English pages under ``/usr/share/man/man*`` depend on whatever else a machine has installed, the package's list
does not. Files are read in sorted order and every document is a whole file (or one fortune), so the corpus,
and the held-out split cpt makes of it by document, is the same on every machine with the same package
versions (recorded beside the corpus).

Packages (``apt-get install manpages manpages-de fortunes-de python3.11-doc``):

- ``manpages``, ``manpages-de``: one document per page; ``.so`` redirects (a page that only includes another)
  are skipped. :func:`roff_to_text` keeps the text of the ``man`` macros (headings, bold/italic runs, tagged
  paragraphs) and drops the typesetting.
- ``fortunes-de``: one document per fortune (they are separated by ``%`` lines).
- ``python3.11-doc``: the ``_sources/**/*.rst.txt`` files, as they are.

Usage (what ``scripts/results_smollm2.py`` does)::

    write_corpus(out / "german.jsonl", {"man-de": list(man_pages("manpages-de")),
                                        "fortunes-de": list(fortunes("fortunes-de"))})
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path


class OfflineTextError(Exception):
    """A missing package or file: printed as one line naming the fix."""


def package_files(package: str) -> list[Path]:
    """The regular files (not links, not directories) that the Debian ``package`` installed, sorted."""
    try:
        listed = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise OfflineTextError("dpkg not found: this needs a Debian/Ubuntu machine") from None
    if listed.returncode != 0:
        raise OfflineTextError(f"package {package} is not installed; install it with: apt-get install {package}")
    paths = (Path(line) for line in listed.stdout.splitlines() if line.startswith("/"))
    return sorted(p for p in paths if p.is_file() and not p.is_symlink())


def package_version(package: str) -> str:
    shown = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    return shown.stdout.strip() or "?"


# ------------------------------------------------------------------------------------------------ roff to text

# Escapes with a fixed meaning; \(xx and \[name] glyphs are looked up in _GLYPHS.
_GLYPHS = {
    "em": "—", "en": "–", "hy": "-", "aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘", "cq": "’",
    "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "bu": "•", "co": "©", "rg": "®", "tm": "™", "mu": "×",
    "de": "°", "ti": "~", "ha": "^", "ga": "`", "ul": "_", "rs": "\\", "sl": "/", "bv": "|", "ba": "|",
    "Do": "$", "at": "@", "sh": "#", "lh": "", "rh": "", "pl": "+", "mi": "-", "eq": "=",
    "la": "⟨", "ra": "⟩", "->": "→", "<-": "←", "<=": "≤", ">=": "≥", "!=": "≠", "+-": "±", "ss": "ß",
    ':a': "ä", ':o': "ö", ':u': "ü", ':A': "Ä", ':O': "Ö", ':U': "Ü", "'e": "é", "`e": "è", "'a": "á",
}
_ESCAPE = re.compile(r"""\\(?:
      \((?P<glyph2>..)                 # \(xx
    | \[(?P<glyph>[^\]]*)\]             # \[name]
    | f(?:\[[^\]]*\]|\(..|.)            # font change
    | s[+-]?\d                          # size change
    | \*(?:\[[^\]]*\]|\(..|.)           # string interpolation
    | [nk](?:\[[^\]]*\]|\(..|.)         # register
    | (?P<char>.)                        # one-character escapes
    )""", re.VERBOSE)
_SIMPLE = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "t": "\t", ".": ".", "'": "'", "`": "`"}
# Macros whose arguments are running text: the font runs (alternating ones are joined without spaces), headings.
_TEXT_MACROS = {"B", "I", "SM", "SB", "SH", "SS", "UR", "MT"}
_ALTERNATING = {"BR", "RB", "IR", "RI", "BI", "IB"}
_BREAKS = {"PP", "LP", "P", "TP", "IP", "HP", "br", "sp", "RS", "RE", "nf", "fi", "EX", "EE", "SH", "SS",
           "Sh", "Ss", "Pp", "It", "Bl", "Bd", "Nd"}
# mdoc (BSD) pages: macro names inside a line are callable and dropped; these lines carry no text at all.
_MDOC_SKIP = {"Dd", "Dt", "Os", "Bl", "El", "Bd", "Ed", "Rs", "Re", "Bf", "Ef", "Ek", "Bk", "Ns", "Oo", "Oc",
              "Xo", "Xc", "Lb"}
_MDOC = re.compile(r"^(?:%[A-Z]|[A-Z][a-z][a-z]?|D1|Dl)$")
_MDOC_PUNCT = re.compile(r" ([.,:;)\]])")


def _unescape(text: str) -> str:
    def one(match: re.Match) -> str:
        name = match.group("glyph2") or match.group("glyph")
        if name is not None:
            return _GLYPHS.get(name, "")
        char = match.group("char")
        return _SIMPLE.get(char, "") if char is not None else ""

    return _ESCAPE.sub(one, text)


def _macro_args(rest: str) -> list[str]:
    """A macro line's arguments: words, or double-quoted strings (``""`` inside one is a quote)."""
    return [quoted.replace('""', '"') if quoted or bare == '""' else bare
            for quoted, bare in re.findall(r'"((?:[^"]|"")*)"|(\S+)', rest)]


def _mdoc_text(name: str, rest: str, page_name: str) -> str:
    """The words of an mdoc line: macro names dropped, ``Fl x`` as ``-x``, a bare ``Nm`` as the page's name."""
    words, flag = [], name == "Fl"
    args = _macro_args(rest)
    if name == "Nm" and not args:
        return page_name
    for word in args:
        if _MDOC.match(word):
            flag = word == "Fl"
            if word == "Nm":
                words.append(page_name)
            continue
        words.append(("-" + word) if flag else word)
        flag = False
    return _MDOC_PUNCT.sub(r"\1", _unescape(" ".join(words))).strip()


def roff_to_text(source: str) -> str:
    """The running text of a ``man``-macro page: comments and typesetting requests dropped, font and glyph
    escapes resolved, headings and tagged-paragraph tags kept as lines, paragraphs separated by blank lines."""
    out: list[str] = []
    page_name = ""
    for raw in source.splitlines():
        line = re.sub(r'\\".*', "", raw)  # comment to end of line
        if line.startswith((".", "'")):
            name, _, rest = line[1:].strip().partition(" ")
            if name in _BREAKS and out and out[-1] != "":
                out.append("")
            if name in _TEXT_MACROS or name == "IP":
                args = _macro_args(rest)[:1] if name == "IP" else _macro_args(rest)
                text = _unescape(" ".join(args)).strip()
            elif name in _ALTERNATING:
                text = _unescape("".join(_macro_args(rest))).strip()
            elif _MDOC.match(name) and name not in _MDOC_SKIP:
                text = _mdoc_text(name, rest, page_name)
                if name == "Nm" and not page_name and text:
                    page_name = text
            else:
                continue
            if text:
                out.append(text)
            continue
        text = _unescape(line).rstrip()
        if text or (out and out[-1] != ""):
            out.append(text)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


# ------------------------------------------------------------------------------------------------- documents


def man_pages(package: str) -> Iterator[str]:
    """One plain-text document per manual page of ``package`` (``.so`` redirect pages skipped)."""
    for path in package_files(package):
        if "/man/" not in str(path) or not path.name.endswith(".gz"):
            continue
        source = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        if re.match(r"\s*\.so\s", source) and len(source) < 200:
            continue
        text = roff_to_text(source)
        if text:
            yield text


def fortunes(package: str) -> Iterator[str]:
    """One document per fortune in the fortune files of ``package`` (the text files under ``fortunes/``; the
    ``.dat`` indexes are skipped, the ``.u8`` names are links to the same files)."""
    for path in package_files(package):
        if "/fortunes/" not in str(path) or path.suffix:
            continue
        for fortune in re.split(r"^%\s*$", path.read_text(encoding="utf-8", errors="replace"), flags=re.MULTILINE):
            if fortune.strip():
                yield fortune.strip()


def rst_sources(package: str) -> Iterator[str]:
    """One document per reStructuredText source (``_sources/**/*.txt``) of a Sphinx documentation package."""
    for path in package_files(package):
        if "/_sources/" in str(path) and path.name.endswith(".txt"):
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                yield text


def interleave(sources: dict[str, list[str]]) -> Iterator[tuple[str, str]]:
    """``(source, document)`` from every source in proportion to its size: the next document always comes from
    the source that has given the smallest share of its characters so far (ties by name), so any prefix of
    the result (the windows an evaluation reads first, a capped read) mixes the sources as the whole does."""
    totals = {name: max(1, sum(map(len, docs))) for name, docs in sources.items()}
    given = {name: 0 for name in sources}
    index = {name: 0 for name in sources}
    while True:
        open_ = [name for name in sorted(sources) if index[name] < len(sources[name])]
        if not open_:
            return
        name = min(open_, key=lambda n: given[n] / totals[n])
        text = sources[name][index[name]]
        index[name] += 1
        given[name] += len(text)
        yield name, text


def write_corpus(path: Path, sources: dict[str, list[str]]) -> dict[str, dict]:
    """Write the documents of ``sources`` interleaved (:func:`interleave`) as one JSONL file (``{"text": ...,
    "source": name}`` per line), atomically via a temporary file; returns per source its documents and size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stats = {name: {"documents": 0, "chars": 0, "bytes": 0} for name in sources}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for name, text in interleave(sources):
            f.write(json.dumps({"text": text, "source": name}, ensure_ascii=False) + "\n")
            stat = stats[name]
            stat["documents"] += 1
            stat["chars"] += len(text)
            stat["bytes"] += len(text.encode("utf-8"))
    os.replace(tmp, path)
    return stats
