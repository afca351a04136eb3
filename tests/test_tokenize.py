"""Pre-tokenised data (`var-jax tokenize`, data.name='tokens'): the ids and teacher input a step builds from a token
set equal, byte for byte, those the in-step tokenizer builds from the same crops, and one train step from either
gives the same loss; a killed run resumes writing every example exactly once; token sets of another tokenizer or
image size are refused; the pipeline draws flipped copies per example and epoch; `train` runs from token sets
with held-out evaluation on."""
import json
import os
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import REPO_ROOT, repo_config
from var_jax.cli import main
from var_jax.data import tokens
from var_jax.data.digits import DigitsSource
from var_jax.data.pipeline import TrainBatches, make_eval_dataset
from var_jax.data.sources import build_train_and_held_out
from var_jax.data.tokens import TokenSource
from var_jax.data.transforms import preprocess
from var_jax.mesh import make_mesh
from var_jax.train.config_base import use_token_sets
from var_jax.train.stage import load_tokenizer_for
from var_jax.train.var.stage import build_var_stage
from var_jax.train.var.step import make_ids_teacher_fn, make_tokenizer_fn

IMAGE_SIZE, PATCH_NUMS, SEQ_LEN = 16, (1, 2, 3, 4), 30     # the conftest tokenizer: 16 px -> 4x4 latent
CONFIG = f"configs/digits_var.py:depth=1,width=64,batch=8,image_size={IMAGE_SIZE}"
COUNT, SHARD, VAL_COUNT = 48, 16, 40


def tokenize(tokenizer, out, *extra):
    return main(["tokenize", "--checkpoint", str(tokenizer), "--config", str(REPO_ROOT / CONFIG),
                 f"--config.patch_nums={PATCH_NUMS}", "--out", str(out), "--shard-size", str(SHARD),
                 "--batch-size", "16", *extra])


@pytest.fixture(scope="module")
def token_sets(tmp_path_factory, tokenizer_dir):
    """(training set of the first 48 digits 'train' images with flips, held-out set of 40 'test' images)."""
    root = tmp_path_factory.mktemp("tokens")
    assert tokenize(tokenizer_dir, root / "train", "--count", str(COUNT), "--flip") == 0
    assert tokenize(tokenizer_dir, root / "val", "--split", "test", "--count", str(VAL_COUNT)) == 0
    return root / "train", root / "val"


def var_config(tokenizer, **data):
    config = repo_config(CONFIG.removeprefix("configs/"))
    config.patch_nums, config.tokenizer_checkpoint, config.eval_every = PATCH_NUMS, str(tokenizer), 0
    return use_token_sets(config, **data) if data else config


@pytest.fixture(scope="module")
def token_run(tmp_path_factory, tokenizer_dir, token_sets, monkeypatch_module):
    """Two steps of `train` from the token sets with a fresh seed, held-out evaluation at step 2, as documented:
    relative paths from the repo root. Returns (seed, its metrics records)."""
    seed = int(np.random.default_rng().integers(1 << 16))
    monkeypatch_module.chdir(REPO_ROOT)
    rel = lambda p: os.path.relpath(p, REPO_ROOT)
    train_dir, val_dir = token_sets
    workdir = tmp_path_factory.mktemp("token_run") / "var"
    assert main(["train", "--config", CONFIG, "--workdir", rel(workdir),
                 f"--config.tokenizer_checkpoint={rel(tokenizer_dir)}", f"--config.patch_nums={PATCH_NUMS}",
                 "--config.data.name=tokens", f"--config.data.dir={rel(train_dir)}",
                 f"--config.data.eval_dir={rel(val_dir)}", "--config.total_steps=2", "--config.eval_every=2",
                 "--config.eval_batch_size=16", "--config.log_every=1", "--config.sample_every=0",
                 f"--config.seed={seed}"]) == 0
    assert (workdir / "model" / "config.json").exists()
    return seed, [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_train_from_token_sets_with_held_out_evaluation(token_run):
    _, records = token_run
    assert [r["step"] for r in records] == [1, 2]
    assert records[-1]["val/images"] == VAL_COUNT and np.isfinite(records[-1]["val/loss"])
    assert "val/loss" not in records[0]


def test_token_set_steps_equal_in_step_tokenisation(tmp_path, tokenizer_dir, token_sets, token_run):
    """The token run's first batch (its examples and flips found by running the same pipeline over a set whose ids
    name their example) as images, cropped as documented: the in-step tokenizer gives the same ids and teacher
    input bytes as the ids the set holds, and one train step of the image stage logs the token run's step-1 loss
    bit for bit (the teacher input is one function of the same integer ids in both programs, and the
    transformer's inputs are then the same bytes)."""
    train_dir, _ = token_sets
    seed, records = token_run
    probe = TokenSource(write_synthetic_set(tmp_path / "probe", COUNT, SHARD, flip=True))
    first = next(TrainBatches(probe, image_size=IMAGE_SIZE, global_batch_size=8, seed=seed, train=True))["tokens"]
    index, flipped = first[:, 0] % 1000, first[:, 0] >= 1000
    source, token_set = DigitsSource(IMAGE_SIZE, split="train"), TokenSource(train_dir)
    # the documented crop: the training transform with a generator seeded by (config seed 0, index)
    crops = [preprocess(source[i]["image"], IMAGE_SIZE, train=True, rng=np.random.default_rng([0, i])) for i in index]
    images = np.stack([c[:, ::-1] if f else c for c, f in zip(crops, flipped)])
    ids = np.where(flipped[:, None], token_set.arrays["tokens_flipped"][index], token_set.arrays["tokens"][index])
    labels = token_set.arrays["labels"][index]
    assert ids.dtype == np.uint16 and ids.shape == (8, SEQ_LEN)
    np.testing.assert_array_equal(labels, [source[i]["label"] for i in index])
    np.testing.assert_array_equal(token_set.arrays["indices"], np.arange(COUNT))

    tok_cfg, tokenizer = load_tokenizer_for(var_config(tokenizer_dir))
    graphdef, state = nnx.split(tokenizer)
    frozen = nnx.to_pure_dict(state)
    in_step = jax.device_get(jax.jit(make_tokenizer_fn(graphdef, tok_cfg))(frozen, images))
    from_ids = jax.device_get(jax.jit(make_ids_teacher_fn(graphdef, tok_cfg))(frozen, ids))
    assert len(np.unique(in_step[0])) > 10        # a tokenizer that gives varied ids, so equality means something
    for a, b in zip(in_step, from_ids):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()

    mesh = make_mesh((-1, 1, 1))
    config = var_config(tokenizer_dir)
    config.seed = seed
    stage = build_var_stage(config, mesh, 10)
    with jax.set_mesh(mesh):
        local = {"image": images, "label": labels, "skipped_images": np.zeros(8, np.int32)}
        _, metrics = stage.step_fn(0)(stage.init(), stage.make_batch(local, 0), stage.frozen)
    loss = np.float32(jax.device_get(metrics["loss"]))
    assert loss.tobytes() == np.float32(records[0]["loss"]).tobytes(), (seed, loss, records[0]["loss"])


def write_synthetic_set(directory, count: int, shard_size: int, flip: bool, transform: str = "train"):
    """A token set whose ids name their example: tokens[i] = i, flipped copies 1000 + i."""
    directory.mkdir(parents=True)
    ranges = tokens.shard_ranges(count, shard_size)
    for k, (a, b) in enumerate(ranges):
        ids = np.repeat(np.arange(a, b, dtype=np.uint16)[:, None], SEQ_LEN, axis=1)
        arrays = {"tokens": ids, "labels": np.arange(a, b, dtype=np.int32) % 10,
                  "indices": np.arange(a, b, dtype=np.int64)}
        if flip:
            arrays["tokens_flipped"] = ids + 1000
        tokens.write_shard(directory, k, len(ranges), arrays)
    meta = {"format": tokens.FORMAT_NAME, "version": tokens.FORMAT_VERSION, "count": count, "flip": flip,
            "num_shards": len(ranges), "num_classes": 10, "split": "train", "transform": transform,
            "source": {"name": "digits", "image_size": IMAGE_SIZE}, "image_size": IMAGE_SIZE}
    (directory / tokens.META_FILE).write_text(json.dumps(meta))
    return directory


def test_pipeline_draws_a_flipped_copy_per_example_and_epoch(tmp_path):
    count, batch = 40, 8
    source = TokenSource(write_synthetic_set(tmp_path / "set", count, 16, flip=True))
    epochs = 6
    seed = int(np.random.default_rng().integers(1 << 30))
    batches = TrainBatches(source, image_size=IMAGE_SIZE, global_batch_size=batch, seed=seed, train=True)
    picks = np.zeros((epochs, count), np.int64)
    for epoch in range(epochs):
        rows = np.concatenate([next(batches)["tokens"] for _ in range(count // batch)])
        assert (rows == rows[:, :1]).all()
        example, flipped = rows[:, 0] % 1000, rows[:, 0] >= 1000
        np.testing.assert_array_equal(np.sort(example), np.arange(count))    # every example once an epoch
        picks[epoch, example] = flipped
    assert 0.3 < picks.mean() < 0.7                                          # half of the draws flipped
    assert (picks != picks[:1]).any(axis=0).mean() > 0.5                     # redrawn every epoch
    held_out = np.concatenate([b["tokens"] for b in make_eval_dataset(source, image_size=IMAGE_SIZE,
                                                                       global_batch_size=16)])
    np.testing.assert_array_equal(held_out[:count, 0], np.arange(count))    # held out: source order, no flips


def shard_contents(directory):
    return {p.name: dict(np.load(p)) for p in sorted(Path(directory).glob("shard-*.npz"))}


def test_killed_run_resumes_writing_every_example_once(tmp_path, tokenizer_dir, token_sets, capsys):
    """The state a SIGKILL leaves (the last shard unwritten, its temporary file half written): a rerun writes
    that shard alone, the same bytes, and the set holds every example exactly once; a damaged shard is named; a
    rerun with other settings is refused."""
    train_dir, _ = token_sets
    out = tmp_path / "resumed"
    shutil.copytree(train_dir, out)
    last = out / tokens.shard_name(COUNT // SHARD - 1, COUNT // SHARD)
    last.unlink()
    stale = out / f".{last.name}.tmp-12345"
    stale.write_bytes(b"half a shard")
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npz")}
    with pytest.raises(ValueError, match="incomplete"):
        TokenSource(out)
    assert tokenize(tokenizer_dir, out, "--count", str(COUNT), "--flip") == 0
    assert not stale.exists()
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npz") if p.name in kept} == kept
    resumed, original = shard_contents(out), shard_contents(train_dir)
    assert resumed.keys() == original.keys()
    for name in original:
        for key in original[name]:
            np.testing.assert_array_equal(resumed[name][key], original[name][key])
    ids = np.concatenate([s["indices"] for s in resumed.values()])
    np.testing.assert_array_equal(np.sort(ids), np.arange(COUNT))        # every example exactly once
    content = last.read_bytes()
    last.write_bytes(content[:len(content) // 2])                         # damaged by something else
    with pytest.raises(ValueError, match=f"{last.name} is damaged .*; delete it and rerun"):
        TokenSource(out)
    with pytest.raises(SystemExit):                                       # another count: another token set
        tokenize(tokenizer_dir, out, "--count", str(COUNT - SHARD), "--flip")
    assert "holds a token set with different settings (count, num_shards)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def other_tokenizer_dir(tmp_path_factory):
    """The conftest tokenizer's config with other weights."""
    from var_jax.checkpoints import save_model_dir
    from var_jax.tokenizer.config import TokenizerConfig
    from var_jax.tokenizer.vqvae import VQVAE
    cfg = TokenizerConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                          patch_nums=PATCH_NUMS)
    path = tmp_path_factory.mktemp("other_tok") / "model"
    save_model_dir(path, tokenizer=(cfg, VQVAE(cfg, rngs=nnx.Rngs(1))))
    return path


def test_mismatched_token_sets_are_refused(tmp_path, tokenizer_dir, other_tokenizer_dir, token_sets, capsys,
                                           monkeypatch):
    """`train` refuses, in one line and before writing its workdir, token sets of other tokenizer weights or in
    the wrong role; check_matches (what the stage calls) names other scales, vocabularies and image sizes."""
    monkeypatch.chdir(tmp_path)
    train_dir, val_dir = token_sets

    def refusal(tokenizer, *extra) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--config", str(REPO_ROOT / CONFIG), "--workdir", "unused_workdir",
                  f"--config.tokenizer_checkpoint={tokenizer}", f"--config.patch_nums={PATCH_NUMS}",
                  "--config.data.name=tokens", *extra])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "data.dir: " in (err := refusal(other_tokenizer_dir, f"--config.data.dir={train_dir}")), err
    assert "other weights" in err
    assert "field 'dir': " in (err := refusal(tokenizer_dir, f"--config.data.dir={val_dir}")), err
    assert "holds the 'test' split with the eval transform" in err
    assert "field 'eval_dir': " in (err := refusal(tokenizer_dir, f"--config.data.dir={train_dir}",
                                                   f"--config.data.eval_dir={train_dir}", "--config.eval_every=2"))
    assert "holds the 'train' split with the train transform" in err
    assert not (tmp_path / "unused_workdir").exists()

    meta = tokens.read_meta(train_dir)
    run = meta["tokenizer"]
    tokens.check_matches(meta, train_dir, run, IMAGE_SIZE)       # the set's own tokenizer passes
    for change, message in (({"patch_nums": [1, 2, 4]}, "patch_nums [1, 2, 3, 4], the run's tokenizer has [1, 2, 4]"),
                            ({"vocab_size": 128}, "vocab_size 64, the run's tokenizer has 128"),
                            ({"quant_resi": 0.25}, "other settings (quant_resi)")):
        with pytest.raises(tokens.TokenSetError, match=re.escape(message)):
            tokens.check_matches(meta, train_dir, {**run, "config": {**run["config"], **change}}, IMAGE_SIZE)
    with pytest.raises(tokens.TokenSetError, match="at image_size 16, the run uses 32"):
        tokens.check_matches(meta, train_dir, run, 32)


def test_held_out_defaults_to_the_source_images_and_hflip_needs_flipped_tokens(token_sets, tmp_path):
    train_dir, val_dir = token_sets
    unflipped = write_synthetic_set(tmp_path / "unflipped", 20, 16, flip=False)
    with pytest.raises(ValueError, match="'hflip': .* was tokenized without --flip"):
        build_train_and_held_out({"name": "tokens", "dir": str(unflipped), "hflip": True})
    train, held_out, classes = build_train_and_held_out({"name": "tokens", "dir": str(train_dir)})
    assert isinstance(train, TokenSource) and classes == 10
    assert isinstance(held_out, DigitsSource) and held_out.split == "test"
    _, held_out, _ = build_train_and_held_out({"name": "tokens", "dir": str(train_dir), "eval_dir": str(val_dir)})
    assert isinstance(held_out, TokenSource) and len(held_out) == VAL_COUNT


@pytest.mark.parametrize("extra, message", [
    (["--count", "5000"], "--count 5000: the digits 'train' split has 1437 images"),
    (["--count", "0"], "--count must be >= 1"),
    (["--config.data.name=tokens"], "data.name is 'tokens'; tokenize reads images"),
    (["--config.data.name=shapes"], "--count is required: the shapes 'train' split is endless"),
    (["--config.data.hflip=True"], "pass --flip"),
])
def test_tokenize_refuses_bad_arguments_in_one_line(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        tokenize(tmp_path / "no_tokenizer", tmp_path / "out", *extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_runs_recorded_before_token_sets_still_resume_and_another_token_set_is_refused(tmp_path):
    """data.dir / data.eval_dir are new config fields: a run recorded without them resumes; data.eval_dir is a
    run setting (like data.eval_split), data.dir is not."""
    from resume_guard import check_resumes, record_run
    from var_jax.train.checkpointing import CheckpointMismatch, run_identity
    config = repo_config(CONFIG.removeprefix("configs/"))
    old = run_identity(config)
    del old["data"]["dir"]
    record_run(tmp_path, old)
    check_resumes(tmp_path, config)
    config.data.eval_dir = "tokens/val"
    check_resumes(tmp_path, config)
    with pytest.raises(CheckpointMismatch, match="data.dir"):
        check_resumes(tmp_path, use_token_sets(config, "tokens/train"))


def test_a_missing_or_broken_meta_file_is_one_line_naming_it(tmp_path):
    with pytest.raises(tokens.TokenSetError, match=re.escape(f"{tmp_path}/meta.json: no such file ({tmp_path} is "
                                                             "not a token set; make one with `var-jax tokenize`)")):
        tokens.read_meta(tmp_path)
    for content, message in (("{", "not valid JSON"), ('"tokens"', "expected a JSON object, got str"),
                             ('{"format": "other"}', "not a 'var-jax-tokens' file")):
        (tmp_path / "meta.json").write_text(content)
        with pytest.raises(tokens.TokenSetError, match=re.escape(f"{tmp_path}/meta.json: {message}")):
            tokens.read_meta(tmp_path)
