"""The sweep results table that the laws are fitted to: loading, validation and the checks each law needs.

One row per (run, evaluation step). The columns the laws are fitted to:

- ``N`` (non-embedding parameters),
- ``D`` (CPT tokens trained at that evaluation; ``D = 0`` is the model before CPT),
- ``r`` (the *domain* share of the CPT mixture, in (0, 1]),
- ``general_loss``, ``domain_loss`` (validation losses, nats/token).

Optional columns, the bookkeeping ``cpt sweep`` writes (a table of one's own may leave them out):

- ``run_id`` (str; default: the row's number, ``row 1`` for the first data row), used in messages,
- ``status`` (``"ok"`` or ``"failed"``; rows with another status are ignored; without the column, or with an
  empty cell, a row counts as finished, ``"ok"``),
- ``N_total`` (all parameters), ``step`` (numbers when given; the fits do not use them),
- ``domain`` (the domain corpus's name; default ``"domain"``).

CSV (UTF-8) always; ``.parquet`` when pyarrow is installed.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from cpt.config import suggest
from cpt.errors import CptError

# The law inputs, which must be finite in ok rows; the bookkeeping numbers (N_total, step) need only be numbers
# or empty.
REQUIRED = ("N", "D", "r", "general_loss", "domain_loss")
OPTIONAL = ("run_id", "status", "N_total", "step", "domain")
NUMERIC = ("N", "N_total", "D", "r", "step", "general_loss", "domain_loss")
DEFAULT_DOMAIN = "domain"


@dataclass
class Table:
    """The ``ok`` rows of a results table, one numpy column per field."""

    run_id: np.ndarray
    N: np.ndarray
    N_total: np.ndarray
    D: np.ndarray
    r: np.ndarray
    step: np.ndarray
    general_loss: np.ndarray
    domain_loss: np.ndarray
    domain: np.ndarray
    source: str = "<table>"

    def __len__(self) -> int:
        return len(self.run_id)

    def subset(self, mask: np.ndarray) -> "Table":
        return replace(self, **{f.name: getattr(self, f.name)[mask] for f in fields(self) if f.name != "source"})

    def cpt_rows(self) -> "Table":
        """Rows after some CPT (``D > 0``): a law with a ``1/D**beta`` term cannot take ``D = 0``."""
        return self.subset(self.D > 0)

    def pre_cpt(self, column: str) -> dict[float, float]:
        """Mean ``column`` loss at ``D = 0`` per model size: the model before CPT, shared by all its runs."""
        start = self.D == 0
        values = getattr(self, column)
        return {float(n): float(values[start & (self.N == n)].mean()) for n in np.unique(self.N[start])}


def table_from_columns(columns: Mapping[str, Sequence], source: str = "<table>") -> Table:
    """Validate raw columns (strings or numbers) and keep the ``ok`` rows (see the module docstring for the
    optional columns and their defaults).

    Raises:
        CptError: missing columns, an empty table, values that are not numbers, no ``ok`` rows, non-finite
            law inputs in ``ok`` rows, or values out of range (``N <= 0``, ``D < 0``, ``r`` outside (0, 1]).
    """
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise CptError(f"{source}: missing column(s) {', '.join(missing)}; a results table needs "
                       f"{', '.join(REQUIRED)} (optional: {', '.join(OPTIONAL)})")
    present = [c for c in (*REQUIRED, *OPTIONAL) if c in columns]
    lengths = {c: len(columns[c]) for c in present}
    if len(set(lengths.values())) > 1:
        raise CptError(f"{source}: columns have different lengths {lengths}")
    n = lengths["N"]
    if n == 0:
        raise CptError(f"{source}: the table is empty (no rows)")
    run_id = np.array([str(v) for v in columns["run_id"]] if "run_id" in columns
                      else [f"row {i + 1}" for i in range(n)], dtype=object)
    status = np.array(["ok" if v is None or str(v).strip() == "" else str(v).strip()
                       for v in columns.get("status", [None] * n)], dtype=object)
    ok = status == "ok"
    if not ok.any():
        raise CptError(f"{source}: no rows with status ok ({len(set(run_id))} runs, all failed or unfinished)")
    numbers = {c: _numeric(columns[c], c, run_id, source) if c in columns else np.full(n, np.nan)
               for c in NUMERIC}
    domain = columns.get("domain")
    domain = np.array([DEFAULT_DOMAIN if v in (None, "") else str(v) for v in domain] if domain is not None
                      else [DEFAULT_DOMAIN] * n, dtype=object)
    bad = ok & ~np.all([np.isfinite(numbers[c]) for c in REQUIRED], axis=0)
    if bad.any():
        runs = sorted(set(run_id[bad]))
        columns_hit = [c for c in REQUIRED if not np.all(np.isfinite(numbers[c][ok]))]
        raise CptError(f"{source}: {int(bad.sum())} ok row(s) have NaN or infinite {'/'.join(columns_hit)} "
                       f"(run(s) {', '.join(runs[:5])}{' ...' if len(runs) > 5 else ''}); fix them or mark the "
                       "runs failed")
    for column, test, allowed in (("N", lambda v: v > 0, "> 0"), ("D", lambda v: v >= 0, ">= 0"),
                                  ("r", lambda v: (v > 0) & (v <= 1), "in (0, 1] (the domain share)"),
                                  ("general_loss", lambda v: v > 0, "> 0"), ("domain_loss", lambda v: v > 0, "> 0")):
        wrong = ok & ~test(numbers[column])
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            raise CptError(f"{source}: {column} must be {allowed}; run {run_id[i]} has {numbers[column][i]:g} "
                           f"({int(wrong.sum())} row(s))")
    return Table(run_id[ok], *(numbers[c][ok] for c in NUMERIC), domain[ok], source)


def _numeric(values: Sequence, column: str, run_id: np.ndarray, source: str) -> np.ndarray:
    out = np.empty(len(values))
    for i, v in enumerate(values):
        try:
            out[i] = float(v) if v not in (None, "") else math.nan
        except (TypeError, ValueError):
            raise CptError(f"{source}: column {column}, run {run_id[i]}: {v!r} is not a number") from None
    return out


def load_table(path: str | Path) -> Table:
    """Read a results table from CSV or Parquet and validate it (see :func:`table_from_columns`)."""
    path = Path(path)
    if not path.is_file():
        raise CptError(f"{path}: no such results table")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise CptError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or give a CSV") from None
        try:
            columns = pq.read_table(path).to_pydict()
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise CptError(f"{path}: not a Parquet table ({e}); give a results CSV or Parquet file") from None
    else:
        # utf-8-sig: a spreadsheet's byte-order mark would otherwise glue itself to the first column's name.
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                rows = list(reader)
                names = reader.fieldnames or []
        except (UnicodeDecodeError, csv.Error) as e:
            reason = "binary or another encoding" if isinstance(e, UnicodeDecodeError) else str(e)
            raise CptError(f"{path}: not a UTF-8 CSV table ({reason}); give the results table as a CSV "
                           "(e.g. runs/sweep/results.csv) or a .parquet file") from None
        columns = {name: [row[name] for row in rows] for name in names}
    return table_from_columns(columns, str(path))


def select_domain(table: Table, name: str | None) -> Table:
    """The rows of one domain: ``name``, or the table's only domain when ``name`` is None."""
    domains = sorted(set(table.domain))
    if name is None:
        if len(domains) > 1:
            raise CptError(f"{table.source} holds domains {', '.join(domains)}; pick one with --domain")
        return table
    if name not in domains:
        raise CptError(f"{table.source} has no domain {name!r}{suggest(name, domains)}; it has "
                       f"{', '.join(domains)}")
    return table.subset(table.domain == name)


def _values(v: np.ndarray) -> str:
    shown = ", ".join(f"{x:.3g}" for x in v[:6])
    return f" ({shown}{', ...' if len(v) > 6 else ''})" if len(v) else ""


def require(table: Table, law: str, sizes: int = 0, ratios: int = 0, tokens: int = 0, domains: int = 0) -> None:
    """Raise unless ``table`` has enough distinct model sizes, ratios, token counts (D > 0) and domains.

    The message says what ``law`` needs and what the table has, e.g. "D-CPT needs >= 2 model sizes, >= 3
    ratios, >= 3 token counts (D > 0); the table has 1 model size (1.2e+06), 4 ratios (...), 5 token counts".
    """
    have = {"model size": np.unique(table.N), "ratio": np.unique(table.r),
            "token count": np.unique(table.D[table.D > 0]), "domain": np.array(sorted(set(table.domain)))}
    need = {"model size": sizes, "ratio": ratios, "token count": tokens, "domain": domains}
    if all(len(have[k]) >= v for k, v in need.items()):
        return

    def amount(n: int, what: str) -> str:
        return f"{n} {what}{'' if n == 1 else 's'}" + (" (D > 0)" if what == "token count" else "")

    wanted = ", ".join(f">= {amount(v, k)}" for k, v in need.items() if v)
    got = ", ".join(amount(len(have[k]), k) + (_values(have[k]) if k != "domain" else f" ({', '.join(have[k])})")
                    for k, v in need.items() if v)
    raise CptError(f"{law} needs {wanted}; {table.source} has {got} among its ok rows")
