"""Results-table loading and validation: every bad input is a one-line CptError that says what is wrong."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from cpt.errors import CptError
from cpt.laws.dcpt import require_dcpt
from cpt.laws.table import REQUIRED, load_table, require, select_domain, table_from_columns


def rows(sizes=(1e6, 4e6), ratios=(0.25, 0.5, 1.0), tokens=(0, 1e6, 2e6, 4e6), domain=None) -> list[dict]:
    out = []
    for n in sizes:
        for r in ratios:
            for step, d in enumerate(tokens):
                row = {"run_id": f"n{n:g}-r{r:g}", "status": "ok", "N": int(n), "N_total": int(n * 1.5), "D": int(d),
                       "r": r, "step": step, "general_loss": 3.0 + r * d / 1e7, "domain_loss": 4.0 - r * d / 1e7}
                if domain:
                    row["domain"] = domain
                out.append(row)
    return out


def columns(rs: list[dict]) -> dict:
    return {k: [r[k] for r in rs] for k in rs[0]}


def write_csv(path, rs: list[dict]):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rs[0]))
        w.writeheader()
        w.writerows(rs)
    return path


def test_csv_round_trip_keeps_ok_rows_and_defaults_the_domain(tmp_path):
    rs = rows()
    rs[0] = dict(rs[0], status="failed", general_loss="nan")  # failed rows may hold anything
    table = load_table(write_csv(tmp_path / "t.csv", rs))
    assert len(table) == len(rs) - 1
    assert set(table.domain) == {"domain"}
    assert table.N.dtype == float and sorted(np.unique(table.r)) == [0.25, 0.5, 1.0]
    # pre-CPT losses: the D = 0 rows' mean per size (the failed row was one of them)
    assert table.pre_cpt("general_loss") == {1e6: 3.0, 4e6: 3.0}


def test_parquet_is_read(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rs = rows()
    pq.write_table(pa.table(columns(rs)), tmp_path / "t.parquet")
    table = load_table(tmp_path / "t.parquet")
    assert len(table) == len(rs)
    np.testing.assert_allclose(table.domain_loss, [r["domain_loss"] for r in rs])


def test_missing_columns_are_named():
    cols = columns(rows())
    del cols["domain_loss"], cols["r"]
    with pytest.raises(CptError, match=r"missing column\(s\) r, domain_loss") as e:
        table_from_columns(cols, "sweep.csv")
    assert "\n" not in str(e.value) and all(c in str(e.value) for c in REQUIRED)


def test_empty_table(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(",".join(REQUIRED) + "\n")
    with pytest.raises(CptError, match="empty"):
        load_table(path)


def test_no_ok_rows():
    with pytest.raises(CptError, match="no rows with status ok"):
        table_from_columns(columns([dict(r, status="failed") for r in rows()]))


def test_nan_and_inf_losses_say_how_many_and_which_runs():
    rs = rows()
    rs[1] = dict(rs[1], general_loss=math.nan)
    rs[-1] = dict(rs[-1], domain_loss=math.inf)
    with pytest.raises(CptError, match=r"2 ok row\(s\) have NaN or infinite general_loss/domain_loss "
                                       r"\(run\(s\) n1e\+06-r0.25, n4e\+06-r1\)"):
        table_from_columns(columns(rs))


def test_not_a_number_names_column_and_run():
    rs = rows()
    rs[2] = dict(rs[2], D="lots")
    with pytest.raises(CptError, match="column D, run n1e\\+06-r0.25: 'lots' is not a number"):
        table_from_columns(columns(rs))


@pytest.mark.parametrize("column,value,message", [("r", 0.0, "r must be in \\(0, 1\\]"), ("r", 1.5, "r must be"),
                                                  ("D", -1, "D must be >= 0"), ("N", 0, "N must be > 0")])
def test_out_of_range_values(column, value, message):
    rs = rows()
    rs[3] = dict(rs[3], **{column: value})
    with pytest.raises(CptError, match=message):
        table_from_columns(columns(rs))


def test_too_few_sizes_ratios_tokens_for_dcpt_says_what_it_needs():
    table = table_from_columns(columns(rows(sizes=(1e6,), ratios=(0.5, 1.0))), "s.csv")
    with pytest.raises(CptError) as e:
        require_dcpt(table)
    assert str(e.value) == ("D-CPT needs >= 2 model sizes, >= 3 ratios, >= 3 token counts (D > 0); s.csv has "
                            "1 model size (1e+06), 2 ratios (0.5, 1), 3 token counts (D > 0) (1e+06, 2e+06, 4e+06) "
                            "among its ok rows")
    require_dcpt(table_from_columns(columns(rows())))  # 2 sizes, 3 ratios, 3 token counts: enough


def test_failed_runs_do_not_count_towards_requirements():
    rs = rows(ratios=(0.25, 0.5, 1.0))
    rs = [dict(r, status="failed") if r["r"] == 1.0 else r for r in rs]
    with pytest.raises(CptError, match="2 ratios"):
        require(table_from_columns(columns(rs)), "D-CPT", ratios=3)


def test_select_domain():
    table = table_from_columns(columns(rows(domain="code") + rows(domain="law")), "t.csv")
    with pytest.raises(CptError, match="holds domains code, law; pick one with --domain"):
        select_domain(table, None)
    with pytest.raises(CptError, match="no domain 'cod' \\(did you mean 'code'\\?\\)"):
        select_domain(table, "cod")
    assert set(select_domain(table, "law").domain) == {"law"}


def test_a_users_own_table_needs_no_bookkeeping_columns(tmp_path):
    """N, D, r and the two losses are a table; run_id, status, N_total and step (what `cpt sweep` adds) are not."""
    rs = rows()
    bare = [{k: r[k] for k in REQUIRED} for r in rs]
    table = load_table(write_csv(tmp_path / "own.csv", bare))
    full = load_table(write_csv(tmp_path / "sweep.csv", rs))
    assert len(table) == len(full) == len(rs)
    for name in REQUIRED:
        np.testing.assert_array_equal(getattr(table, name), getattr(full, name))
    assert list(table.run_id[:2]) == ["row 1", "row 2"] and set(table.domain) == {"domain"}
    # An empty status cell counts as finished; a NaN law input then names the row.
    bare[3] = dict(bare[3], general_loss="nan")
    with_status = [dict(r, status="") for r in bare]
    with pytest.raises(CptError, match=r"1 ok row\(s\) have NaN or infinite general_loss \(run\(s\) row 4\)"):
        load_table(write_csv(tmp_path / "own.csv", with_status))


def test_binary_or_foreign_csv_is_one_line(tmp_path):
    path = tmp_path / "results.csv"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x00" * 20)
    with pytest.raises(CptError) as e:
        load_table(path)
    message = str(e.value)
    assert message.startswith(f"{path}: not a UTF-8 CSV table (binary or another encoding)") and "\n" not in message
    # A spreadsheet's byte-order mark is not part of the first column's name.
    rs = [{k: r[k] for k in REQUIRED} for r in rows()]
    write_csv(path, rs)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert len(load_table(path)) == len(rs)
