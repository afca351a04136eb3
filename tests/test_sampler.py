"""The scale-by-scale sampler against the recorded reference (greedy tokens, images, guided logits), against
teacher forcing, and its invariances: modes, batch size, devices, seeds."""
import functools

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_fixture, run_with_devices, state_dict

from var_jax.checkpoints import ModelBundle
from var_jax.sample import filtering
from var_jax.images import image_grid, to_uint8
from var_jax.sample.runner import Sampler, check_labels
from var_jax.sample.sampler import SampleOptions, make_sample_fn
from var_jax.sample.schedule import MODES, scale_plan
from var_jax.tokenizer import quantizer
from var_jax.tokenizer.convert import vqvae_from_state_dict
from var_jax.transformer.convert import var_from_state_dict

GREEDY = dict(cfg=1.5, top_k=1, top_p=0.0)
# grouped mode with a generous budget, so that the tiny fixtures (4 or 7 scales) get a scanned group too
GROUPED_BUDGET = 0.5


@functools.lru_cache(maxsize=None)
def fixture_bundle(name):
    arrays, config = load_fixture(name)
    tok_cfg, tokenizer = vqvae_from_state_dict(state_dict(arrays, "vae"), patch_nums=tuple(config["patch_nums"]))
    var_cfg, var = var_from_state_dict(state_dict(arrays, "var"), tok_cfg, heads=config["num_heads"])
    return ModelBundle(tok_cfg, tokenizer, var_cfg, var)


def run_command(name, argv):
    """Run one var-jax command in-process (its module's own parser), as `python -m var_jax <name> ...` would."""
    import argparse
    import importlib
    module = importlib.import_module(f"var_jax.cli.{name}")
    parser = argparse.ArgumentParser(prog=name)
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def split(bundle):
    from flax import nnx
    (vg, vs), (tg, ts) = nnx.split(bundle.var), nnx.split(bundle.tokenizer)
    return vg, vs, tg, ts


# ---- filtering -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "small_shared"])
def test_filtering_matches_reference_masks(name):
    arrays, config = load_fixture(name)
    for i, (top_k, top_p) in enumerate(config["op_sampler_settings"]):
        got = np.asarray(filtering.filter_logits(jnp.asarray(arrays["op_sampler_logits_in"]), top_k, top_p))
        np.testing.assert_array_equal(got, arrays[f"op_sampler_masked_{i}"], err_msg=f"setting {top_k, top_p}")


def test_top_k_keeps_ties_and_top_p_keeps_the_largest():
    logits = jnp.asarray([[1.0, 3.0, 2.0, 3.0, 2.0, 0.5]])
    kept = np.isfinite(np.asarray(filtering.top_k_mask(logits, 3)))
    np.testing.assert_array_equal(kept, [[False, True, True, True, True, False]])   # both 2.0 tie with the 3rd
    # one dominant logit: even top_p=1e-6 keeps it; top_p=1 keeps everything with non-zero tail mass
    peaked = jnp.asarray([[0.0, 50.0, 1.0, 2.0]])
    np.testing.assert_array_equal(np.isfinite(np.asarray(filtering.top_p_mask(peaked, 1e-6))), [[0, 1, 0, 0]])
    # probabilities 0.1, 0.2, 0.3, 0.4 (ascending cumsum 0.1, 0.3, 0.6, 1.0): top_p 0.5 drops cumsum <= 0.5
    probs = jnp.log(jnp.asarray([[0.3, 0.1, 0.4, 0.2]]))
    np.testing.assert_array_equal(np.isfinite(np.asarray(filtering.top_p_mask(probs, 0.5))), [[1, 0, 1, 0]])


def test_smooth_tau_and_guidance_schedule():
    np.testing.assert_allclose(filtering.smooth_tau(0.0), 0.27)
    np.testing.assert_allclose(filtering.smooth_tau(1.0), 0.27 * 0.05, rtol=1e-6)
    assert filtering.guidance_strength(1.5, 0, 10) == 0.0
    assert filtering.guidance_strength(1.5, 9, 10) == 1.5
    assert filtering.guidance_strength(1.5, 3, 10, "constant") == 1.5


def test_scale_plans_cover_every_scale_once():
    pns = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    for mode in MODES:
        plan = scale_plan(pns, mode)
        assert [s for seg in plan for s in seg.scales] == list(range(len(pns)))
        assert all(seg.kv_len <= sum(p * p for p in pns) for seg in plan)
    assert sum(seg.padding for seg in scale_plan(pns, "unrolled")) == 0
    grouped = scale_plan(pns, "grouped")
    assert grouped[0].scanned and sum(seg.padding for seg in grouped) <= 0.05 * 680
    assert scale_plan(pns, "scanned")[0].padding == 10 * 256 - 680


# ---- the reference fixtures ------------------------------------------------------------------------------------

# tiny and tiny_stress share a structure, so they share one compiled sampler
@pytest.mark.parametrize("name,mode", [("tiny", "grouped"), ("tiny_stress", "grouped"),
                                       ("small_shared", "unrolled")])
def test_greedy_sampling_reproduces_reference(name, mode):
    """Greedy sampling gives the recorded tokens and images. Then every scale is forced to the recorded tokens
    (an edit that keeps everything) and each step's CFG-mixed logits are compared: that check does not rely on
    the chain of greedy choices. Both calls pass edit inputs (keep nothing / keep everything): one compilation."""
    arrays, _ = load_fixture(name)
    bundle = fixture_bundle(name)
    pns = bundle.tokenizer_config.patch_nums
    recorded = [arrays[f"ar_idx_{k}"].astype(np.int32) for k in range(len(pns))]
    sampler = Sampler(bundle, SampleOptions(**GREEDY, mode=mode, waste_budget=GROUPED_BUDGET), with_logits=True)

    free = sampler(arrays["ar_label_B"], seed=123, edit=(recorded, [np.zeros(t.shape, bool) for t in recorded]))
    for k in range(len(pns)):
        np.testing.assert_array_equal(free["tokens"][k], recorded[k], err_msg=f"scale {k}")
    reference = to_uint8(arrays["ar_img"].transpose(0, 2, 3, 1))
    assert np.abs(free["images"].astype(int) - reference).max() <= 1

    forced = sampler(arrays["ar_label_B"], seed=0, edit=(recorded, [np.ones(t.shape, bool) for t in recorded]))
    for k in range(len(pns)):
        np.testing.assert_allclose(forced["logits"][k], arrays[f"ar_logits_{k}"], atol=1e-4, rtol=0,
                                   err_msg=f"scale {k}")


def test_cached_logits_equal_teacher_forced_forward():
    """Sample stochastically with guidance, then re-score the sampled tokens with the masked (teacher-forcing)
    forward of the conditional and the null class: the sampler's guided logits must agree."""
    bundle = fixture_bundle("tiny_stress")
    vg, vs, tg, ts = split(bundle)
    cfg = 2.0
    options = SampleOptions(cfg=cfg, cfg_schedule="constant", top_k=20, top_p=0.9, mode="unrolled")
    labels = np.asarray([1, 4, 9])
    out = make_sample_fn(vg, tg, options, decode=False, with_logits=True)(vs, ts, labels, np.arange(3), 7)
    tokens = out["tokens"]
    teacher = quantizer.teacher_forcing_input(bundle.tokenizer.quantizer_params(), tokens, bundle.tokenizer_config)
    cond = bundle.var(labels, teacher)
    uncond = bundle.var(np.full_like(labels, bundle.var_config.num_classes), teacher)
    expected = (1 + cfg) * cond - cfg * uncond
    got = jnp.concatenate(out["logits"], axis=1)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert len({tuple(np.asarray(t).ravel()) for t in tokens[-1]}) == 3   # the draws are not all the same


# ---- invariances -----------------------------------------------------------------------------------------------

STOCHASTIC = dict(cfg=1.5, top_k=12, top_p=0.9, more_smooth=True, waste_budget=GROUPED_BUDGET)


def _tokens(bundle, labels, ids, seed, **options):
    vg, vs, tg, ts = split(bundle)
    fn = make_sample_fn(vg, tg, SampleOptions(**{**STOCHASTIC, **options}), decode=False)
    out = fn(vs, ts, np.asarray(labels), np.asarray(ids), seed)
    return [np.asarray(t) for t in out["tokens"]], np.asarray(out["f_hat"])


def test_modes_batch_size_and_seed_invariance():
    bundle = fixture_bundle("tiny_stress")
    labels, ids = [2, 5, 10, 7], [0, 1, 2, 3]   # 10 = the null class
    results = {mode: _tokens(bundle, labels, ids, 3, mode=mode) for mode in MODES}
    base_tokens, base_fhat = results["unrolled"]
    for mode in ("grouped", "scanned"):
        for k, (a, b) in enumerate(zip(base_tokens, results[mode][0])):
            np.testing.assert_array_equal(a, b, err_msg=f"{mode} scale {k}")
        np.testing.assert_allclose(results[mode][1], base_fhat, atol=1e-6)
    # images 3 and 1 drawn in a batch of two, in another order, equal their rows of the batch of four
    pair_tokens, _ = _tokens(bundle, [7, 5], [3, 1], 3, mode="unrolled")
    for a, b in zip(base_tokens, pair_tokens):
        np.testing.assert_array_equal(a[[3, 1]], b)
    # the seed matters
    other, _ = _tokens(bundle, labels, ids, 4, mode="unrolled")
    assert any(not np.array_equal(a, b) for a, b in zip(base_tokens, other))


MULTI_DEVICE_CODE = r"""
import numpy as np, jax
import test_sampler as t
from var_jax.sample.runner import Sampler
from var_jax.sample.sampler import SampleOptions
from var_jax.sharding import make_mesh
assert jax.device_count() == 8
bundle = t.fixture_bundle("tiny_stress")
options = SampleOptions(cfg=1.5, top_k=12, top_p=0.9, mode="grouped", waste_budget=0.5)
labels = np.asarray([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])   # 11 images: padded to 12 on the (2, 2, 2) mesh
single = Sampler(bundle, options)(labels, seed=5)
sharded = Sampler(bundle, options, make_mesh((2, 2, 2)))(labels, seed=5)
assert all(np.array_equal(a, b) for a, b in zip(single["tokens"], sharded["tokens"]))
assert np.abs(single["images"].astype(int) - sharded["images"]).max() <= 1
print("OK", [int(np.abs(a).sum()) for a in single["tokens"]])
"""


def test_one_and_eight_devices_give_the_same_samples():
    assert "OK" in run_with_devices(MULTI_DEVICE_CODE, 8)


# ---- host-side helpers -----------------------------------------------------------------------------------------

def test_labels_are_checked_and_grid_tiles_images():
    np.testing.assert_array_equal(check_labels([0, 9, 10], 10), [0, 9, 10])
    with pytest.raises(ValueError, match=r"class ids \[11, -1\]|class ids \[-1, 11\]"):
        check_labels([3, 11, -1], 10)
    with pytest.raises(ValueError, match="out of range"):
        check_labels([10], 10, allow_null=False)
    images = np.random.default_rng(0).integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
    grid = image_grid(images, columns=3, padding=1)
    assert grid.shape == (2 * 5 + 1, 3 * 7 + 1, 3)
    np.testing.assert_array_equal(grid[6:10, 8:14], images[4])


def test_sample_command_writes_adm_npz_and_resumes(tmp_path):
    from var_jax.checkpoints import save_model_dir
    from var_jax.cli.common import CommandError

    bundle = fixture_bundle("tiny")
    model_dir = save_model_dir(tmp_path / "model", tokenizer=(bundle.tokenizer_config, bundle.tokenizer),
                               var=(bundle.var_config, bundle.var))
    out = tmp_path / "samples"
    argv = ["--checkpoint", str(model_dir), "--classes", "3,7,10", "--num-per-class", "2",
            "--batch-size", "4", "--top-k", "5", "--seed", "1", "--out", str(out)]
    with pytest.raises(CommandError, match=r"class ids \[10\] out of range"):   # 10 is the null class
        run_command("sample", argv)
    argv[3] = "3,7,9"
    run_command("sample", argv)
    with np.load(out / "samples.npz") as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (6, 64, 64, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, [3, 3, 7, 7, 9, 9])
    assert (out / "grid.png").exists()
    shards = sorted((out / "shards").glob("*.npz"))
    assert len(shards) == 2
    # an interrupted run: the second batch and the result are missing; the rerun redoes only that batch
    stamp = shards[0].stat().st_mtime_ns
    shards[1].unlink()
    (out / "samples.npz").unlink()
    run_command("sample", argv)
    assert shards[0].stat().st_mtime_ns == stamp
    with np.load(out / "samples.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], images)
    # the same run with another batch size is refused, not mixed
    with pytest.raises(CommandError, match=r"different settings \(batch_size\)"):
        run_command("sample", argv[:-2] + ["--batch-size", "3"] + argv[-2:])


def test_one_sort_filter_equals_top_k_then_top_p():
    """filter_logits (one sort) equals the two-step top_k_mask -> top_p_mask exactly, on fresh random logits with
    and without ties, over k and p edge values."""
    rng = np.random.default_rng()
    for trial in range(16):
        vocab = int(rng.choice([2, 37, 256]))      # few shapes: every new shape compiles the ops again
        logits = rng.normal(size=(2, 5, vocab)) * rng.uniform(0.1, 8)
        if trial % 2:
            logits = np.round(logits * 2) / 2      # many exact ties, at the k-th value and the top-p boundary
        logits = jnp.asarray(logits, jnp.float32)
        top_k = int(rng.integers(-1, vocab + 2))
        top_p = float(rng.choice([0.0, 0.3, 0.96, 1.0, rng.uniform()]))
        np.testing.assert_array_equal(np.asarray(filtering.filter_logits(logits, top_k, top_p)),
                                      np.asarray(filtering.top_p_mask(filtering.top_k_mask(logits, top_k), top_p)),
                                      err_msg=f"vocab {vocab}, top_k {top_k}, top_p {top_p}")
