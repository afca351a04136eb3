#!/usr/bin/env python
"""The report of a reproduction (launch/reproduce.py): DIR/results.json checked, then DIR/report.md and plots.

    python launch/report.py workdirs/reproduce                    # report.md, plots, conclusions.json in DIR
    python launch/report.py workdirs/reproduce --readme-section   # print the README's research section

Checks, each failure one line naming results.json and the problem (exit status 2): the file exists and is JSON;
'tokenizer' and 'raster_tokenizer' have finite 'psnr' and 'recon_accuracy'; 'scaling' (scaling.json) has points,
every one held-out ('source' 'val'), one per depth of the settings, and finite fits of the held-out loss and
last-scale loss against parameters; 'table3' is a list of rows with distinct 'variant' names, among them raster,
var and var_no_adaln, each with finite params, fid, fid_noise_floor, precision, recall, accuracy and s_per_image.

Writes DIR/report.md (tokenizers, scaling points and fits, Table 3, conclusions, each stage's command and time),
DIR/scaling_params.{png,pdf} and DIR/scaling_flops.{png,pdf} (var_jax/eval/scaling.py's paper-style plots),
DIR/table3_fid.png (each row's FID beside the real-vs-real noise floor) and DIR/conclusions.json: the claims a
rerun with another seed should repeat, each true or false. --readme-section prints the markdown the README's
research section is made of, with image links under --assets (where the committed results live).

It lives in launch/ beside the pipeline whose layout it reads; nothing in var_jax depends on it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))               # var_jax from a checkout that is not pip-installed
sys.path.insert(0, str(REPO_ROOT / "launch"))    # ablations.make_table: Table 3's one layout

from var_jax.cli.common import CommandError, exit_on_command_error  # noqa: E402
from var_jax.paths import read_json_object  # noqa: E402

RESULTS = "results.json"
TOKENIZER_KEYS = ("tokenizer", "raster_tokenizer")
TOKENIZER_FIELDS = ("psnr", "recon_accuracy")
REQUIRED_FITS = ("val_loss~params", "val_loss_last~params")
REQUIRED_VARIANTS = ("raster", "var", "var_no_adaln")
TABLE3_FIELDS = ("params", "fid", "fid_noise_floor", "precision", "recall", "accuracy", "s_per_image")
RECON_ACCURACY_TARGET = 0.95     # the bar for a tokenizer whose samples the classifier can read
PLOTS = ("scaling_params.png", "scaling_flops.png", "table3_fid.png")


class ResultsError(CommandError):
    """results.json is missing, unreadable or inconsistent: one line naming the file and the problem."""


# ---- checks ---------------------------------------------------------------------------------------------------

def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_results(directory) -> dict:
    path = Path(directory) / RESULTS
    results = read_json_object(path, ResultsError, f"run launch/reproduce.py --out {directory} first")
    check_results(results, path)
    return results


def check_results(results: dict, path) -> None:
    """Raise ResultsError on the first problem (see the module docstring)."""
    def fail(message):
        raise ResultsError(f"{path}: {message}")

    for key in (*TOKENIZER_KEYS, "scaling", "table3"):
        if key not in results:
            fail(f"missing key '{key}' (its stage of launch/reproduce.py has not finished)")
    for key in TOKENIZER_KEYS:
        for field in TOKENIZER_FIELDS:
            if not _finite((results[key] or {}).get(field)):
                fail(f"{key}.{field} is {(results[key] or {}).get(field)!r}, not a finite number")

    scaling = results["scaling"]
    points = scaling.get("points") if isinstance(scaling, dict) else None
    if not points:
        fail("scaling has no points")
    for point in points:
        if point.get("source") != "val":
            fail(f"scaling point {point.get('run')!r} has source {point.get('source')!r}, not held-out ('val')")
    depths = (results.get("settings") or {}).get("depths")
    if depths is not None and sorted(p.get("depth") for p in points) != sorted(depths):
        fail(f"scaling points are depths {sorted(p.get('depth') for p in points)}, the settings' depths {depths}")
    for key in REQUIRED_FITS:
        fit = scaling.get("fits", {}).get(key)
        if fit is None or not all(_finite(fit.get(f)) for f in ("alpha", "r")):
            fail(f"scaling fit {key} is missing or not finite ({scaling.get('fits_skipped', {}).get(key, fit)})")

    rows = results["table3"]
    if not isinstance(rows, list) or not rows:
        fail("table3 is not a non-empty list of rows")
    names = [row.get("variant") if isinstance(row, dict) else None for row in rows]
    if not all(isinstance(n, str) and n for n in names):
        fail("table3 has a row without a 'variant' name")
    if len(set(names)) != len(names):
        fail(f"table3 names a variant twice: {names}")
    missing = [v for v in REQUIRED_VARIANTS if v not in names]
    if missing:
        fail(f"table3 has no row for variant(s) {', '.join(missing)}")
    for row in rows:
        for field in TABLE3_FIELDS:
            if not _finite(row.get(field)):
                fail(f"table3 row {row['variant']!r}: {field} is {row.get(field)!r}, not a finite number")


# ---- conclusions -------------------------------------------------------------------------------------------------

def conclusions(results: dict) -> list[dict]:
    """The claims a rerun should repeat: [{'claim', 'holds', 'evidence'}]."""
    rows = {row["variant"]: row for row in results["table3"]}
    fits = results["scaling"]["fits"]
    out = []
    for key in TOKENIZER_KEYS:
        acc = results[key]["recon_accuracy"]
        out.append({"claim": f"{key}: the shapes classifier labels >= {RECON_ACCURACY_TARGET:.0%} of reconstructions "
                             "correctly", "holds": acc >= RECON_ACCURACY_TARGET, "evidence": f"{acc:.1%}"})
    for key in REQUIRED_FITS:
        fit = fits[key]
        lo, hi = fit["alpha_ci"]
        out.append({"claim": f"{key}: held-out loss falls with size (alpha < 0, 95% interval below 0)",
                    "holds": fit["alpha"] < 0 and hi < 0,
                    "evidence": f"alpha {fit['alpha']:.3g} [{lo:.3g}, {hi:.3g}], r {fit['r']:.3f}"})

    def fid_claim(better: str, worse: str, text: str):
        if better in rows and worse in rows:
            a, b = rows[better]["fid"], rows[worse]["fid"]
            out.append({"claim": text, "holds": a < b, "evidence": f"FID {a:.3g} vs {b:.3g}"})
    fid_claim("var", "raster", "next-scale VAR has a lower FID than raster AR (the paper's Table 3)")
    fid_claim("var", "var_no_adaln", "AdaLN lowers VAR's FID")
    fid_claim("var_topk", "var", "top-k lowers VAR's FID")
    fid_claim("var_topk_cfg", "var_topk", "classifier-free guidance lowers it further")
    if "var" in rows and "raster" in rows:
        out.append({"claim": "VAR samples are classified correctly more often than raster AR's",
                    "holds": rows["var"]["accuracy"] > rows["raster"]["accuracy"],
                    "evidence": f"{rows['var']['accuracy']:.1%} vs {rows['raster']['accuracy']:.1%}"})
    return out


# ---- markdown ---------------------------------------------------------------------------------------------------

def _duration(seconds) -> str:
    seconds = float(seconds)
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 \
        else f"{seconds:.0f} s"


def tokenizer_table(results: dict) -> list[str]:
    lines = ["| tokenizer | training steps | held-out PSNR | classifier accuracy on reconstructions | on the real "
             "images | reconstructions in-distribution |", "|---|---|---|---|---|---|"]
    for key in TOKENIZER_KEYS:
        t = results[key]
        lines.append(f"| {key.replace('_', ' ')} | {t.get('steps', '?')} | {t['psnr']:.1f} dB | "
                     f"{t['recon_accuracy']:.1%} | {t.get('real_accuracy', float('nan')):.1%} | "
                     f"{t.get('recon_in_distribution', float('nan')):.1%} |")
    n = results["tokenizer"].get("num_images", "?")
    lines += ["", f"On the first {n} held-out shapes (the 'val' split, centre crops; var_jax/eval/reconstruction.py): "
              "PSNR per image on uint8 pixels, averaged; accuracy of the shapes classifier against each shape's class."]
    return lines


def scaling_section(scaling: dict, assets: str) -> list[str]:
    from var_jax.eval.scaling import fit_formula
    lines = ["| run | N (non-embedding) | C (FLOPs) | steps | held-out loss | last-scale loss | "
             "last-scale token error |", "|---|---|---|---|---|---|---|"]
    for p in scaling["points"]:
        err = "–" if p.get("val_err_last") is None else f"{p['val_err_last']:.1%}"
        lines.append(f"| {p['run']} | {p['params']:.3g} | {p['flops']:.3g} | {p['steps']} | {p['val_loss']:.4f} | "
                     f"{p['val_loss_last']:.4f} | {err} |")
    lines.append("")
    for key, fit in scaling["fits"].items():
        x = key.partition("~")[2]
        lo, hi = fit["alpha_ci"]
        lines.append(f"- `{key}`: {fit_formula(fit, x)}, α 95 % bootstrap interval [{lo:.3g}, {hi:.3g}], "
                     f"{fit['n']} runs")
    for key, why in scaling.get("fits_skipped", {}).items():
        lines.append(f"- `{key}`: no fit ({why})")
    lines += ["", f"![held-out loss and error against parameters]({assets}scaling_params.png)",
              f"![held-out loss and error against compute]({assets}scaling_flops.png)"]
    return lines


def table3_section(results: dict, assets: str) -> list[str]:
    from ablations import make_table
    rows = list(results["table3"]) + ([results["table3_real"]] if results.get("table3_real") else [])
    return [make_table(rows, results.get("table3_meta") or {}).rstrip(),
            "", f"![FID of each row beside the real-vs-real noise floor]({assets}table3_fid.png)"]


def conclusions_section(claims: list[dict]) -> list[str]:
    lines = ["| claim | holds | evidence |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {'yes' if c['holds'] else '**no**'} | {c['evidence']} |" for c in claims]
    return lines


def runs_section(results: dict) -> list[str]:
    timings, commands = results.get("timings", {}), results.get("commands", {})
    settings, env = results.get("settings", {}), results.get("environment", {})
    total = sum(timings.values())
    lines = [f"Settings: `{json.dumps(settings)}`. Machine: {env.get('device', '?')}, {env.get('cpu_count', '?')} "
             f"CPU cores, jax {env.get('jax', '?')}. Total wall time of the stages: {_duration(total)}.", "",
             "| stage | wall time | commands |", "|---|---|---|"]
    for stage, seconds in timings.items():
        cells = "<br>".join(f"`{c}`" for c in commands.get(stage, [])) or "–"
        lines.append(f"| {stage} | {_duration(seconds)} | {cells} |")
    return lines


def render(results: dict, claims: list[dict], assets: str = "", heading: str = "#") -> str:
    seed = results.get("settings", {}).get("seed", "?")
    parts = [f"{heading} Research results (launch/reproduce.py, seed {seed})", "",
             f"{heading}# Tokenizers", "", *tokenizer_table(results), "",
             f"{heading}# Scaling law on held-out loss", "", *scaling_section(results["scaling"], assets), "",
             f"{heading}# Table 3", "", *table3_section(results, assets), "",
             f"{heading}# Conclusions", "", *conclusions_section(claims), "",
             f"{heading}# Commands and time", "", *runs_section(results), ""]
    return "\n".join(parts)


# ---- plots ------------------------------------------------------------------------------------------------------

def plot_table3(results: dict, path: Path) -> None:
    """FID per row (bars) with the real-vs-real noise floor (a line)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from var_jax.paths import atomic_write
    rows = results["table3"]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(rows)), 3.5))
    ax.bar([r["variant"] for r in rows], [r["fid"] for r in rows], color="C0", label="FID of the samples")
    ax.axhline(rows[0]["fid_noise_floor"], color="C3", linestyle="--", label="real vs real (noise floor)")
    ax.set_ylabel("FID (shapes feature space)")
    ax.set_yscale("log")
    ax.tick_params(axis="x", labelrotation=30)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def write_report(directory, results: dict, plots: bool = True) -> list[Path]:
    from var_jax.eval.scaling import write_plots
    from var_jax.paths import atomic_write_text
    directory = Path(directory)
    claims = conclusions(results)
    if plots:
        write_plots(results["scaling"], directory)
        plot_table3(results, directory / "table3_fid.png")
    atomic_write_text(directory / "report.md", render(results, claims))
    atomic_write_text(directory / "conclusions.json", json.dumps(claims, indent=2) + "\n")
    return [directory / "report.md", directory / "conclusions.json", *(directory / p for p in PLOTS if plots)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="launch/report.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="the --out directory of launch/reproduce.py (holds results.json)")
    parser.add_argument("--readme-section", action="store_true",
                        help="print the README's research section (markdown) instead of writing the report")
    parser.add_argument("--no-plots", action="store_true", help="write report.md and conclusions.json only")
    parser.add_argument("--assets", default="docs/results/",
                        help="where the README's image links point (default docs/results/)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    results = read_results(args.dir)
    if args.readme_section:
        print(render(results, conclusions(results), assets=args.assets.rstrip("/") + "/", heading="##"))
        return 0
    written = write_report(args.dir, results, plots=not args.no_plots)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_command_error("launch/report.py", main))
