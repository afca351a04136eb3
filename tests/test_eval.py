"""`var-jax eval`: the ADM evaluator's metrics against float64 numpy/scipy transcriptions, the FID Inception
(random weights through the converter) against pytorch-fid's own forward, and the command end to end."""
import hashlib
import json
import sys
import types

import numpy as np
import pytest

from var_jax.eval import feature_metrics as fm

# ---- float64 numpy transcriptions of the ADM evaluator's formulas (guided-diffusion/evaluations/evaluator.py) --


def ref_frechet(mu1, s1, mu2, s2):
    """Independent of scipy's sqrtm: tr sqrt(S1 S2) = Σ sqrt(eigenvalues of S1 S2) (real, >= 0)."""
    eig = np.linalg.eigvals(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.abs(eig.real))))


def ref_inception_score(preds, split_size):
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def ref_precision_recall(ref, smp, k=3):
    def sq(a, b):
        return np.maximum((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :], 0)
    r_ref = np.partition(sq(ref, ref), k, axis=1)[:, k]
    r_smp = np.partition(sq(smp, smp), k, axis=1)[:, k]
    d = sq(ref, smp)
    precision = np.mean(np.any(d <= r_ref[:, None], axis=0))
    recall = np.mean(np.any(d <= r_smp[None, :], axis=1))
    return float(precision), float(recall)


def moments(x):
    return x.mean(0), np.cov(x, rowvar=False)


# ---- metrics ------------------------------------------------------------------------------------------------

def test_moments_accumulate_like_np_cov():
    rng = np.random.default_rng()
    x = rng.standard_normal((301, 24)) * rng.uniform(0.1, 3, 24) + rng.uniform(-5, 5, 24)
    acc = fm.MomentAccumulator()
    for start in range(0, len(x), 37):
        acc.update(x[start:start + 37].astype(np.float32))
    mu, sigma = moments(x.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(acc.mean, mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(acc.cov, sigma, rtol=1e-10, atol=1e-12)


def test_frechet_distance_against_direct_formulas():
    rng = np.random.default_rng()
    a = rng.standard_normal((400, 16)) @ rng.standard_normal((16, 16))
    b = rng.standard_normal((300, 16)) @ rng.standard_normal((16, 16)) + 0.5
    (m1, s1), (m2, s2) = moments(a), moments(b)
    assert abs(fm.frechet_distance(m1, s1, m1, s1)) < 1e-8 * np.trace(s1)
    np.testing.assert_allclose(fm.frechet_distance(m1, s1, m2, s2), ref_frechet(m1, s1, m2, s2), rtol=1e-8)
    # diagonal covariances: ‖Δμ‖² + Σ (σ1 − σ2)²
    v1, v2 = rng.uniform(0.5, 2, 16), rng.uniform(0.5, 2, 16)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    np.testing.assert_allclose(fm.frechet_distance(m1, np.diag(v1), m2, np.diag(v2)), expected, rtol=1e-10)


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")
def test_frechet_distance_equals_pytorch_fid():
    fid_score = _pytorch_fid("fid_score")
    rng = np.random.default_rng()
    (m1, s1), (m2, s2) = moments(rng.standard_normal((200, 32))), moments(rng.standard_normal((150, 32)) * 1.1)
    try:
        theirs = fid_score.calculate_frechet_distance(m1, s1, m2, s2)
    except TypeError as e:   # pytorch-fid 0.3.0 passes sqrtm(disp=False), which newer scipy no longer takes
        pytest.skip(f"pytorch-fid's calculate_frechet_distance does not run with this scipy: {e}")
    np.testing.assert_allclose(fm.frechet_distance(m1, s1, m2, s2), theirs, rtol=1e-10)


def test_inception_score_known_distributions_and_adm_formula():
    rng = np.random.default_rng()
    uniform = np.full((50, 10), 0.1)
    assert fm.inception_score(uniform) == pytest.approx(1.0, abs=1e-12)
    one_hot = np.eye(10)[np.arange(100) % 10] * (1 - 1e-12) + 1e-13    # confident and balanced: IS = #classes
    assert fm.inception_score(one_hot) == pytest.approx(10.0, rel=1e-9)
    probs = rng.dirichlet(np.full(12, 0.3), size=250)
    for split in (100, 250, 5000):    # partial last split, one exact split, fewer images than one split
        acc = fm.InceptionScoreAccumulator(split)
        for start in range(0, 250, 33):       # batches straddle split boundaries
            acc.update(probs[start:start + 33].astype(np.float32))
        expected = ref_inception_score(probs.astype(np.float32).astype(np.float64), split)
        assert acc.result() == pytest.approx(expected, rel=1e-10)
        assert len(acc.split_scores) == fm.num_splits(250, split)


def test_precision_recall_against_numpy_and_constructed_manifolds():
    rng = np.random.default_rng()
    ref = rng.standard_normal((150, 8)).astype(np.float32)
    smp = (rng.standard_normal((110, 8)) * 1.3 + 0.4).astype(np.float32)
    expected = ref_precision_recall(ref.astype(np.float64), smp.astype(np.float64))
    assert fm.precision_recall(ref, smp, block=64) == pytest.approx(expected, abs=1e-12)   # blocks and padding
    assert fm.precision_recall(ref, smp) == pytest.approx(expected, abs=1e-12)
    assert fm.precision_recall(ref, ref + 1e-4) == (1.0, 1.0)
    assert fm.precision_recall(ref, smp + 100.0) == (0.0, 0.0)
    # references on a 40×10 grid of spacing 0.1 (k=3 radius: one spacing); samples on its first 10 columns:
    # all inside the reference manifold, covering 10 (or 11, at the border) of its 40 columns
    grid = np.stack(np.meshgrid(np.arange(40) * 0.1, np.arange(10) * 0.1, indexing="ij"), -1).reshape(-1, 2)
    grid = (grid + rng.uniform(-1e-3, 1e-3, grid.shape)).astype(np.float32)
    precision, recall = fm.precision_recall(grid, grid[:100] + 1e-4)
    assert precision == 1.0 and 0.24 < recall < 0.29


def test_precision_recall_sharded_over_devices():
    from conftest import run_with_devices
    out = run_with_devices("""
import numpy as np
from var_jax.eval import feature_metrics as fm
from var_jax.sharding import make_mesh
from test_eval import ref_precision_recall
rng = np.random.default_rng(0)
ref = rng.standard_normal((90, 6)).astype(np.float32); smp = (rng.standard_normal((70, 6)) + 0.3).astype(np.float32)
got = fm.precision_recall(ref, smp, mesh=make_mesh(), block=20)
print(got == ref_precision_recall(ref.astype(np.float64), smp.astype(np.float64)), got)
""", num_devices=4, timeout=120)
    assert out.startswith("True"), out


# ---- the FID Inception --------------------------------------------------------------------------------------

def _pytorch_fid(module):
    """pytorch_fid.<module>, importable here with a stand-in for torchvision (which does not import beside this
    torch): `torchvision_standin` below builds torchvision's Inception-v3 modules that pytorch-fid subclasses."""
    pytest.importorskip("torch")
    if "pytorch_fid" not in sys.modules:
        pytest.importorskip("pytorch_fid")
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]   # what the failed import left behind
        standin = torchvision_standin()
        sys.modules["torchvision"] = standin
        for name in ("models", "models.inception", "transforms"):
            sys.modules[f"torchvision.{name}"] = eval(f"standin.{name}")
    import importlib
    return importlib.import_module(f"pytorch_fid.{module}")


def torchvision_standin():
    """torchvision.models.inception's Inception3 and its blocks (the parts pytorch-fid uses), written here from
    the architecture's description: BasicConv2d = conv (no bias) + BN(eps 0.001) + ReLU."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class BasicConv2d(nn.Module):
        def __init__(self, cin, cout, **kw):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
            self.bn = nn.BatchNorm2d(cout, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    C = BasicConv2d

    class InceptionA(nn.Module):
        def __init__(self, cin, pool_features):
            super().__init__()
            self.branch1x1 = C(cin, 64, kernel_size=1)
            self.branch5x5_1, self.branch5x5_2 = C(cin, 48, kernel_size=1), C(48, 64, kernel_size=5, padding=2)
            self.branch3x3dbl_1 = C(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = C(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = C(96, 96, kernel_size=3, padding=1)
            self.branch_pool = C(cin, pool_features, kernel_size=1)

    class InceptionB(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3 = C(cin, 384, kernel_size=3, stride=2)
            self.branch3x3dbl_1 = C(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = C(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = C(96, 96, kernel_size=3, stride=2)

        def forward(self, x):
            b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch3x3(x), b, F.max_pool2d(x, kernel_size=3, stride=2)], 1)

    class InceptionC(nn.Module):
        def __init__(self, cin, channels_7x7):
            super().__init__()
            c7 = channels_7x7
            self.branch1x1 = C(cin, 192, kernel_size=1)
            self.branch7x7_1 = C(cin, c7, kernel_size=1)
            self.branch7x7_2 = C(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7_3 = C(c7, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_1 = C(cin, c7, kernel_size=1)
            self.branch7x7dbl_2 = C(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_3 = C(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7dbl_4 = C(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_5 = C(c7, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch_pool = C(cin, 192, kernel_size=1)

    class InceptionD(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3_1, self.branch3x3_2 = C(cin, 192, kernel_size=1), C(192, 320, kernel_size=3, stride=2)
            self.branch7x7x3_1 = C(cin, 192, kernel_size=1)
            self.branch7x7x3_2 = C(192, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7x3_3 = C(192, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7x3_4 = C(192, 192, kernel_size=3, stride=2)

        def forward(self, x):
            a = self.branch3x3_2(self.branch3x3_1(x))
            b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
            return torch.cat([a, b, F.max_pool2d(x, kernel_size=3, stride=2)], 1)

    class InceptionE(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch1x1 = C(cin, 320, kernel_size=1)
            self.branch3x3_1 = C(cin, 384, kernel_size=1)
            self.branch3x3_2a = C(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3_2b = C(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch3x3dbl_1 = C(cin, 448, kernel_size=1)
            self.branch3x3dbl_2 = C(448, 384, kernel_size=3, padding=1)
            self.branch3x3dbl_3a = C(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3dbl_3b = C(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch_pool = C(cin, 192, kernel_size=1)

    class Inception3(nn.Module):
        def __init__(self, num_classes=1000, aux_logits=True, **_):
            super().__init__()
            assert not aux_logits
            self.Conv2d_1a_3x3 = C(3, 32, kernel_size=3, stride=2)
            self.Conv2d_2a_3x3 = C(32, 32, kernel_size=3)
            self.Conv2d_2b_3x3 = C(32, 64, kernel_size=3, padding=1)
            self.Conv2d_3b_1x1 = C(64, 80, kernel_size=1)
            self.Conv2d_4a_3x3 = C(80, 192, kernel_size=3)
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
            self.Mixed_6a = InceptionB(288)
            self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
            self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
            self.Mixed_7a = InceptionD(768)
            self.Mixed_7b, self.Mixed_7c = InceptionE(1280), InceptionE(2048)
            self.fc = nn.Linear(2048, num_classes)

    def module(name, **attributes):
        m = types.ModuleType(name)
        m.__dict__.update(attributes)
        return m

    inception = module("torchvision.models.inception", InceptionA=InceptionA, InceptionC=InceptionC,
                       InceptionE=InceptionE, Inception3=Inception3)
    models = module("torchvision.models", inception=inception, inception_v3=lambda **kw: Inception3(**kw))
    return module("torchvision", __version__="0.99.0", models=models, transforms=module("torchvision.transforms"))


def random_state_dict(seed=0):
    """Random weights with pytorch-fid's key names and shapes, scaled so activations stay O(1) through the net."""
    from var_jax.eval.inception import expected_state_dict_shapes
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in expected_state_dict_shapes().items():
        if key.endswith("conv.weight") or key == "fc.weight":
            fan_in = int(np.prod(shape[1:]))
            value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif key.endswith("running_var") or key.endswith("bn.weight"):
            value = rng.uniform(0.5, 1.5, shape)
        else:   # bn.bias, running_mean, fc.bias
            value = rng.normal(0, 0.1, shape)
        out[key] = value.astype(np.float32)
        if key.endswith("running_var"):
            out[key.replace("running_var", "num_batches_tracked")] = np.array(0, np.int64)
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch = pytest.importorskip("torch")
    sd = random_state_dict()
    path = tmp_path_factory.mktemp("weights") / "pt_inception-random.pth"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
    return path, sd


BATCH = 4


def test_inception_features_equal_pytorch_fid(weights, monkeypatch):
    import jax
    import torch
    from flax import nnx

    from var_jax.eval.inception import INPUT_SIZE, NUM_LOGITS, compiled_features, load_inception
    path, sd = weights
    model, sha = load_inception(path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    images = np.random.default_rng(1).integers(0, 256, (BATCH, 24, 20, 3), dtype=np.uint8)   # non-square: resize
    graphdef, state = nnx.split(model)
    out = jax.tree.map(np.asarray, compiled_features()(graphdef, state, images))
    assert out["pool"].shape == (BATCH, 2048) and out["spatial"].shape == (BATCH, 17 * 17 * 7)
    assert out["probs"].shape == (BATCH, NUM_LOGITS)
    assert model.fc.kernel[...].shape == (2048, NUM_LOGITS)

    inception_module = _pytorch_fid("inception")
    monkeypatch.setattr(inception_module, "load_state_dict_from_url",
                        lambda *a, **k: {k2: torch.from_numpy(np.asarray(v)) for k2, v in sd.items()})
    net = inception_module.InceptionV3([3]).eval()
    captured = {}
    mixed_6d = net.blocks[2][6]
    mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("mixed_6_conv", o))
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        pool = net(x)[0][:, :, 0, 0]
        probs = torch.softmax(pool @ torch.from_numpy(sd["fc.weight"]).T, dim=1)
    spatial = captured["mixed_6_conv"].permute(0, 2, 3, 1)[..., :7].reshape(BATCH, -1)
    assert captured["mixed_6_conv"].shape[2:] == (17, 17) and INPUT_SIZE == 299
    scale = np.abs(pool.numpy()).max()
    assert scale > 1e-3   # the random net did not collapse
    np.testing.assert_allclose(out["pool"], pool.numpy(), rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(out["spatial"], spatial.numpy(), rtol=1e-4, atol=1e-4 * np.abs(spatial.numpy()).max())
    np.testing.assert_allclose(out["probs"], probs.numpy(), rtol=1e-4, atol=1e-6)


def test_bilinear_resize_equals_torch_interpolate():
    import torch
    from torch.nn import functional as F

    from var_jax.eval.inception import resize_bilinear
    x = np.random.default_rng().random((2, 37, 512, 3)).astype(np.float32)   # up in one axis, down in the other
    ours = np.asarray(resize_bilinear(x, 299, 299))
    theirs = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
                           align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_mismatched_weights_are_named():
    from var_jax.eval.inception import InceptionWeightsError, from_state_dict
    sd = random_state_dict()
    missing = dict(sd)
    del missing["fc.weight"]
    with pytest.raises(InceptionWeightsError, match="missing key.*fc.weight"):
        from_state_dict(missing)
    wrong = dict(sd, **{"Mixed_5b.branch1x1.conv.weight": np.zeros((64, 192, 3, 3), np.float32)})
    with pytest.raises(InceptionWeightsError, match=r"Mixed_5b.branch1x1.conv.weight has shape \(64, 192, 3, 3\)"):
        from_state_dict(wrong)


# ---- the command --------------------------------------------------------------------------------------------

def run_eval(argv, capsys):
    from var_jax.cli import main
    code = main(["eval", *argv])
    return code, capsys.readouterr()


def cheap_frechet(mu1, s1, mu2, s2):
    """FID without its tr sqrtm(S1 S2) term: a 2048² matrix square root takes minutes on two busy cores, and this
    test is about the command's plumbing (the Fréchet distance itself is checked on small matrices above)."""
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2))


def test_eval_command_inception_and_stats_round_trip(weights, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fm, "frechet_distance", cheap_frechet)
    path, _ = weights
    rng = np.random.default_rng(2)
    samples, ref = tmp_path / "s.npz", tmp_path / "r.npz"
    np.savez(samples, rng.integers(0, 256, (6, 24, 20, 3), dtype=np.uint8))
    np.savez(ref, rng.integers(0, 256, (5, 24, 20, 3), dtype=np.uint8))
    code, out = run_eval(["--samples", str(samples), "--ref", str(ref), "--inception", str(path),
                          "--batch-size", str(BATCH), "--out", str(tmp_path / "m.json"),
                          "--save-stats", str(tmp_path / "stats.npz")], capsys)
    assert code == 0 and "FID" in out.out
    metrics = json.loads((tmp_path / "m.json").read_text())
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert np.isfinite(metrics[key]), key
    assert metrics["num_samples"] == 6 and metrics["num_ref"] == 5 and metrics["inception_score_splits"] == 1
    assert metrics["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()

    # statistics of another network are refused in one line
    digits_stats = tmp_path / "digits_stats.npz"
    assert run_eval(["--features", "digits", "--ref", "digits:test", "--save-stats", str(digits_stats)], capsys)[0] == 0
    with pytest.raises(SystemExit):
        run_eval(["--samples", str(samples), "--ref", str(digits_stats), "--inception", str(path)], capsys)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "statistics of digits features" in err

    code, _ = run_eval(["--samples", str(samples), "--ref", str(tmp_path / "stats.npz"), "--inception", str(path),
                        "--batch-size", str(BATCH), "--out", str(tmp_path / "m2.json")], capsys)
    again = json.loads((tmp_path / "m2.json").read_text())
    for key in ("fid", "sfid", "inception_score", "precision", "recall", "num_ref"):
        assert again[key] == pytest.approx(metrics[key], rel=1e-9), key


def test_eval_bad_weights_one_line_error(weights, tmp_path, capsys):
    import torch
    path, sd = weights
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:100_000])
    wrong = tmp_path / "wrong.pth"
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items() if not k.startswith("Mixed_7c")}, wrong)
    images = tmp_path / "i.npz"
    np.savez(images, np.zeros((4, 8, 8, 3), np.uint8))
    for bad, phrase in ((truncated, "cannot read"), (wrong, "missing key")):
        with pytest.raises(SystemExit) as exit_info:
            run_eval(["--samples", str(images), "--ref", str(images), "--inception", str(bad)], capsys)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2
        assert err.count("\n") == 1 and phrase in err and err.startswith("var-jax eval: error: --inception")


def test_eval_digits_features(tmp_path, capsys):
    from var_jax.eval.digits_features import real_digits
    samples = tmp_path / "digits.npz"
    np.savez(samples, real_digits("train", 16)[:120])
    code, out = run_eval(["--features", "digits", "--samples", str(samples), "--ref", "digits:test",
                          "--out", str(tmp_path / "m.json")], capsys)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert code == 0 and metrics["num_ref"] == 360 and metrics["features"] == "digits"
    assert metrics["fid"] < 20 and metrics["precision"] > 0.7 and metrics["recall"] > 0.5   # real vs real
    assert metrics["inception_score"] > 5      # confident and balanced over 10 classes
    noise = tmp_path / "noise.npz"
    np.savez(noise, np.random.default_rng(3).integers(0, 256, (120, 16, 16, 3), dtype=np.uint8))
    run_eval(["--features", "digits", "--samples", str(noise), "--ref", "digits:test",
              "--out", str(tmp_path / "n.json")], capsys)
    garbage = json.loads((tmp_path / "n.json").read_text())
    assert garbage["fid"] > 5 * metrics["fid"] and garbage["precision"] < 0.1


def test_demo_score_reports_digits_feature_metrics():
    from var_jax.cli.demo import digits_feature_metrics
    from var_jax.eval.digits_features import real_digits
    score = digits_feature_metrics(real_digits("train", 16)[:60])
    assert score["fid"] < 30 and score["precision"] > 0.7 and 0 < score["recall"] <= 1
    assert digits_feature_metrics(real_digits("train", 16)[:3])["fid"] is None   # too few for k-NN manifolds
