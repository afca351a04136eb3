"""launch/ablations.py's table: Table 3 markdown from fake rows (no training, no sampling)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("ablations", ROOT / "launch" / "ablations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(name, order, adaln, params, loss, fid):
    return {"name": name, "description": name, "order": order, "adaln": adaln, "depth": 2, "width": 128,
            "params": params, "params_total": params + 1000, "val_loss": loss, "val_loss_last": loss + 1,
            "fid": fid, "precision": 0.5, "recall": 0.25, "accuracy": 0.875, "s_per_image": 0.0123}


def test_make_table_layout_and_comparability():
    ab = _module()
    rows = [_row("raster", "raster", True, 400_000, 2.5, 10.0), _row("var", "scale", True, 400_000, 3.0, 7.5),
            {"name": "real", "description": "real", "order": "", "adaln": None, "params": None,
             "val_loss": None, "fid": 0.5, "precision": 0.9, "recall": 0.9, "accuracy": 1.0}]
    text = ab.make_table(rows, {"steps": 10, "depth": 2, "batch": 32, "matched_width": True, "num_samples": 64,
                                "num_refs": 100, "cfg": 1.5, "top_k": 900, "top_p": 0.96, "device": "cpu"})
    lines = text.splitlines()
    assert lines[0].startswith("| # | Description |") and set(lines[1]) <= set("|-")
    raster, var, real = lines[2:5]
    assert "(raster tokens: not comparable)" in raster and "not comparable" not in var
    assert "| 1 |" in raster and "| 2 |" in var and real.startswith("| – |")
    assert "| 400.0K | 401.0K |" in var and "3.000" in var and "4.000" in var       # params, loss, last-scale loss
    assert "| +0 |" in raster and "| -2.5 |" in var                      # Δ FID against row 1
    assert "87.5%" in var and "0.0123" in var
    assert all(line.count("|") == lines[0].count("|") for line in lines[:5])
    assert "10 training steps" in text and "†" not in text
    rows[1]["loss_source"] = "train"
    text = ab.make_table(rows, {})
    assert "| 3.000† | 4.000† |" in text and "†: no held-out evaluation" in text


def test_feature_scores_identical_sets():
    import numpy as np
    ab = _module()
    feats = np.random.default_rng(0).normal(size=(64, 5))
    scores = ab.feature_scores(feats, feats)
    assert abs(scores["fid"]) < 1e-6 and scores["precision"] == 1.0 and scores["recall"] == 1.0
