"""scripts/aggregate_runs.py: mean ± std over a sweep's runs, crashed runs listed rather than averaged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import load_script

aggregate_runs = load_script("aggregate_runs")


def _sweep(tmp_path: Path) -> Path:
    for i, acc in enumerate([0.8, 0.9, 1.0]):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "metrics.json").write_text(json.dumps({"acc": acc, "name": "x", "nan": float("nan")}))
    (tmp_path / "3").mkdir()  # a crashed run: no metrics.json
    return tmp_path


def test_mean_std_and_missing(tmp_path, capsys):
    aggregate_runs.main([str(_sweep(tmp_path))])
    out = json.loads(capsys.readouterr().out)
    assert out["runs"] == 3 and out["missing"] == [str(tmp_path / "3")]
    acc = out["metrics"]["acc"]
    assert acc["mean"] == pytest.approx(0.9) and acc["std"] == pytest.approx((0.02 / 3) ** 0.5) and acc["n"] == 3
    assert "name" not in out["metrics"] and "nan" not in out["metrics"]  # non-numeric / non-finite skipped


def test_markdown_and_unknown_key(tmp_path, capsys):
    sweep = _sweep(tmp_path)
    aggregate_runs.main([str(sweep), "--keys", "acc", "--percent", "--markdown"])
    assert "| 3 | 90.00 ± 8.16 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no run has \\['f1'\\]"):
        aggregate_runs.main([str(sweep), "--keys", "f1"])
