"""Scaling laws from a sweep of training runs: per-run parameters, compute and held-out loss; power-law fits;
the compute Pareto frontier; scaling.json and plots.

A sweep directory holds one ordinary `train` workdir per model size (launch/sweep.py names them d{depth}); a
run counts once it has exported WORKDIR/model/config.json. Per run:

- params (N): non-embedding parameters of the VAR transformer, counted from the model directory's config by
  building the model abstractly (nnx.eval_shape, no weights read). Excluded as embeddings (EMBEDDING_PARAMS):
  the token-latent input projection `word_embed`, the class table `class_emb`, the position tables `pos_start`
  and `pos_1LC`, and the scale table `lvl_embed`; everything else counts (blocks, their AdaLN, the head's
  AdaLN and the output head). `params_total` is every parameter.
- flops (C): training compute, var_jax.train.var.flops.var_train_flops_per_example (matmuls, forward + backward,
  tokenizer excluded) × batch_size (WORKDIR/train_config.json; config.json in older workdirs) × the last logged
  step (the workdir's metrics, var_jax.train.workdir.read_metrics: metrics.jsonl, or metrics/ on a bucket).
- val_loss / val_loss_last / val_err / val_err_last: the last logged `val/loss`, `val/loss_last`, `val/acc`,
  `val/acc_last` (held-out evaluation; accuracies in %, as the training metrics log them; error = 1 - acc/100).
  A run that logged none falls back to the training metrics `Lm`, `Lt`, `Accm`, `Acct`, averaged over its last
  TRAIN_TAIL_RECORDS records (one training batch is noisy), and its point says `source: "train"`.

Fits: L = (β·X)^α by least squares of log L on log X (log L = α·log β + α·log X), with the Pearson
correlation r of the logs and a bootstrap 95% interval for α (resampling runs with replacement, fixed seed;
resamples with a single distinct X are skipped). β is null where α ≈ 0 puts it beyond float range; a
metric that is constant over the runs has no fit (listed in `fits_skipped` with the reason). The paper reports α < 0 (loss falls with size) and r ≈ -1.
"""
from __future__ import annotations

import json
import math

import jax
import numpy as np
from flax import nnx

from var_jax.checkpoints import read_model_config
from var_jax.paths import atomic_write, atomic_write_text, user_path
from var_jax.train.workdir import MODEL_DIR, Workdir, read_metrics
from var_jax.train.var.flops import var_train_flops_per_example
from var_jax.transformer import VAR, VARConfig

METRICS = ("val_loss", "val_loss_last", "val_err", "val_err_last")
X_AXES = ("params", "flops")
# metric -> (held-out key of a metric record, training fallback key, is an accuracy in % to turn into an error)
METRIC_KEYS = {"val_loss": ("val/loss", "Lm", False), "val_loss_last": ("val/loss_last", "Lt", False),
               "val_err": ("val/acc", "Accm", True), "val_err_last": ("val/acc_last", "Acct", True)}
EMBEDDING_PARAMS = ("word_embed", "class_emb", "pos_start", "pos_1LC", "lvl_embed")
TRAIN_TAIL_RECORDS = 5
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0
CI_LEVEL = 0.95
FLAT_TOLERANCE = 1e-9       # relative spread of log y below which y counts as constant (float round-off)
LABELS = {"params": "non-embedding parameters N", "flops": "training compute C (FLOPs)",
          "val_loss": "held-out loss (all tokens)", "val_loss_last": "held-out loss (last scale)",
          "val_err": "token error rate (all tokens)", "val_err_last": "token error rate (last scale)"}


# ---- fits ---------------------------------------------------------------------------------------------------

def _log_regression(log_x: np.ndarray, log_y: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of least squares log_y ≈ slope·log_x + intercept."""
    slope, intercept = np.polyfit(log_x, log_y, 1)
    return float(slope), float(intercept)


def fit_power_law(x, y, *, bootstrap: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                  level: float = CI_LEVEL) -> dict:
    """Fit y = (β·x)^α: {'alpha', 'beta', 'r', 'alpha_ci': [lo, hi], 'n'}. x and y must be positive, with at
    least two distinct x."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of the same length, got {x.shape} and {y.shape}")
    if not (np.all(x > 0) and np.all(y > 0) and np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("a power-law fit needs finite, positive x and y")
    if len(np.unique(x)) < 2:
        raise ValueError("a power-law fit needs at least two distinct x")
    log_x, log_y = np.log(x), np.log(y)
    if np.ptp(log_y) <= FLAT_TOLERANCE * max(1.0, float(np.max(np.abs(log_y)))):
        raise ValueError("y is constant: no power law to fit (alpha = 0 leaves beta undefined)")
    alpha, intercept = _log_regression(log_x, log_y)
    try:
        beta = math.exp(intercept / alpha)
    except OverflowError:
        beta = 0.0
    if not 0.0 < beta < math.inf:    # alpha ≈ 0: beta is beyond float range (null in scaling.json)
        beta = None
    r = float(np.corrcoef(log_x, log_y)[0, 1])
    rng = np.random.default_rng(seed)
    alphas = []
    for _ in range(bootstrap):
        pick = rng.integers(0, len(x), len(x))
        if np.ptp(log_x[pick]) > 0:
            alphas.append(_log_regression(log_x[pick], log_y[pick])[0])
    tail = (1.0 - level) / 2 * 100
    ci = [float(v) for v in np.percentile(alphas, [tail, 100 - tail])] if alphas else [alpha, alpha]
    return {"alpha": alpha, "beta": beta, "r": r, "alpha_ci": ci, "n": int(len(x))}


def power_law(x, alpha: float, beta: float) -> np.ndarray:
    return (beta * np.asarray(x, np.float64)) ** alpha


def pareto_frontier(flops, loss) -> list[int]:
    """Indices of the points no other point beats on both compute and loss (ties in compute: the lower loss),
    in increasing compute: each has a lower loss than every point with at most its compute."""
    order = sorted(range(len(flops)), key=lambda i: (flops[i], loss[i]))
    frontier, best = [], math.inf
    for i in order:
        if loss[i] < best:
            frontier.append(i)
            best = loss[i]
    return frontier


# ---- collecting a sweep -------------------------------------------------------------------------------------

def non_embedding_params(var_config: dict) -> tuple[int, int]:
    """(non-embedding, total) parameters of the VAR transformer described by a model directory's 'var' config."""

    cfg = VARConfig.from_dict(var_config)
    abstract = nnx.eval_shape(lambda: VAR(cfg, rngs=nnx.Rngs(0)))
    total = embedding = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(abstract, nnx.Param)):
        size = int(np.prod(leaf.shape))
        total += size
        top = getattr(path[0], "key", getattr(path[0], "name", None))
        if top in EMBEDDING_PARAMS:
            embedding += size
    return total - embedding, total


def _number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def final_metrics(records: list[dict]) -> tuple[dict, str]:
    """({metric: value or None}, source): the held-out keys when any record has `val/loss`, else the training
    fallback (see the module docstring)."""
    held_out = any(_number(r.get(METRIC_KEYS["val_loss"][0])) is not None for r in records)
    out = {}
    for metric, (val_key, train_key, is_accuracy) in METRIC_KEYS.items():
        if held_out:
            values = [v for v in (_number(r.get(val_key)) for r in records) if v is not None][-1:]
        else:
            values = [v for v in (_number(r.get(train_key)) for r in records) if v is not None][-TRAIN_TAIL_RECORDS:]
        value = float(np.mean(values)) if values else None
        if value is not None and is_accuracy:
            value = 1.0 - value / 100.0
        out[metric] = value
    return out, "val" if held_out else "train"


def collect_run(run_dir) -> dict:
    """One point of scaling.json from a finished training workdir."""

    run_dir = Workdir.at(run_dir)
    model_config = read_model_config(run_dir.model)
    if not model_config.get("var"):
        raise ValueError(f"{run_dir.model}: holds no VAR transformer (a tokenizer run?)")
    run_config = json.loads(run_dir.run_config_path().read_text())
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir}: no metric records")
    var_cfg = VARConfig.from_dict(model_config["var"])
    params, params_total = non_embedding_params(model_config["var"])
    steps = max(int(r.get("step", 0)) for r in records)
    batch = int(run_config["batch_size"])
    flops_per_example = var_train_flops_per_example(var_cfg)
    metrics, source = final_metrics(records)
    return {"run": run_dir.name, "depth": int(var_cfg.depth), "width": int(var_cfg.width), "params": params,
            "params_total": params_total, "flops": flops_per_example * batch * steps,
            "flops_per_example": flops_per_example, "batch_size": batch, "steps": steps, **metrics,
            "source": source}


def find_runs(sweep_dir) -> list[Workdir]:
    """Workdirs under `sweep_dir` (itself included) with an exported model and metrics, by name."""
    sweep_dir = user_path(sweep_dir)
    candidates = [Workdir(p) for p in [sweep_dir] + sorted(p for p in sweep_dir.iterdir() if p.is_dir())]
    return [run for run in candidates if run.finished() and run.has_metrics()]


def analyse(points: list[dict]) -> dict:
    """fits (METRIC~X) and the compute Pareto frontier per metric, over the points that have the metric."""
    fits, skipped, pareto = {}, {}, {}
    for metric in METRICS:
        have = [p for p in points if p.get(metric) is not None and p[metric] > 0]
        if have:
            frontier = pareto_frontier([p["flops"] for p in have], [p[metric] for p in have])
            pareto[metric] = [have[i]["run"] for i in frontier]
        for x in X_AXES:
            key = f"{metric}~{x}"
            try:
                fits[key] = fit_power_law([p[x] for p in have], [p[metric] for p in have])
            except ValueError as e:
                skipped[key] = str(e)
    return {"fits": fits, "fits_skipped": skipped, "pareto": pareto}


def scaling_report(sweep_dir) -> dict:
    points = sorted((collect_run(run) for run in find_runs(sweep_dir)), key=lambda p: (p["params"], p["run"]))
    sources = sorted({p["source"] for p in points})
    return {"sweep": str(user_path(sweep_dir)), "points": points,
            "source": sources[0] if len(sources) == 1 else "mixed",
            "definitions": {
                "params": "non-embedding parameters: all VAR transformer parameters except " + ", ".join(
                    EMBEDDING_PARAMS),
                "flops": "analytic training FLOPs per example (matmuls, forward + backward) x batch_size x steps",
                "fit": "metric = (beta * x) ** alpha, least squares in log-log; r: correlation of the logs; "
                       f"alpha_ci: bootstrap {CI_LEVEL:.0%} interval ({BOOTSTRAP_SAMPLES} resamples, seed "
                       f"{BOOTSTRAP_SEED})",
                "source": "val: held-out val/... metrics; train: no held-out metrics were logged, training "
                          f"Lm/Lt/Accm/Acct averaged over the last {TRAIN_TAIL_RECORDS} records instead"},
            **analyse(points)}


# ---- output -------------------------------------------------------------------------------------------------

def fit_formula(fit: dict, x: str) -> str:
    symbol = {"params": "N", "flops": "C"}[x]
    beta = "out-of-range β" if fit["beta"] is None else f"{fit['beta']:.3g}"
    return f"L = ({beta}·{symbol})^{fit['alpha']:.3g}, r = {fit['r']:.3f}"


def write_plots(report: dict, out_dir) -> list:
    """One log-log figure per x axis (params, flops): each metric's points and fitted line with its formula in
    the legend; the flops figure marks the Pareto frontier. PNG and PDF; returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = user_path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    points, written, source = report["points"], [], report.get("source")
    for x in X_AXES:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, metrics in zip(axes, (("val_loss", "val_loss_last"), ("val_err", "val_err_last"))):
            for metric, colour in zip(metrics, ("C0", "C1")):
                have = [p for p in points if p.get(metric) is not None and p[metric] > 0]
                if not have:
                    continue
                xs, ys = np.array([p[x] for p in have]), np.array([p[metric] for p in have])
                label = LABELS[metric] if source == "val" else LABELS[metric].replace("held-out", "training")
                ax.scatter(xs, ys, color=colour, label=label, zorder=3)
                for p, xv, yv in zip(have, xs, ys):
                    ax.annotate(p["run"], (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=7)
                fit = report["fits"].get(f"{metric}~{x}")
                if fit is not None and fit["beta"] is not None:
                    grid = np.geomspace(xs.min(), xs.max(), 50)
                    ax.plot(grid, power_law(grid, fit["alpha"], fit["beta"]), color=colour, linestyle="--",
                            label=fit_formula(fit, x))
                if x == "flops" and metric in report["pareto"]:
                    front = [p for p in have if p["run"] in report["pareto"][metric]]
                    ax.plot([p["flops"] for p in front], [p[metric] for p in front], color=colour, alpha=0.3,
                            linewidth=4, label=f"Pareto frontier ({metric})")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(LABELS[x])
            ax.set_ylabel("loss" if metrics[0] == "val_loss" else "error rate")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"scaling: {len(points)} runs" + (" (training metrics: no held-out metrics logged)"
                                                       if source != "val" else ""))
        fig.tight_layout()
        for ext in ("png", "pdf"):
            written.append(atomic_write(out_dir / f"scaling_{x}.{ext}",
                                        lambda f, ext=ext: fig.savefig(f, format=ext)))
        plt.close(fig)
    return written


def write_report(report: dict, out_dir):
    out_dir = user_path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "scaling.json", json.dumps(report, indent=2) + "\n")
    return out_dir / "scaling.json"
