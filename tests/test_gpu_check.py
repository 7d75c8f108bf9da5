"""scripts/gpu_check.py on CPU: its device-independent parts (arguments, FLOP count, the table writer, the
resume comparison), its one-line refusal without a GPU, and its plumbing end to end with --cpu-smoke."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402

SCRIPT = ROOT / "scripts" / "gpu_check.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def test_arguments():
    args = gpu_check.parse_args(["--out", "x", "--checks", "hf, memory", "--seq", "1024,4096", "--steps", "4"])
    assert (args.out, args.checks, args.seq, args.steps) == (Path("x"), ["hf", "memory"], [1024, 4096], 4)
    quick = gpu_check.parse_args(["--quick"])
    assert quick.seq == [2048] and quick.steps == 3 and quick.checks == list(gpu_check.CHECKS)
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--checks", "throughput,speed"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--seq", "2k"])


def test_flops_per_token_of_the_1b_by_hand():
    """PaLM's count for Llama-3.2-1B's shape. Per layer: q and o 2048 x 2048 each, k and v 2048 x 512 each (8 of
    32 heads), MLP 3 x 2048 x 8192: 60,817,408 weights, x 16 layers = 973,078,528; the (tied) LM head
    128,256 x 2048 = 262,668,288; N = 1,235,746,816 matmul weights, 6N = 7,414,480,896. Attention
    12 x 16 layers x 2048 hidden x T: 805,306,368 at T = 2048, 1,610,612,736 at T = 4096."""
    assert gpu_check.flops_per_token(2048) == 7_414_480_896 + 805_306_368
    assert gpu_check.flops_per_token(4096) == 7_414_480_896 + 1_610_612_736


def test_table_and_json_writer(tmp_path):
    rows = [{"check": "peak", "case": "bf16 matmul 8192x8192", "status": "ok", "value": 712.3},
            {"check": "throughput", "case": "seq 4096 x 2 plain", "status": "below", "tokens_per_s": 31234.5,
             "mfu": 0.3812, "peak_mem_gib": 61.27, "target": "MFU >= 40%", "loss_kind": "chunked"},
            {"check": "resume", "case": "kill -9 + cpt resume", "status": "ok", "note": "a | b"}]
    json_path, md_path = gpu_check.write_outputs(tmp_path / "out", rows, {"gpu": "NVIDIA H100 80GB HBM3"})
    assert json.loads(json_path.read_text()) == {"info": {"gpu": "NVIDIA H100 80GB HBM3"}, "rows": rows}
    table = md_path.read_text().split("\n\n")[-1].splitlines()
    assert table == [
        "| check | case | status | tokens_per_s | mfu | peak_mem_gib | value | target | note | loss_kind |",
        "|---|---|---|---|---|---|---|---|---|---|",
        "| peak | bf16 matmul 8192x8192 | ok |  |  |  | 712.3 |  |  |  |",
        "| throughput | seq 4096 x 2 plain | below | 31,234 | 38.1% | 61.27 |  | MFU >= 40% |  | chunked |",
        "| resume | kill -9 + cpt resume | ok |  |  |  |  |  | a \\| b |  |"]
    assert gpu_check.summary_line(rows[1]) == ("throughput seq 4096 x 2 plain                 below   "
                                               "tokens_per_s 31,234 mfu 38.1% peak_mem_gib 61.27")
    assert gpu_check.datasheet_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_check.datasheet_peak("NVIDIA H100 PCIe") == 756e12 and gpu_check.datasheet_peak("Tesla T4") is None


def test_resume_comparison():
    def rows(losses, start=1):
        return [{"kind": "eval", "step": 0}] + [{"kind": "train", "step": start + i, "loss": x, "grad_norm": 1.0}
                                               for i, x in enumerate(losses)]
    full = rows([5.0, 4.0, 3.0, 2.0])
    assert gpu_check.compare_resumed(full, rows([5.0, 4.0, 3.0, 2.0]), 2) == {
        "same_steps": True, "bit_identical": True, "max_loss_diff": 0.0, "rows": 2}
    near = gpu_check.compare_resumed(full, rows([5.0, 4.0, 3.0005, 2.0]), 2)
    assert not near["bit_identical"] and near["max_loss_diff"] == pytest.approx(5e-4)
    assert not gpu_check.compare_resumed(full, rows([5.0, 4.0, 3.0]), 2)["same_steps"]


def test_without_cuda_it_stops_in_one_line_with_exit_code_2(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                            env=ENV)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "gpu_check: no CUDA device (torch.cuda.is_available() is False); run on a GPU machine, or pass --cpu-smoke "
        "to test the plumbing only"]
    assert not (tmp_path / "gpu_check.json").exists()


def test_shell_wrapper_parses_and_stops_without_a_gpu(tmp_path):
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")]).returncode == 0
    if subprocess.run(["sh", "-c", "nvidia-smi -L"], capture_output=True).returncode == 0:
        pytest.skip("this machine has a GPU")
    result = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                            env={**ENV, "OUT": str(tmp_path), "GPU_CHECK_VENV": str(tmp_path / "venv")})
    assert result.returncode == 2 and result.stderr.startswith("gpu_check: no CUDA device")
    assert not (tmp_path / "venv").exists()


def smoke(tmp_path, checks: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    result = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(tmp_path), "--checks", checks],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return result, json.loads((tmp_path / "gpu_check.json").read_text())["rows"]


def test_cpu_smoke_runs_every_check_but_resume(tmp_path):
    """Plumbing only (a tiny model on CPU): every check writes its rows, one summary line each."""
    result, rows = smoke(tmp_path, "throughput,hf,memory,engines,overhead")
    assert [r["check"] for r in rows] == ["peak"] + ["throughput"] * 2 + ["hf"] * 3 + ["memory"] * 2 + \
        ["engines"] + ["overhead"] * 4
    assert all(r["status"] == "ok" for r in rows if r["check"] != "engines")
    assert rows[-1]["case"] == "eval + checkpoint + metrics" and 0 < rows[-1]["value"]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] for r in rows if r["check"] == "throughput")
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(rows) + 1 and lines[-1].startswith(f"gpu_check: {len(rows)} rows, 0 error/fail")
    assert "CPU SMOKE: plumbing only" in (tmp_path / "gpu_check.md").read_text()


def test_cpu_smoke_resume_after_kill_is_bit_identical(tmp_path):
    """The real `cpt run`, SIGKILLed in its second stage, and `cpt resume`: the rows after the checkpoint match the
    uninterrupted run's bit for bit (on CPU)."""
    _, rows = smoke(tmp_path, "resume")
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["value"] == 0.0
    assert "bit-identical: True" in rows[0]["note"]
