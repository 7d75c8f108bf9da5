import json

from cpt.metrics import MetricsLogger, WandbConfig


def test_rows_are_appended_and_flushed(tmp_path):
    logger = MetricsLogger(tmp_path, WandbConfig(), "r", {})
    logger.log({"kind": "train", "step": 1, "loss": 2.5})
    # readable before close: a killed run keeps what it logged
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == 2.5 and rows[0]["kind"] == "train" and "time" in rows[0]
    logger.close()


def test_non_main_process_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path, WandbConfig(enabled=True), "r", {}, enabled=False)
    logger.log({"kind": "train", "step": 1, "loss": 2.5})
    logger.close()
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "wandb").exists()


def test_wandb_offline_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = MetricsLogger(tmp_path, WandbConfig(enabled=True, project="cpt-test"), "r", {"a": 1})
    logger.log({"kind": "train", "step": 1, "loss": 2.5})
    logger.log({"kind": "eval", "step": 1, "set": "upstream", "loss": 3.0})
    logger.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
