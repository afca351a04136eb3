"""Scaling laws: the power-law fit and its bootstrap interval, the Pareto frontier, the `scaling` command on a
hand-written sweep directory, and launch/sweep.py's dry run and SLURM script."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from var_jax.cli import main as cli_main
from var_jax.eval import scaling

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = os.path.join(REPO_ROOT, "launch", "sweep.py")
RNG = np.random.default_rng()


def synthetic(alpha, beta, n, noise):
    x = np.geomspace(1e5, 1e9, n) * RNG.uniform(0.9, 1.1, n)
    return x, scaling.power_law(x, alpha, beta) * np.exp(RNG.normal(0.0, noise, n))


@pytest.mark.parametrize("alpha, beta", [(-0.23, 2.0), (-0.12, 3e-4), (-0.5, 1e-6)])
def test_fit_recovers_alpha_and_beta_within_one_percent(alpha, beta):
    # log β = intercept / α, extrapolated from x in 1e5..1e9 to x = 1: its error is the intercept's (≈ 0.8 σ
    # here) over |α|, so 1 % on β needs σ well under 0.4 % · |α|; 0.03 % noise leaves a > 5 σ margin
    x, y = synthetic(alpha, beta, n=60, noise=0.0003)
    fit = scaling.fit_power_law(x, y, bootstrap=200)
    assert fit["alpha"] == pytest.approx(alpha, rel=0.01)
    assert fit["beta"] == pytest.approx(beta, rel=0.01)
    assert fit["r"] < -0.99 and fit["n"] == 60


def test_bootstrap_interval_covers_the_true_alpha_and_is_reproducible():
    # A 95 % interval misses the truth now and then, so one draw can't be the test: over 60 fresh data sets the
    # percentile bootstrap (12 points) covered α 91.5 % of the time in 200 trials; require 80 % (≥ 3 sd margin).
    alpha, hits = -0.23, 0
    for _ in range(60):
        x, y = synthetic(alpha, 2.0, n=12, noise=0.03)
        fit = scaling.fit_power_law(x, y)
        lo, hi = fit["alpha_ci"]
        assert lo < fit["alpha"] < hi
        hits += lo < alpha < hi
    assert hits >= 48, f"the 95 % interval covered the true alpha in only {hits} of 60 draws"
    assert scaling.fit_power_law(x, y)["alpha_ci"] == [lo, hi]      # fixed bootstrap seed


def test_fit_rejects_degenerate_input():
    with pytest.raises(ValueError, match="distinct"):
        scaling.fit_power_law([3.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        scaling.fit_power_law([1.0, 2.0], [1.0, 0.0])


def test_pareto_frontier_keeps_points_that_beat_all_cheaper_ones():
    flops = [1.0, 2.0, 2.0, 4.0, 8.0]
    loss = [3.0, 2.5, 2.0, 2.2, 1.0]
    assert scaling.pareto_frontier(flops, loss) == [0, 2, 4]


# ---- a hand-written sweep ------------------------------------------------------------------------------------

ALPHA, BETA = -0.1, 1e-3            # the fake runs' loss = (BETA·N)^ALPHA, exactly
TOKENIZER = {"vocab_size": 64, "z_channels": 8, "patch_nums": [1, 2, 3, 4]}


def write_run(root, depth, *, held_out, steps=10, batch=4):
    from var_jax.transformer import VARConfig
    cfg = VARConfig(depth=depth, num_classes=10, vocab_size=64, z_channels=8, patch_nums=(1, 2, 3, 4))
    run = root / f"d{depth}"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text(json.dumps(
        {"format": "var-jax-model", "version": 1, "tokenizer": TOKENIZER, "var": cfg.to_dict()}))
    # odd depths: a workdir from before train_config.json, whose run config is config.json
    (run / ("config.json" if depth % 2 else "train_config.json")).write_text(
        json.dumps({"batch_size": batch, "total_steps": steps}))
    params, _ = scaling.non_embedding_params(cfg.to_dict())
    loss = float(scaling.power_law(params, ALPHA, BETA))
    records = []
    for step in range(1, steps + 1):
        record = {"step": step, "Lm": loss + 1.0, "Lt": loss + 1.5, "Accm": 10.0, "Acct": 5.0}
        if held_out and step == steps:
            record.update({"val/loss": loss, "val/loss_last": loss * 1.2, "val/acc": 40.0, "val/acc_last": 30.0})
        records.append(record)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 11, "Lm"')
    return cfg


def test_non_embedding_params_exclude_exactly_the_embedding_tables():
    from var_jax.transformer import VARConfig
    cfg = VARConfig(depth=2, num_classes=10, vocab_size=64, z_channels=8, patch_nums=(1, 2, 3, 4))
    params, total = scaling.non_embedding_params(cfg.to_dict())
    C, L = cfg.width, cfg.seq_len
    embeddings = (8 * C + C) + (10 + 1) * C + cfg.first_l * C + L * C + cfg.num_scales * C
    assert total - params == embeddings
    assert params > 12 * cfg.depth * C * C      # blocks: attention + MLP (+ AdaLN) dominate


def test_scaling_command_writes_the_specified_json_and_plots(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for depth in (1, 2, 3):
        write_run(sweep, depth, held_out=True)
    (sweep / "d9").mkdir()                    # unfinished run: no model yet, ignored
    cli_main(["scaling", "--sweep", str(sweep)])
    out = sweep / "scaling"
    report = json.loads((out / "scaling.json").read_text())
    assert [p["run"] for p in report["points"]] == ["d1", "d2", "d3"]
    for point in report["points"]:
        assert {"run", "depth", "params", "flops", "val_loss", "val_loss_last", "val_err",
                "val_err_last"} <= set(point)
        assert point["source"] == "val" and point["val_err"] == pytest.approx(0.6)
        assert point["flops"] == pytest.approx(point["flops_per_example"] * 4 * 10)
    assert report["source"] == "val"
    assert set(report["fits"]) == {f"{m}~{x}" for m in ("val_loss", "val_loss_last") for x in ("params", "flops")}
    assert set(report["fits_skipped"]) == {f"{m}~{x}" for m in ("val_err", "val_err_last")
                                           for x in ("params", "flops")}   # constant error: slope 0
    fit = report["fits"]["val_loss~params"]
    assert set(fit) >= {"alpha", "beta", "r", "alpha_ci"}
    assert fit["alpha"] == pytest.approx(ALPHA, rel=1e-6) and fit["beta"] == pytest.approx(BETA, rel=1e-6)
    assert fit["r"] == pytest.approx(-1.0)
    assert report["pareto"]["val_loss"] == ["d1", "d2", "d3"]
    for name in ("scaling_params.png", "scaling_params.pdf", "scaling_flops.png", "scaling_flops.pdf"):
        assert (out / name).stat().st_size > 1000
    assert "val_loss~params: L = (" in capsys.readouterr().out


def test_scaling_falls_back_to_training_metrics_and_says_so(tmp_path, capsys):
    for depth in (1, 2):
        write_run(tmp_path, depth, held_out=False)
    cli_main(["scaling", "--sweep", str(tmp_path), "--out", str(tmp_path / "fits"), "--no-plots"])
    report = json.loads((tmp_path / "fits" / "scaling.json").read_text())
    assert report["source"] == "train" and all(p["source"] == "train" for p in report["points"])
    assert report["points"][0]["val_err_last"] == pytest.approx(0.95)
    assert "training metrics" in capsys.readouterr().out


def test_scaling_command_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["scaling", "--sweep", str(tmp_path)])
    assert exit_info.value.code == 2 and "no finished runs" in capsys.readouterr().err


# ---- launch/sweep.py -----------------------------------------------------------------------------------------

def sweep(*args):
    return subprocess.run([sys.executable, SWEEP, "--config", "configs/shapes_var.py:batch=8", *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


def test_sweep_dry_run_prints_one_train_command_per_depth_and_skips_finished_runs(tmp_path):
    write_run(tmp_path, 3, held_out=True)
    result = sweep("--depths", "2,3,4", "--sweep-dir", str(tmp_path), "--config.total_steps=2", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    commands = [line for line in lines if " -m var_jax train " in line]
    assert len(commands) == 2 and "d3: finished" in result.stdout
    for depth, command in zip((2, 4), commands):
        assert f"--workdir {tmp_path}/d{depth} " in command
        assert (f"--config.model.depth={depth} --config.model.width={64 * depth} "
                f"--config.model.heads={depth} --config.total_steps=2") in command
    assert not (tmp_path / "d2").exists()
    given = sweep("--depths", "2", "--sweep-dir", str(tmp_path), "--config.model.width=96", "--dry-run")
    assert "--config.model.width=96" in given.stdout and "width=128" not in given.stdout
    bad = sweep("--depths", "2,0", "--sweep-dir", str(tmp_path))
    assert bad.returncode == 2 and "positive" in bad.stderr


def test_sweep_slurm_script_runs_each_depth_through_the_gpu_launcher(tmp_path):
    result = sweep("--depths", "2,5", "--sweep-dir", str(tmp_path), "--slurm", "--config.seed=3")
    assert result.returncode == 0, result.stderr
    script = (tmp_path / "sweep_slurm.sh").read_text()
    assert "#SBATCH --array=0-1" in script and "#SBATCH --signal=TERM@120" in script
    # run task 1 with the launcher replaced by printing its arguments
    fake = script.replace(f"exec bash {REPO_ROOT}/launch/slurm_gpu.sh", "printf '%s\\n'")
    out = subprocess.run(["bash", "-c", fake], env={**os.environ, "SLURM_ARRAY_TASK_ID": "1"},
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["--config", "configs/shapes_var.py:batch=8", "--workdir", f"{tmp_path}/d5",
                   "--config.model.depth=5", "--config.model.width=320", "--config.model.heads=5",
                   "--config.seed=3"]


# ---- end to end (opt-in: minutes of CPU for compiling four models) ------------------------------------------

@pytest.mark.skipif(os.environ.get("VAR_JAX_SWEEP_TEST") != "1",
                    reason="set VAR_JAX_SWEEP_TEST=1: trains a shapes tokenizer and a 3-size sweep of 2 steps each "
                           "(about 10 minutes on 2 shared CPU cores)")
def test_real_three_size_sweep_on_shapes_end_to_end(tmp_path):
    def run(*args):
        subprocess.run([sys.executable, *args], cwd=REPO_ROOT, check=True, timeout=1200)
    run("-m", "var_jax", "train", "--config", "configs/shapes_tokenizer.py:steps=2,batch=8", "--workdir",
        str(tmp_path / "tok"), "--config.sample_every=0")
    run(SWEEP, "--config", "configs/shapes_var.py:steps=2,batch=8", "--depths", "1,2,3", "--sweep-dir",
        str(tmp_path / "sweep"), f"--config.tokenizer_checkpoint={tmp_path / 'tok'}", "--config.log_every=1")
    run("-m", "var_jax", "scaling", "--sweep", str(tmp_path / "sweep"))
    report = json.loads((tmp_path / "sweep" / "scaling" / "scaling.json").read_text())
    assert [p["depth"] for p in report["points"]] == [1, 2, 3]
    assert report["points"][0]["params"] < report["points"][1]["params"] < report["points"][2]["params"]
    assert "val_loss~params" in report["fits"] and (tmp_path / "sweep" / "scaling" / "scaling_flops.png").exists()
