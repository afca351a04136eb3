"""The sampling accelerators (var_jax/sample/accelerate.py): off they change nothing; at their neutral settings
they are the plain sampler; on, every logit equals an independent reference computed eagerly, one layer at a time
with dense Python lists of keys (no cache layout, no slots, no scan), and the KV window equals masked dense
attention over the whole sequence."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import run_with_devices
from test_sampler import fixture_bundle, run_command

from var_jax.checkpoints import ModelBundle, save_model_dir
from var_jax.cli.common import CommandError
from var_jax.sample.accelerate import Accelerators, keep_count, phases, plan_cuts, unrolled_from
from var_jax.sample.cache_layout import cache_layout, visible_scales
from var_jax.sample.sampler import SampleOptions, make_sample_fn
from var_jax.sample.schedule import MODES, scale_plan
from var_jax.scale_config import scale_begin_ends, scale_ids
from var_jax.tokenizer import quantizer
from var_jax.tokenizer.resize import area_matrix

STOCHASTIC = dict(cfg=2.0, cfg_schedule="linear", top_k=12, top_p=0.9, waste_budget=0.5)
PNS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def _sample_fn(bundle, mode, refiner=None, options=STOCHASTIC, **accel):
    """(jitted sampler without the decode, its arguments but labels/ids/seed): tokens and logits only."""
    opts = SampleOptions(**options, mode=mode, accel=Accelerators(**accel))
    vg, vs = nnx.split(bundle.var)
    tg, ts = nnx.split(bundle.tokenizer)
    rg, rs = nnx.split(refiner.var) if refiner is not None else (None, None)
    fn = make_sample_fn(vg, tg, opts, decode=False, with_logits=True, refiner_graphdef=rg)
    return fn, (vs, ts), rs


def _sample(bundle, labels, seed, mode, refiner=None, options=STOCHASTIC, **accel):
    fn, states, refiner_state = _sample_fn(bundle, mode, refiner, options, **accel)
    labels = np.asarray(labels)
    out = fn(*states, labels, np.arange(len(labels)), seed, None, refiner_state)
    return {"tokens": [np.asarray(t) for t in out["tokens"]], "logits": [np.asarray(x) for x in out["logits"]]}


def _noisy(module, seed: int, scale: float):
    """A copy of the module with every parameter moved by noise."""
    graphdef, state = nnx.split(module)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * (jnp.std(x) + 1e-3) * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, noisy))


@functools.lru_cache(maxsize=None)
def perturbed(name: str, seed: int = 1, scale: float = 0.3) -> ModelBundle:
    """The fixture's transformer with every parameter moved by noise: a refiner that computes other logits."""
    bundle = fixture_bundle(name)
    return ModelBundle(var_config=bundle.var_config, var=_noisy(bundle.var, seed, scale))


# ---- the eager reference ---------------------------------------------------------------------------------------

def _layer(model, layer: int):
    graphdef, state = nnx.split(model.blocks)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[layer], state))


def _upsample(x, side: int):
    """(B, n, C) of a square map -> (B, side², C), PyTorch 'area' (the restore of pruned tokens)."""
    b, n, c = x.shape
    src = int(round(n ** 0.5))
    m = area_matrix(src, side).astype(np.float32)
    return np.einsum("oh,pw,bhwc->bopc", m, m, np.asarray(x).reshape(b, src, src, c)).reshape(b, side * side, c)


def reference_logits(bundle, labels, tokens, options, accel: Accelerators, refiner=None):
    """Per-scale logits of the accelerated sampler for the given tokens, computed eagerly: every scale, every layer,
    keys kept per (layer, scale) in dicts; rows cut at the cfg stop; the refiner's keys of the drafted scales from
    one pass over them with the windowed block-causal mask; pruned scales through the kept tokens only."""
    tok_cfg, num_classes = bundle.tokenizer_config, bundle.var_config.num_classes
    pns = tok_cfg.patch_nums
    num = len(pns)
    qparams = bundle.tokenizer.quantizer_params()
    flat = quantizer.teacher_forcing_input(qparams, [jnp.asarray(t) for t in tokens], tok_cfg)
    begin_ends = scale_begin_ends(pns)
    raw = {s: flat[:, begin_ends[s][0] - 1:begin_ends[s][1] - 1] for s in range(1, num)}   # first_l = 1
    guided = options.guided
    labels = np.asarray(labels)
    rows_labels = np.stack([labels, np.full_like(labels, num_classes)], 1).reshape(-1) if guided else labels
    visible = visible_scales(num, accel.kv_window)
    ratios = {s: r for s, r in accel.prune if keep_count(pns[s] ** 2, r) < pns[s] ** 2}
    n = accel.draft_scales

    def inputs(model, s, guided):
        x = model.first_scale_input(model.cond_embedding(rows_labels)) if s == 0 else model.scale_input(s, raw[s])
        return jnp.repeat(x, 2, axis=0) if guided and s else x

    model, keys, outs, out_logits = bundle.var, {}, {}, []
    runs = {"main": range(0, num if n is None else n), "refiner": range(0 if n is None else n, num)}
    for s in range(num):
        if guided and s == accel.cfg_stop_scale:
            rows_labels, guided = rows_labels[0::2], False
            keys = {k: (kv[0][0::2], kv[1][0::2]) for k, kv in keys.items()}
            outs = {k: o[0::2] for k, o in outs.items()}
        if s == n:
            model, keys, outs = refiner.var, {}, {}
            x = jnp.concatenate([inputs(model, j, guided) for j in range(n)], axis=1)
            ids = np.asarray(scale_ids(pns[:n]))
            sees = np.asarray([[j in visible[i] or j == i for j in range(n)] for i in range(n)])[ids[:, None], ids]
            cond = model.cond_embedding(rows_labels)
            for layer in range(model.cfg.depth):
                y, (k, v) = _layer(model, layer)(x, model._block_cond(cond), lambda k, v: (k, v, jnp.asarray(sees),
                                                                                        (k, v)))
                for j in range(n):
                    b, e = begin_ends[j]
                    keys[layer, j] = (k[:, b:e], v[:, b:e])
                    outs[layer, j] = np.asarray(y[:, b:e])
                x = y
        cond = model.cond_embedding(rows_labels)
        x = inputs(model, s, guided)
        run = runs["main" if n is None or s < n else "refiner"]
        pruned = s in ratios
        if pruned:
            source = max(j for j in range(s) if j not in ratios or j not in run)
        for layer in range(model.cfg.depth):
            seen = [keys[layer, j] for j in visible[s] if (layer, j) in keys]
            if pruned:
                xs = np.asarray(x, np.float32)
                distance = ((xs - xs.mean(1, keepdims=True)) ** 2).sum(-1)
                index = np.argsort(-distance, axis=1, kind="stable")[:, :keep_count(pns[s] ** 2, ratios[s])]
                x_in = jnp.asarray(np.take_along_axis(xs, index[..., None], axis=1))
            else:
                x_in = x

            def kv_fn(k, v):
                cat = lambda i, new: jnp.concatenate([kv[i] for kv in seen] + [new], axis=1)
                return cat(0, k), cat(1, v), None, (k, v)
            y, keys[layer, s] = _layer(model, layer)(x_in, model._block_cond(cond), kv_fn)
            if pruned:
                full = _upsample(outs[layer, source], pns[s])
                np.put_along_axis(full, index[..., None], np.asarray(y), axis=1)
                y = jnp.asarray(full)
            outs[layer, s] = np.asarray(y)
            x = y
        logits = np.asarray(model.logits(x, cond))
        if guided:
            t = np.float32(options.cfg * s / (num - 1) if options.cfg_schedule == "linear" else options.cfg)
            logits = (1 + t) * logits[0::2] - t * logits[1::2]
        out_logits.append(logits)
    return out_logits


def _random_accelerators(rng, num: int, guided: bool, with_refiner: bool) -> Accelerators:
    pruned = sorted(rng.choice(np.arange(1, num), size=int(rng.integers(0, 3)), replace=False).tolist())
    return Accelerators(
        cfg_stop_scale=int(rng.integers(1, num + 1)) if guided and rng.random() < 0.7 else None,
        draft_scales=int(rng.integers(1, num)) if with_refiner else None,
        prune=tuple((int(s), float(rng.choice([0.25, 0.5, 0.7]))) for s in pruned),
        kv_window=(int(rng.integers(0, 3)), int(rng.integers(0, 3))) if rng.random() < 0.7 else None)


# ---- off and neutral settings ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_off_and_neutral_settings_compile_to_the_plain_sampler(mode):
    """SampleOptions() runs no accelerator. cfg_stop_scale = the number of scales (guidance everywhere) and prune
    ratios that prune no token lower to exactly the plain sampler's program (so its tokens, images and logits, bit
    for bit); a ratio that prunes does not."""
    assert not SampleOptions().accel.active
    bundle = fixture_bundle("tiny")
    pns = bundle.tokenizer_config.patch_nums
    num = len(pns)
    rng = np.random.default_rng()
    labels = rng.integers(0, 11, 3)

    def program(**accel):
        fn, states, _ = _sample_fn(bundle, mode, **accel)
        return fn.lower(*states, labels, np.arange(3), 0).as_text()

    plain = program()
    si = int(rng.integers(2, num))
    neutral = dict(cfg_stop_scale=num, prune=((si, float(rng.uniform(0, 1 / pns[si] ** 2))), (1, 0.0)))
    assert program(**neutral) == plain
    assert program(prune=((num - 1, 0.5),)) != plain


@pytest.mark.parametrize("mode", ["unrolled", "scanned"])
def test_a_refiner_equal_to_the_drafter_reproduces_the_plain_sampler(mode):
    """The drafter as its own refiner, drafting N scales (fresh random N): its prefill rebuilds the cache the plain
    sampler had, so greedy tokens are equal and every logit within float32 rounding."""
    bundle = fixture_bundle("small_shared")
    num = len(bundle.tokenizer_config.patch_nums)
    rng = np.random.default_rng()
    labels, seed, n = rng.integers(0, 8, 3), int(rng.integers(2 ** 31)), int(rng.integers(1, num))
    greedy = dict(STOCHASTIC, top_k=1, top_p=0.0)
    plain = _sample(bundle, labels, seed, mode, options=greedy)
    got = _sample(bundle, labels, seed, mode, options=greedy, refiner=bundle, draft_scales=n)
    for k, (a, b) in enumerate(zip(plain["logits"], got["logits"])):
        np.testing.assert_allclose(b, a, atol=2e-5, rtol=0, err_msg=f"N={n} scale {k}")
    for k, (a, b) in enumerate(zip(plain["tokens"], got["tokens"])):
        np.testing.assert_array_equal(a, b, err_msg=f"N={n} scale {k}")


# ---- on: against independent references --------------------------------------------------------------------------

@pytest.mark.parametrize("mode,name", [("unrolled", "small_shared"), ("grouped", "tiny"), ("scanned", "small_shared")])
def test_accelerated_logits_equal_the_eager_reference(mode, name):
    """A fresh random combination of cfg stop, refiner (a perturbed copy of the model: other logits), pruning and KV
    window: the sampler's logits for the tokens it drew equal the eager reference's."""
    rng = np.random.default_rng()
    bundle = fixture_bundle(name)
    num = len(bundle.tokenizer_config.patch_nums)
    accel = _random_accelerators(rng, num, True, with_refiner=rng.random() < 0.8)
    labels, seed = rng.integers(0, bundle.var_config.num_classes + 1, 3), int(rng.integers(2 ** 31))
    refiner = perturbed(name) if accel.draft_scales is not None else None
    out = _sample(bundle, labels, seed, mode, refiner=refiner, **dataclasses.asdict(accel))
    expected = reference_logits(bundle, labels, out["tokens"], SampleOptions(**STOCHASTIC), accel, refiner)
    for k, (got, want) in enumerate(zip(out["logits"], expected)):
        np.testing.assert_allclose(got, want, atol=5e-4, rtol=1e-4, err_msg=f"{name} {accel} scale {k}")


@pytest.mark.parametrize("mode", ["unrolled", "grouped"])
def test_windowed_cache_equals_masked_dense_attention(mode):
    """Sample with a KV window (C, W), then score the drawn tokens with one teacher-forced pass over the whole
    sequence whose attention mask is the window's (query scale s sees key scales [0, C) and [s−W, s]): the logits
    agree. The windowed cache is shorter than the plain one."""
    bundle = fixture_bundle("small_shared")
    pns = bundle.tokenizer_config.patch_nums
    rng = np.random.default_rng()
    window = (int(rng.integers(0, 3)), int(rng.integers(0, 3)))
    labels, seed = rng.integers(0, 8, 3), int(rng.integers(2 ** 31))
    out = _sample(bundle, labels, seed, mode, kv_window=window)
    var, options = bundle.var, SampleOptions(**STOCHASTIC)
    teacher = quantizer.teacher_forcing_input(bundle.tokenizer.quantizer_params(),
                                              [jnp.asarray(t) for t in out["tokens"]], bundle.tokenizer_config)
    ids = np.asarray(scale_ids(pns))
    sinks, recent = window
    mask = jnp.asarray((ids[None, :] <= ids[:, None])
                       & ((ids[None, :] < sinks) | (ids[None, :] >= ids[:, None] - recent)))

    def dense(labels):
        cond = var.cond_embedding(labels)
        x = jnp.concatenate([var.first_scale_input(cond), var.word_embed(teacher)
                             + var._level_position(1, len(ids))], axis=1)
        layer_fn = lambda block, x, bc, carry, layer: (*block(x, bc, lambda k, v: (k, v, mask, None)), None)
        return np.asarray(var.forward_layers(x, cond, None, layer_fn)[0])

    cond, uncond = dense(labels), dense(np.full_like(labels, bundle.var_config.num_classes))
    for k, (b, e) in enumerate(scale_begin_ends(pns)):
        t = np.float32(options.cfg * k / (len(pns) - 1))
        np.testing.assert_allclose(out["logits"][k], (1 + t) * cond[:, b:e] - t * uncond[:, b:e], atol=5e-4,
                                   rtol=1e-4, err_msg=f"window {window} scale {k}")
    plan = scale_plan(pns, mode, STOCHASTIC["waste_budget"])
    windowed = phases(pns, Accelerators(kv_window=window), plan)[0].layout.length
    assert windowed <= phases(pns, Accelerators(kv_window=(len(pns), len(pns))), plan)[0].layout.length


def test_cache_layouts_never_overwrite_live_keys():
    """Random windows and keep counts at 256 px: every slot fits the cache, no two slots that are live at the same
    scale overlap, each scale reads exactly its visible scales' stored keys; window (1, 1) needs 270 of 424."""
    rng = np.random.default_rng()
    num = len(PNS_256)
    assert cache_layout(PNS_256, range(num), window=(1, 1)).length == 270
    assert cache_layout(PNS_256, range(num)).length == 424
    for _ in range(50):
        window = None if rng.random() < 0.2 else (int(rng.integers(0, 4)), int(rng.integers(0, 5)))
        stored = [p * p if rng.random() < 0.6 else keep_count(p * p, rng.uniform(0, 0.9)) for p in PNS_256]
        dense = int(rng.integers(0, 5))
        layout = cache_layout(PNS_256, range(num), window=window, stored=stored, dense_scales=dense)
        vis = visible_scales(num, window)
        live = {j: [s for s in range(num) if j in vis[s]] for j in range(num)}
        for j, slot in enumerate(layout.slots):
            if not live[j] and j >= dense:
                assert slot is None
            if slot is None:
                continue
            assert slot[0] + slot[1] <= layout.length and slot[1] == (PNS_256[j] ** 2 if j < dense else stored[j])
            for i, other in enumerate(layout.slots[:j]):
                if other is None or not (set(live[i]) | {i}) & (set(live[j]) | {j}):
                    continue
                assert slot[0] >= other[0] + other[1] or other[0] >= slot[0] + slot[1], (window, i, j)
        for s in range(num):
            read = sorted(p for o, n in layout.reads(s) for p in range(o, o + n))
            want = sorted(p for j in vis[s] if layout.slots[j] for p in range(layout.slots[j][0],
                                                                              sum(layout.slots[j])))
            assert read == want


def test_plan_cuts_and_unrolled_scales():
    """The plan starts a segment at the cfg stop and the draft scale; pruned scales and their sources run
    unrolled; without accelerators every mode's plan is the plain one."""
    for mode in MODES:
        assert scale_plan(PNS_256, mode) == scale_plan(PNS_256, mode, cuts=plan_cuts(Accelerators(), True),
                                                       unrolled_from=unrolled_from(Accelerators(), PNS_256))
    accel = Accelerators(cfg_stop_scale=3, prune=((8, 0.5), (9, 0.5)))
    plan = scale_plan(PNS_256, "scanned", cuts=plan_cuts(accel, True), unrolled_from=unrolled_from(accel, PNS_256))
    assert [seg.scales for seg in plan] == [(0, 1, 2), (3, 4, 5, 6), (7,), (8,), (9,)]
    phase, = phases(PNS_256, accel, plan)
    assert phase.sources == ((8, 7), (9, 7)) and phase.kept[8:] == (85, 128)


# ---- the commands ----------------------------------------------------------------------------------------------

def _config_only(path, tokenizer_cfg, var_cfg):
    """A model directory's config.json alone: enough for the checks that run before anything loads."""
    import json
    from var_jax.checkpoints import CONFIG_FILE, FORMAT_NAME, FORMAT_VERSION
    path.mkdir()
    (path / CONFIG_FILE).write_text(json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION,
                                                "tokenizer": tokenizer_cfg and tokenizer_cfg.to_dict(),
                                                "var": var_cfg.to_dict()}))
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("accel")
    bundle = fixture_bundle("tiny")
    main = save_model_dir(root / "main", tokenizer=(bundle.tokenizer_config, bundle.tokenizer),
                          var=(bundle.var_config, bundle.var))
    refiner = perturbed("tiny")
    alone = save_model_dir(root / "refiner", var=(refiner.var_config, refiner.var))
    other_weights = save_model_dir(root / "other_weights", tokenizer=(bundle.tokenizer_config,
                                                                     _noisy(bundle.tokenizer, 2, 0.1)),
                                   var=(refiner.var_config, refiner.var))
    wrong = _config_only(root / "wrong", None, dataclasses.replace(bundle.var_config, num_classes=5))
    other_tok = _config_only(root / "other_tokenizer", dataclasses.replace(bundle.tokenizer_config, quant_resi=0.4),
                             bundle.var_config)
    return {"main": main, "refiner": alone, "wrong": wrong, "other_tokenizer": other_tok,
            "other_weights": other_weights}


BAD_OPTIONS = [
    (["--cfg", "0", "--cfg-stop-scale", "2"], "--cfg-stop-scale needs guidance"),
    (["--cfg-stop-scale", "5"], r"--cfg-stop-scale must be in 1..4"),
    (["--draft-scales", "2"], "--draft-scales needs a refiner"),
    (["--refiner", "REFINER"], "a refiner needs --draft-scales"),
    (["--refiner", "REFINER", "--draft-scales", "4"], r"--draft-scales must be in 1..3"),
    (["--refiner", "WRONG", "--draft-scales", "2"], "num_classes 5 .refiner. vs 10"),
    (["--refiner", "OTHER_TOKENIZER", "--draft-scales", "2"], "another tokenizer"),
    (["--refiner", "MISSING", "--draft-scales", "2"], "does not exist"),
    (["--prune", "8:0.5"], r"--prune: scale 8 must be in 1..3"),
    (["--prune", "2:1.0"], r"ratio 1.0 at scale 2 must be in \[0, 1\)"),
    (["--prune", "2:0.5,2:0.1"], "scale 2 is given twice"),
    (["--prune", "2=0.5"], "SCALE:RATIO"),
    (["--kv-window", "1"], "C,W"),
    (["--kv-window=-1,2"], "must be >= 0"),
]


@pytest.mark.parametrize("command", ["sample", "edit"])
def test_bad_combinations_are_one_line_before_any_model_loads(command, model_dirs, tmp_path, monkeypatch):
    import var_jax.checkpoints as checkpoints
    from PIL import Image

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")
    monkeypatch.setattr(checkpoints, "load_model_dir", no_loading)
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    base = {"sample": ["--checkpoint", str(model_dirs["main"]), "--out", str(tmp_path / "out")],
            "edit": ["--checkpoint", str(model_dirs["main"]), "--image", str(image), "--box", "0,0,0.5,0.5",
                     "--out", str(tmp_path / "out.png")]}[command]
    paths = {"REFINER": model_dirs["refiner"], "WRONG": model_dirs["wrong"],
             "OTHER_TOKENIZER": model_dirs["other_tokenizer"], "MISSING": tmp_path / "nothing"}
    for options, message in BAD_OPTIONS:
        argv = base + [str(paths.get(o, o)) for o in options]
        with pytest.raises(CommandError, match=message) as caught:
            run_command(command, argv)
        assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.png").exists()


def test_sample_and_edit_commands_run_every_accelerator(model_dirs, tmp_path):
    """`sample` with all four accelerators writes its images and records them in run.json (a rerun with other
    accelerator settings is refused); `edit` runs with them and keeps the kept tokens."""
    import json
    from PIL import Image
    out = tmp_path / "samples"
    argv = ["--checkpoint", str(model_dirs["main"]), "--classes", "1,2", "--num-per-class", "2", "--batch-size", "4",
            "--top-k", "8", "--out", str(out), "--refiner", str(model_dirs["refiner"]), "--draft-scales", "2",
            "--cfg-stop-scale", "3", "--prune", "3:0.5", "--kv-window", "1,1", "--mode", "grouped"]
    run_command("sample", argv)
    with np.load(out / "samples.npz") as data:
        assert data["arr_0"].shape == (4, 64, 64, 3)
    recorded = json.loads((out / "run.json").read_text())
    assert recorded["accelerators"] == {"cfg_stop_scale": 3, "draft_scales": 2, "prune": [[3, 0.5]],
                                        "kv_window": [1, 1]}
    assert len(recorded["refiner_sha256"]) == 64
    with pytest.raises(CommandError, match="different settings"):
        run_command("sample", argv[:-4] + ["--kv-window", "1,2", "--mode", "grouped"])
    with pytest.raises(CommandError, match="same shape but other weights"):
        run_command("sample", [a if a != str(model_dirs["refiner"]) else str(model_dirs["other_weights"])
                               for a in argv[:-8]] + ["--out", str(tmp_path / "other")])
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng().integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
    run_command("edit", ["--checkpoint", str(model_dirs["main"]), "--image", str(image), "--box", "0.25,0.25,0.75,0.75",
                         "--out", str(tmp_path / "edited.png"), "--cfg-stop-scale", "2", "--prune", "3:0.5",
                         "--kv-window", "0,1", "--refiner", str(model_dirs["refiner"]), "--draft-scales", "3"])
    assert Image.open(tmp_path / "edited.png").size == (64, 64)


def test_editing_keeps_the_source_tokens_with_accelerators():
    from var_jax.sample.edit import edit
    bundle = fixture_bundle("tiny")
    rng = np.random.default_rng()
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    accel = Accelerators(cfg_stop_scale=2, draft_scales=2, prune=((3, 0.5),), kv_window=(1, 1))
    out = edit(bundle, image, box=(0.0, 0.0, 0.5, 1.0), options=SampleOptions(cfg=3.0, top_k=9, accel=accel),
               refiner=perturbed("tiny"), seed=int(rng.integers(1000)))
    for tokens, source, keep in zip(out["tokens"], out["source_tokens"], out["keep"]):
        np.testing.assert_array_equal(tokens[0][keep.ravel()], source[0][keep.ravel()])


MULTI_DEVICE_CODE = r"""
import numpy as np, jax
import test_accelerate as t
from test_sampler import fixture_bundle
from var_jax.sample.accelerate import Accelerators
from var_jax.sample.runner import Sampler
from var_jax.sample.sampler import SampleOptions
from var_jax.sharding import make_mesh
bundle = fixture_bundle("small_shared")
accel = Accelerators(cfg_stop_scale=4, draft_scales=3, prune=((5, 0.5), (6, 0.3)), kv_window=(1, 2))
options = SampleOptions(cfg=1.5, top_k=12, top_p=0.9, mode="grouped", waste_budget=0.5, accel=accel)
labels = np.asarray([0, 1, 2, 3, 4, 5, 6])   # 7 images: padded to 8 on the (2, 2, 1) mesh
refiner = t.perturbed("small_shared")
single = Sampler(bundle, options, refiner=refiner, with_logits=True)(labels, seed=5)
# the sharded run scores the single run's tokens (one-ulp differences of a sharded matmul could flip a draw)
forced = (single["tokens"], [np.ones(x.shape, bool) for x in single["tokens"]])
sharded = Sampler(bundle, options, make_mesh((2, 2, 1)), refiner=refiner, with_logits=True)(labels, seed=5, edit=forced)
for k, (a, b) in enumerate(zip(single["logits"], sharded["logits"])):
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=0, err_msg=f"scale {k}")
print("OK")
"""


def test_accelerated_sampling_on_four_devices_equals_one():
    """Every accelerator at once, batch and parameters sharded over a (2, 2, 1) mesh: the logits of one device's
    run."""
    assert "OK" in run_with_devices(MULTI_DEVICE_CODE, 4)
