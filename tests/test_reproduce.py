"""The research pipeline: launch/report.py's checks and report, `scaling --require-held-out`, launch/reproduce.py's
stage order, skipping and resuming (the training commands stubbed, the scaling and report stages real),
launch/ablations.py's commands and its evaluation of real (random, tiny) model directories with a stand-in
sampler, and var_jax/eval/reconstruction.py against an eager reference."""
import copy
import importlib.util
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng()


def _module(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _module("report")
reproduce = _module("reproduce")
ablations = _module("ablations")


# ---- launch/report.py ------------------------------------------------------------------------------------------

def synthetic_scaling(depths, alpha):
    """scaling.json of a sweep whose held-out losses follow (1e-3·N)^alpha with a little noise."""
    from var_jax.eval import scaling
    params = np.sort(RNG.uniform(1.0, 2.0, len(depths)) * 4.0 ** np.arange(len(depths)) * 1e5)
    points = []
    for depth, n in zip(depths, params):
        loss = float((1e-3 * n) ** alpha * math.exp(RNG.normal(0, 0.002)))
        points.append({"run": f"d{depth}", "depth": depth, "params": float(n), "flops": float(n * 3e6), "steps": 50,
                       "val_loss": loss, "val_loss_last": 1.2 * loss, "val_err": 0.5, "val_err_last": 0.6,
                       "source": "val"})
    return {"points": points, "source": "val", **scaling.analyse(points)}


def synthetic_results(depths=(1, 2, 3, 4, 5)):
    rows = []
    for variant, (description, model, kind) in ablations.VARIANTS.items():
        order, adaln = ablations.MODELS[model]
        rows.append({"variant": variant, "description": description, "model": model, "order": order, "adaln": adaln,
                     "sampling": {"cfg": 1.5 if kind == "top_k_cfg" else 0.0, "top_k": 0 if kind == "plain" else 112},
                     "depth": 2, "width": 128, "params": int(RNG.integers(600_000, 700_000)), "params_total": 800_000,
                     "val_loss": float(RNG.uniform(2, 4)), "val_loss_last": float(RNG.uniform(2, 4)),
                     "loss_source": "val", "fid": float(RNG.uniform(1, 20)), "fid_noise_floor": 0.4,
                     "precision": float(RNG.uniform()), "recall": float(RNG.uniform()),
                     "accuracy": float(RNG.uniform()), "s_per_image": float(RNG.uniform(1e-3, 1e-2))})
    real = {"variant": "real", "description": "held-out real shapes (noise floor)", "order": "", "adaln": None,
            "params": None, "fid": 0.4, "fid_noise_floor": 0.4, "precision": 0.9, "recall": 0.9, "accuracy": 1.0}
    tokenizer = lambda: {"psnr": float(RNG.uniform(15, 30)), "recon_accuracy": float(RNG.uniform(0.9, 1.0)),
                         "real_accuracy": 1.0, "recon_in_distribution": 0.9, "num_images": 1000, "steps": 10}
    return {"settings": {"depths": list(depths), "seed": 0}, "tokenizer": tokenizer(), "raster_tokenizer": tokenizer(),
            "scaling": synthetic_scaling(depths, alpha=-float(RNG.uniform(0.05, 0.3))), "table3": rows,
            "table3_meta": {"steps": 50, "depth": 2, "batch": 32, "num_samples": 1000, "num_refs": 1000, "seed": 0},
            "table3_real": real, "timings": {"tokenizers": 12.5, "sweep": 2400.0},
            "commands": {"tokenizers": ["python -m var_jax train --config configs/shapes_tokenizer.py"]}}


@pytest.fixture(scope="module")
def valid_results():
    """A fresh synthetic results.json content, drawn once per module (its fits take a second); copy to change."""
    return synthetic_results()


def write_results(directory, results):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.json").write_text(json.dumps(results))
    return directory


def test_report_writes_markdown_plots_and_conclusions(tmp_path, capsys):
    results = synthetic_results()
    write_results(tmp_path, results)
    assert report.main([str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    for row in results["table3"]:
        assert f"| {row['fid']:.4g} | 0.4 |" in text, row["variant"]          # FID and the floor
    for point in results["scaling"]["points"]:
        assert f"| {point['run']} |" in text and f"{point['val_loss']:.4f}" in text
    assert f"{results['tokenizer']['psnr']:.1f} dB" in text and "| sweep | 40.0 min |" in text
    for name in ("scaling_params.png", "scaling_flops.png", "table3_fid.png"):
        assert (tmp_path / name).stat().st_size > 1000
    claims = {c["claim"]: c["holds"] for c in json.loads((tmp_path / "conclusions.json").read_text())}
    fid = {r["variant"]: r["fid"] for r in results["table3"]}
    assert claims["next-scale VAR has a lower FID than raster AR (the paper's Table 3)"] == (fid["var"] < fid["raster"])
    assert claims["top-k lowers VAR's FID"] == (fid["var_topk"] < fid["var"])
    alpha, (lo, hi) = (results["scaling"]["fits"]["val_loss~params"][k] for k in ("alpha", "alpha_ci"))
    assert lo <= alpha <= hi < 0     # a clean synthetic law: the claim must hold
    assert claims["val_loss~params: held-out loss falls with size (alpha < 0, 95% interval below 0)"]
    capsys.readouterr()
    assert report.main([str(tmp_path), "--readme-section"]) == 0
    section = capsys.readouterr().out
    assert section.startswith("## Research results") and "(docs/results/scaling_params.png)" in section


def _without(key):
    def change(results):
        del results[key]
    return change


def _set_point_source(results):
    results["scaling"]["points"][2]["source"] = "train"


def _drop_variant(results):
    results["table3"] = [r for r in results["table3"] if r["variant"] != "var_no_adaln"]


def _nan_fid(results):
    results["table3"][1]["fid"] = float("nan")


def _fewer_points(results):
    results["scaling"]["points"] = results["scaling"]["points"][:-1]


def _duplicate_variant(results):
    results["table3"].append(dict(results["table3"][0]))


def _string_psnr(results):
    results["raster_tokenizer"]["psnr"] = "21 dB"


@pytest.mark.parametrize("change, message", [
    (_without("table3"), "missing key 'table3'"),
    (_without("raster_tokenizer"), "missing key 'raster_tokenizer'"),
    (_set_point_source, "scaling point 'd3' has source 'train', not held-out"),
    (_drop_variant, "table3 has no row for variant(s) var_no_adaln"),
    (_nan_fid, "fid is nan, not a finite number"),
    (_fewer_points, "scaling points are depths [1, 2, 3, 4], the settings' depths [1, 2, 3, 4, 5]"),
    (_duplicate_variant, "table3 names a variant twice"),
    (_string_psnr, "raster_tokenizer.psnr is '21 dB'"),
])
def test_report_refuses_inconsistent_results_in_one_line(tmp_path, valid_results, change, message):
    results = copy.deepcopy(valid_results)
    change(results)
    write_results(tmp_path, results)
    with pytest.raises(report.ResultsError) as error:
        report.main([str(tmp_path)])
    assert message in str(error.value) and "\n" not in str(error.value)
    assert str(error.value).startswith(str(tmp_path / "results.json"))
    assert not (tmp_path / "report.md").exists()


def test_report_on_a_missing_or_broken_file_exits_2_with_one_line(tmp_path):
    missing = subprocess.run([sys.executable, str(ROOT / "launch" / "report.py"), str(tmp_path)],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.count("\n") == 1 and "results.json: no such file" in missing.stderr
    (tmp_path / "results.json").write_text('{"tokenizer": ')
    with pytest.raises(report.ResultsError, match="results.json: not valid JSON"):
        report.main([str(tmp_path)])
    (tmp_path / "results.json").write_text('[1, 2]')
    with pytest.raises(report.ResultsError, match="results.json: expected a JSON object, got list"):
        report.main([str(tmp_path)])


def test_scaling_require_held_out_names_the_runs_without_held_out_loss(tmp_path, capsys):
    from test_scaling import write_run
    from var_jax.cli import main as cli_main
    write_run(tmp_path, 1, held_out=True)
    write_run(tmp_path, 2, held_out=False)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["scaling", "--sweep", str(tmp_path), "--require-held-out", "--no-plots"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "run(s) d2 logged no held-out val/loss" in err
    assert not (tmp_path / "scaling").exists()


# ---- launch/reproduce.py ---------------------------------------------------------------------------------------

def _option(argv, name):
    return argv[argv.index(name) + 1]


class StubCommands:
    """Stands in for reproduce.run_command: each training-like command writes the outputs its stage reads
    (finished workdirs, token directories, a sweep whose held-out losses follow a power law, table3.json); the
    scaling and report commands run for real, in this process (without their plots). `fail` names a command
    kind to fail once."""

    def __init__(self, fail=None):
        self.calls, self.fail = [], fail

    @staticmethod
    def kind(argv):
        if "launch/sweep.py" in argv:
            return "sweep"
        if "launch/ablations.py" in argv:
            return "ablations"
        if "launch/report.py" in argv:
            return "report"
        return argv[argv.index("var_jax") + 1]     # train | tokenize | scaling

    def __call__(self, argv):
        argv = [str(a) for a in argv]
        kind = self.kind(argv)
        self.calls.append((kind, argv))
        if kind == self.fail:
            self.fail = None
            return 1
        return getattr(self, kind)(argv) or 0

    def train(self, argv):
        from var_jax.tokenizer.config import TokenizerConfig
        raster = "stage=tokenizer" in _option(argv, "--config")
        cfg = TokenizerConfig(vocab_size=32, z_channels=4, ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1,
                              patch_nums=(4,) if raster else (1, 2, 3, 4))
        workdir = Path(_option(argv, "--workdir"))
        (workdir / "model").mkdir(parents=True)    # the exported model's config: all the later stages read of it
        (workdir / "model" / "config.json").write_text(json.dumps(
            {"format": "var-jax-model", "version": 1, "tokenizer": cfg.to_dict(), "var": None}))
        (workdir / "metrics.jsonl").write_text(json.dumps({"step": 2, "val/psnr": 9.5}) + "\n")

    def tokenize(self, argv):
        out = Path(_option(argv, "--out"))
        out.mkdir(parents=True)
        (out / "meta.json").write_text(json.dumps({"count": int(_option(argv, "--count"))}))

    def sweep(self, argv):
        from test_scaling import write_run
        for depth in map(int, _option(argv, "--depths").split(",")):
            write_run(Path(_option(argv, "--sweep-dir")), depth, held_out=True)

    def scaling(self, argv):
        from var_jax.cli import main as cli_main
        cli_main(argv[argv.index("scaling"):] + ["--no-plots"])    # plots: test_report_writes_markdown_...

    def ablations(self, argv):
        results = synthetic_results()
        table = {"meta": results["table3_meta"], "rows": results["table3"], "real": results["table3_real"]}
        (Path(_option(argv, "--out")) / "table3.json").parent.mkdir(parents=True)
        (Path(_option(argv, "--out")) / "table3.json").write_text(json.dumps(table))

    def report(self, argv):
        return report.main(argv[argv.index("launch/report.py") + 1:] + ["--no-plots"])


@pytest.fixture
def stubbed(monkeypatch):
    def install(stub):
        monkeypatch.setattr(reproduce, "run_command", stub)
        monkeypatch.setattr(reproduce, "measure_tokenizer", lambda path, n: {
            "psnr": 20.0, "recon_accuracy": 0.97, "real_accuracy": 1.0, "num_images": n})
        return stub
    return install


def test_reproduce_runs_the_stages_in_order_then_skips_them(tmp_path, stubbed):
    stub = stubbed(StubCommands())
    out = tmp_path / "run"
    assert reproduce.main(["--out", str(out), "--quick", "--seed", "7"]) == 0
    kinds = [kind for kind, _ in stub.calls]
    assert kinds == ["train", "train", "tokenize", "tokenize", "tokenize", "tokenize", "sweep", "scaling",
                     "ablations", "report"]
    results = json.loads((out / "results.json").read_text())
    assert results["stages_done"] == list(reproduce.STAGES) and set(results["timings"]) == set(reproduce.STAGES)
    assert results["tokenizer"]["recon_accuracy"] == 0.97 and results["tokenizer"]["train_val_psnr"] == 9.5
    assert [p["source"] for p in results["scaling"]["points"]] == ["val", "val"]
    assert {r["variant"] for r in results["table3"]} >= {"raster", "var", "var_no_adaln", "var_topk", "var_topk_cfg"}
    assert "VAR + top-k + CFG" in (out / "report.md").read_text()

    calls = dict((kind, argv) for kind, argv in stub.calls)
    train = shlex.join(stub.calls[0][1])
    assert "--config configs/shapes_tokenizer.py:steps=2,batch=8,latent=4,vocab=64,cvae=8" in train and "--config.seed=7" in train
    assert "configs/shapes_raster.py:stage=tokenizer,steps=2,batch=8,latent=4,vocab=64,cvae=8" in shlex.join(stub.calls[1][1])
    tokenize = [argv for kind, argv in stub.calls if kind == "tokenize"]
    assert [_option(a, "--count") for a in tokenize] == ["16", "16", "16", "16"]    # pool: 2 steps x 8; 16 held out
    assert ["--split" in a for a in tokenize] == [False, True, False, True]
    assert _option(tokenize[0], "--config") == "configs/shapes_var.py:image_size=32,latent=4"
    assert _option(tokenize[2], "--config") == "configs/shapes_raster.py:image_size=32,latent=4"
    sweep = shlex.join(calls["sweep"])
    for item in ("--depths 1,2", "--config.total_steps=2", "--config.eval_every=2", "--config.seed=7",
                 "--config.data.name=tokens", f"--config.data.dir={out / 'tokens/scale/train'}",
                 f"--config.data.eval_dir={out / 'tokens/scale/val'}"):
        assert item in sweep, item
    assert "--require-held-out" in calls["scaling"]
    ablation = shlex.join(calls["ablations"])
    assert f"--var-run {out / 'sweep/d1'}" in ablation and "--seed 7" in ablation
    assert f"--raster-tokens {out / 'tokens/raster/train'}" in ablation
    assert results["commands"]["sweep"] == [sweep.replace(sys.executable, "python", 1)]     # as a reader types it

    stub.calls.clear()
    assert reproduce.main(["--out", str(out), "--quick", "--seed", "7"]) == 0
    assert [kind for kind, _ in stub.calls] == ["report"]          # every other stage is done
    with pytest.raises(reproduce.CommandError, match=r"other settings \(seed: 7\)"):
        reproduce.main(["--out", str(out), "--quick", "--seed", "8"])


def test_reproduce_resumes_at_the_failed_stage(tmp_path, stubbed):
    stub = stubbed(StubCommands(fail="sweep"))
    out = tmp_path / "run"
    with pytest.raises(reproduce.CommandError, match="needs stage.s. tokenizers,tokenize first"):
        reproduce.main(["--out", str(out), "--quick", "--stages", "sweep"])
    assert reproduce.main(["--out", str(out), "--quick"]) == 1
    results = json.loads((out / "results.json").read_text())
    assert results["stages_done"] == ["tokenizers", "tokenize"] and "sweep" in results["timings"]
    assert "scaling" not in results
    stub.calls.clear()
    assert reproduce.main(["--out", str(out), "--quick", "--stages", "sweep,scaling"]) == 0
    assert [kind for kind, _ in stub.calls] == ["sweep", "scaling"]
    assert reproduce.main(["--out", str(out), "--quick"]) == 0
    assert [kind for kind, _ in stub.calls][2:] == ["ablations", "report"]
    assert json.loads((out / "results.json").read_text())["stages_done"] == list(reproduce.STAGES)


# ---- launch/ablations.py ---------------------------------------------------------------------------------------

V, CVAE, CLASSES = 64, 8, 10       # the conftest tokenizer's vocabulary and latent channels; the shapes classes


@pytest.fixture(scope="module")
def raster_tokenizer_dir(tmp_path_factory):
    """A tiny random single-scale tokenizer: the conftest tokenizer's shape with patch_nums (4,)."""
    from flax import nnx

    from var_jax.checkpoints import save_model_dir
    from var_jax.tokenizer.config import TokenizerConfig
    from var_jax.tokenizer.vqvae import VQVAE
    cfg = TokenizerConfig(vocab_size=V, z_channels=CVAE, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, patch_nums=(4,),
                          share_quant_resi=1)
    path = tmp_path_factory.mktemp("raster_tok") / "model"
    save_model_dir(path, tokenizer=(cfg, VQVAE(cfg, rngs=nnx.Rngs(1))))
    return path


def finished_run(workdir, tokenizer_dir, *, order="scale", adaln=True, width=32, steps=5):
    """A workdir as `train` leaves it: an exported model (tokenizer + random tiny VAR), its run config, metrics."""
    from flax import nnx

    from var_jax.checkpoints import load_model_dir, save_model_dir
    from var_jax.transformer import VAR, VARConfig
    tok = load_model_dir(tokenizer_dir)
    cfg = VARConfig(depth=1, width=width, heads=1, num_classes=CLASSES, vocab_size=V, z_channels=CVAE,
                    patch_nums=tok.tokenizer_config.patch_nums, adaln=adaln, order=order, cond_drop_rate=0.1)
    save_model_dir(workdir / "model", tokenizer=(tok.tokenizer_config, tok.tokenizer),
                   var=(cfg, VAR(cfg, rngs=nnx.Rngs(int(RNG.integers(1 << 30))))))
    (workdir / "train_config.json").write_text(json.dumps({"batch_size": 8, "total_steps": steps}))
    loss = float(RNG.uniform(3, 4))
    (workdir / "metrics.jsonl").write_text(json.dumps({"step": steps, "val/loss": loss, "val/loss_last": loss + 0.1,
                                                       "val/acc": 5.0, "val/acc_last": 4.0}) + "\n")


def test_ablation_commands_names_tokens_seed_legacy_dirs_and_the_shared_var_run(tmp_path, capsys, tokenizer_dir,
                                                                                raster_tokenizer_dir):
    out = tmp_path / "ab"
    finished_run(out / "var_noadaln", tokenizer_dir, adaln=False)          # a finished run under its old name
    finished_run(tmp_path / "sweep_d2", tokenizer_dir, steps=5)
    common = ["--tokenizer", str(tokenizer_dir), "--raster-tokenizer", str(raster_tokenizer_dir), "--out", str(out),
              "--steps", "5", "--depth", "2", "--seed", "3", "--dry-run"]
    tokens = ["--tokens", "T", "--eval-tokens", "TV", "--raster-tokens", "R", "--raster-eval-tokens", "RV"]
    assert ablations.main(common + tokens + ["--var-run", str(tmp_path / "sweep_d2")]) == 0
    printed = capsys.readouterr().out
    commands = {Path(_option(line.split(), "--workdir")).name: line for line in printed.splitlines()
                if " -m var_jax train " in line}
    assert set(commands) == {"raster", "raster_no_adaln"}           # var_no_adaln: finished; var: the sweep's run
    assert "var_no_adaln: finished" in printed and "var: finished" in printed
    for name, line in commands.items():
        assert "--config configs/shapes_raster.py:depth=2,image_size=16,latent=4 " in line
        assert "--config.data.name=tokens --config.data.dir=R --config.data.eval_dir=RV" in line
        assert "--config.seed=3" in line and "--config.eval_every=5" in line
    assert "--config.model.adaln=True --config.model.width=128" in commands["raster"]
    width = int(commands["raster_no_adaln"].split("--config.model.width=")[1].split()[0])
    assert width > 128 and width % 4 == 0                            # widened to match, a multiple of 2·heads

    assert ablations.main(common) == 0
    printed = capsys.readouterr().out
    var = next(line for line in printed.splitlines() if f"--workdir {out / 'var'} " in line)
    assert "--config configs/shapes_var.py:depth=2,image_size=16,latent=4 " in var and "data.name" not in var
    for bad, message in ((["--tokens", "T"], "--tokens and --eval-tokens go together"),
                         (["--num-refs", "9000"], "at most 8000")):
        with pytest.raises(SystemExit):
            ablations.main(common + bad)
        assert message in capsys.readouterr().err
    with pytest.raises(ablations.CommandError, match="trained 5 steps, not --steps 6"):
        ablations.main([a if a != "5" else "6" for a in common] + ["--var-run", str(tmp_path / "sweep_d2")])
    assert ablations.default_top_k(512) == 112 and ablations.default_top_k(4096) == 900


def _independent_fid(a, b):
    """Fréchet distance through the eigenvalues of Σa·Σb (not scipy's sqrtm)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_trace = np.sum(np.sqrt(np.clip(np.linalg.eigvals(sa @ sb).real, 0, None)))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(sa) + np.trace(sb) - 2 * root_trace)


FAKE_SAMPLE_START = 5000     # held-out shapes the stand-in sampler returns (after the references and the floor)


class RealShapesSampler:
    """Stands in for var_jax.sample.runner.Sampler (whose compiles take most of a minute here): sample j of a call
    is held-out shape FAKE_SAMPLE_START + j, of class j % 10 like the requested label; with top-k 1 (greedy) every
    sample of a class is that class's first shape. Records the options of every sampler made."""
    made = []

    def __init__(self, bundle, options):
        self.options = options
        RealShapesSampler.made.append((bundle.var_config, options))

    def __call__(self, labels, image_ids, seed, pad_to):
        from var_jax.eval.shapes_classifier import render_like_pipeline
        from var_jax.images import to_unit_range, to_uint8
        ids = np.asarray(image_ids) % 10 if self.options.top_k == 1 else np.asarray(image_ids)
        assert np.array_equal(ids % 10, labels) and pad_to == 32
        return {"images": to_uint8(to_unit_range(render_like_pipeline(FAKE_SAMPLE_START + ids, 16, train=False)))}


def test_ablation_table_samples_each_row_its_way_and_reuses_finished_rows(tmp_path, capsys, monkeypatch,
                                                                        tokenizer_dir, raster_tokenizer_dir):
    from PIL import Image

    from var_jax.eval.shapes_classifier import render_like_pipeline, shape_features
    from var_jax.sample import runner
    monkeypatch.setattr(runner, "Sampler", RealShapesSampler)
    RealShapesSampler.made.clear()
    out = tmp_path / "ab"
    finished_run(out / "raster", raster_tokenizer_dir, order="raster")
    finished_run(out / "var", tokenizer_dir, width=40)        # var_no_adaln not trained: left out of the table
    argv = ["--tokenizer", str(tokenizer_dir), "--raster-tokenizer", str(raster_tokenizer_dir), "--out", str(out),
            "--steps", "5", "--depth", "1", "--no-raster-no-adaln", "--table-only", "--num-samples", "96",
            "--num-refs", "100", "--top-k", "1"]
    assert ablations.main(argv) == 0
    table = json.loads((out / "table3.json").read_text())
    rows = {r["variant"]: r for r in table["rows"]}
    assert list(rows) == ["raster", "var", "var_topk", "var_topk_cfg"]
    assert "var_no_adaln: no exported model" in capsys.readouterr().err
    made = [(cfg.order, o.cfg, o.top_k, o.top_p) for cfg, o in RealShapesSampler.made]
    assert made == [("raster", 0.0, 0, 0.0), ("scale", 0.0, 0, 0.0), ("scale", 0.0, 1, 0.0), ("scale", 1.5, 1, 0.0)]
    assert rows["raster"]["width"] == 32 and rows["var"]["width"] == rows["var_topk_cfg"]["width"] == 40
    assert rows["var_topk_cfg"]["sampling"] == {"cfg": 1.5, "cfg_schedule": "linear", "top_k": 1, "top_p": 0.0}
    assert rows["raster"]["val_loss"] != rows["var"]["val_loss"]               # each row its own model's loss
    # FIDs against an independent computation: the floor (96 other held-out shapes) and a plain row's samples
    features = lambda start, n: shape_features(render_like_pipeline(np.arange(start, start + n), 16, train=False))
    refs = features(2000, 100).astype(np.float64)
    assert table["real"]["fid"] == pytest.approx(_independent_fid(refs, features(2100, 96)), rel=1e-4)
    assert rows["var"]["fid"] == pytest.approx(_independent_fid(refs, features(FAKE_SAMPLE_START, 96)), rel=1e-4)
    for row in rows.values():
        assert row["fid_noise_floor"] == table["real"]["fid"] and row["num_samples"] == 96
        assert row["accuracy"] == pytest.approx(table["real"]["accuracy"], abs=0.1)   # real shapes of each class
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1 and row["s_per_image"] > 0
    assert rows["var_topk"]["recall"] < rows["var"]["recall"]      # ten distinct images cover less of the refs
    grid = np.asarray(Image.open(out / "samples" / "var_topk.png"))
    cells = [grid[2 + r * 18:2 + r * 18 + 16] for r in range(4)]          # a column per class, 2 px padding
    assert all(np.array_equal(cells[0], c) for c in cells[1:])
    assert "| VAR + top-k + CFG |" in (out / "table3.md").read_text()

    capsys.readouterr()
    assert ablations.main(argv + ["--cfg", "3"]) == 0                  # only the CFG row depends on --cfg
    printed = capsys.readouterr().out
    assert printed.count("evaluated before") == 3 and "var_topk_cfg: evaluated in" in printed
    again = {r["variant"]: r for r in json.loads((out / "table3.json").read_text())["rows"]}
    assert again["var"] == rows["var"] and again["var_topk_cfg"]["sampling"]["cfg"] == 3.0


# ---- var_jax/eval/reconstruction.py ---------------------------------------------------------------------------

def test_reconstruction_quality_matches_an_eager_reference(tokenizer_dir):
    from var_jax.checkpoints import load_model_dir
    from var_jax.data import shapes
    from var_jax.eval.reconstruction import shapes_reconstruction_quality
    from var_jax.eval.shapes_classifier import render_like_pipeline, shapes_classifier
    from var_jax.tokenizer.quantizer import f_to_tokens
    start, n = int(RNG.integers(0, 9000)), 40
    quality = shapes_reconstruction_quality(tokenizer_dir.parent, num_images=n, start=start, batch_size=16)
    model = load_model_dir(tokenizer_dir).tokenizer
    real = render_like_pipeline(np.arange(start, start + n), 16, train=False)
    _, f_hats = f_to_tokens(model.quantizer_params(), model.encode(real, per_sample=True), model.cfg)
    rec = np.clip(np.rint((np.asarray(model.decode(f_hats[-1])) + 1) * 127.5), 0, 255)
    mse = np.mean((rec - np.rint((real + 1) * 127.5)) ** 2, axis=(1, 2, 3))
    assert quality["psnr"] == pytest.approx(np.mean(10 * np.log10(255 ** 2 / mse)), abs=0.02)
    labels = np.array([shapes.label_of(i) for i in range(start, start + n)])
    predicted = shapes_classifier(16).predict(rec.astype(np.uint8))
    assert abs(quality["recon_accuracy"] - np.mean(predicted == labels)) <= 1 / n   # a rounding may flip one
    assert quality["num_images"] == n and quality["first_index"] == start and quality["image_size"] == 16
    with pytest.raises(ValueError, match="held-out range"):
        shapes_reconstruction_quality(tokenizer_dir, num_images=n, start=shapes.HELD_OUT_SIZE - 10)
