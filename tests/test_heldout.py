"""Held-out evaluation during training (issue 10): val/... metrics in metrics.jsonl at eval_every, the VAR values
against a direct float64 computation over the held-out digits, every held-out image counted once (a held-out size
not divisible by the eval batch), the best model by val/loss, resuming from the latest checkpoint, the tokenizer's
val metrics, and held-out files never in training batches (folder splits)."""
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from conftest import REPO_ROOT
from var_jax.checkpoints import load_model_dir, model_parts, pure_dict, split_model
from var_jax.cli import main
from var_jax.data.digits import DigitsSource
from var_jax.data.folder import ImageFolderSource
from var_jax.data.pipeline import make_dataset, make_eval_dataset
from var_jax.data.sources import build_train_and_held_out
from var_jax.data.transforms import preprocess, to_model_range
from var_jax.tokenizer import quantizer
from var_jax.tokenizer.vqvae import image_to_tokens
from var_jax.train.checkpointing import BEST_MODEL_DIR, BEST_MODEL_FILE, BestModel
from var_jax.train.var.evaluate import make_var_eval_step
from var_jax.train.var.step import make_tokenizer_fn
from var_jax.transformer import VAR

PATCH_NUMS = (1, 2, 3, 4)
IMAGE_SIZE = 16
HELD_OUT = 360          # digits 'test'
EVAL_BATCH = 48         # 360 = 7 × 48 + 24: the last batch is half padding


def records(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def var_train(workdir, tokenizer, steps, *extra):
    return main(["train", "--config", str(REPO_ROOT / "configs/digits_var.py")
                 + f":depth=1,width=64,batch=8,image_size={IMAGE_SIZE}", "--workdir", str(workdir),
                 f"--config.tokenizer_checkpoint={tokenizer}", f"--config.patch_nums={PATCH_NUMS}",
                 f"--config.total_steps={steps}", "--config.log_every=3", "--config.checkpoint_every=4",
                 "--config.sample_every=0", "--config.eval_every=2", f"--config.eval_batch_size={EVAL_BATCH}", *extra])


@pytest.fixture(scope="module")
def var_run(tmp_path_factory, tokenizer_dir):
    workdir = tmp_path_factory.mktemp("heldout") / "var"
    assert var_train(workdir, tokenizer_dir, 4) == 0
    return workdir


def direct_metrics(model_dir) -> dict:
    """val/... of a model directory over the held-out digits, by hand: centre-cropped images, the tokenizer's
    tokens and teacher input, one forward of all 360 images, cross-entropy and accuracy in float64."""
    bundle = load_model_dir(model_dir)
    source = DigitsSource(IMAGE_SIZE, split="test")
    images = np.stack([to_model_range(preprocess(source[i]["image"], IMAGE_SIZE, train=False))
                       for i in range(len(source))])
    labels = np.array([source[i]["label"] for i in range(len(source))], np.int32)
    tokens = image_to_tokens(bundle.tokenizer, images)
    teacher = quantizer.teacher_forcing_input(bundle.tokenizer.quantizer_params(), tokens, bundle.tokenizer.cfg)
    logits = np.asarray(bundle.var(labels, teacher), np.float64)
    targets = np.concatenate([np.asarray(t) for t in tokens], axis=1)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    correct = (logits.argmax(-1) == targets).astype(np.float64)
    out = {"val/loss": ce.mean(), "val/acc": 100 * correct.mean(), "val/images": float(len(labels))}
    begin = 0
    for k, pn in enumerate(PATCH_NUMS):
        out[f"val/loss_s{k}"] = ce[:, begin:begin + pn * pn].mean()
        out[f"val/acc_s{k}"] = 100 * correct[:, begin:begin + pn * pn].mean()
        begin += pn * pn
    out["val/loss_last"], out["val/acc_last"] = out[f"val/loss_s{len(PATCH_NUMS) - 1}"], out[
        f"val/acc_s{len(PATCH_NUMS) - 1}"]
    return out


def assert_matches(logged: dict, direct: dict):
    for key, value in direct.items():
        # accuracies: a near-tie token may flip between batch sizes (one token of 10,800 is 0.009%)
        tolerance = dict(rtol=1e-5) if "loss" in key else dict(atol=0.02)
        np.testing.assert_allclose(logged[key], value, err_msg=key, **tolerance)


def test_var_val_metrics_at_eval_every_match_a_direct_computation(var_run):
    by_step = {r["step"]: r for r in records(var_run)}
    assert sorted(by_step) == [2, 3, 4]          # log_every 3, plus every evaluated step
    expected = {"val/loss", "val/acc", "val/loss_last", "val/acc_last", "val/images",
                *(f"val/{m}_s{k}" for m in ("loss", "acc") for k in range(len(PATCH_NUMS)))}
    for step in (2, 4):
        assert expected <= set(by_step[step]) and "loss" in by_step[step]
        assert by_step[step]["val/images"] == HELD_OUT   # padding masked: each held-out image once
    assert not any(k.startswith("val/") for k in by_step[3])
    assert_matches(by_step[4], direct_metrics(var_run / "model"))   # the step-4 state is the exported model


def test_best_model_is_the_lowest_val_loss_and_resume_continues_from_the_latest(var_run, tokenizer_dir):
    evaluated = {r["step"]: r["val/loss"] for r in records(var_run) if "val/loss" in r}
    best = json.loads((var_run / BEST_MODEL_FILE).read_text())
    assert best["metric"] == "val/loss" and best["step"] == min(evaluated, key=evaluated.get)
    assert best["value"] == evaluated[best["step"]]
    assert_matches(best["metrics"], direct_metrics(var_run / BEST_MODEL_DIR))
    # extending the run resumes from the latest checkpoint (step 4), whichever model is the best
    assert var_train(var_run, tokenizer_dir, 6) == 0
    steps = [r["step"] for r in records(var_run)]
    assert steps == [2, 3, 4, 6] and "val/loss" in records(var_run)[-1]


def test_class_dropout_in_evaluation_is_a_switch(var_run):
    """eval_class_dropout=False conditions every image on its class; True drops labels as the reference's
    evaluation does, the same ones at every evaluation (seeded by the batch's number in the pass)."""
    bundle = load_model_dir(var_run / "model")
    parts = model_parts(lambda rngs: VAR(bundle.var_config, rngs=rngs))
    params = pure_dict(split_model(bundle.var)[1])
    tok_graphdef, tok_state = nnx.split(bundle.tokenizer)
    tokenize = make_tokenizer_fn(tok_graphdef, bundle.tokenizer.cfg)
    source = DigitsSource(IMAGE_SIZE, split="test")
    batch = {"image": np.stack([preprocess(source[i]["image"], IMAGE_SIZE, train=False) for i in range(64)]),
             "label": np.array([source[i]["label"] for i in range(64)], np.int32), "mask": np.ones(64, np.float32),
             "index": np.int32(0)}
    frozen = nnx.to_pure_dict(tok_state)
    run = lambda dropout, b=batch: jax.device_get(jax.jit(make_var_eval_step(
        parts, PATCH_NUMS, tokenize, class_dropout=dropout))(params, b, frozen))
    plain, dropped = run(False), run(True)
    assert plain["images"] == dropped["images"] == 64
    assert not np.allclose(plain["ce"], dropped["ce"], rtol=1e-7, atol=0)
    np.testing.assert_array_equal(dropped["ce"], run(True)["ce"])
    assert run(False, {**batch, "mask": np.zeros(64, np.float32)})["ce"].sum() == 0   # masked rows add nothing


def test_best_model_keeps_the_minimum_across_restarts(tmp_path):
    exported = []
    keeper = BestModel(tmp_path, "val/loss", lambda state, directory: exported.append(state))

    class State:   # check_finite reads .params
        def __init__(self, tag):
            self.tag, self.params = tag, {"w": np.ones(2, np.float32)}
    for step, value in ((1, 3.0), (2, 2.0), (3, 2.5), (4, float("nan")), (5, 1.0)):
        keeper.update(step, {"val/loss": value}, State(step))
    assert [s.tag for s in exported] == [1, 2, 5]
    assert json.loads((tmp_path / BEST_MODEL_FILE).read_text())["step"] == 5
    again = BestModel(tmp_path, "val/loss", lambda state, directory: exported.append(state))
    assert not again.update(6, {"val/loss": 1.5}, State(6)) and again.update(7, {"val/loss": 0.5}, State(7))


def test_tokenizer_val_metrics(tmp_path):
    workdir = tmp_path / "tok"
    assert main(["train", "--config", str(REPO_ROOT / "configs/digits_tokenizer.py") + ":steps=2,batch=8",
                 "--workdir", str(workdir), "--config.log_every=1", "--config.checkpoint_every=2",
                 "--config.sample_every=0", "--config.eval_every=2", "--config.eval_batch_size=64"]) == 0
    last = records(workdir)[-1]
    assert last["step"] == 2 and last["val/images"] == HELD_OUT
    assert {"val/rec_loss", "val/psnr", "val/code_usage", *(f"val/code_usage_{pn}" for pn in PATCH_NUMS)} <= set(last)
    assert 0 < last["val/code_usage"] <= 100 and last["val/psnr"] > 0 and last["val/rec_loss"] > 0
    assert json.loads((workdir / BEST_MODEL_FILE).read_text())["metric"] == "val/rec_loss"
    assert load_model_dir(workdir / BEST_MODEL_DIR).tokenizer is not None


class _Indexed:
    """label = index: which examples a batch holds."""
    num_classes = 1

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": np.zeros((4, 4, 3), np.uint8), "label": np.int32(i)}


def test_eval_dataset_counts_every_image_once_on_every_host_count():
    for hosts in (1, 2):
        seen = []
        for shard in range(hosts):
            for batch in make_eval_dataset(_Indexed(10), image_size=4, global_batch_size=4, shard_index=shard,
                                           shard_count=hosts):
                assert batch["mask"].shape == (4 // hosts,)
                seen += list(batch["label"][batch["mask"] == 1.0])
        assert sorted(seen) == list(range(10))


def _write_folder(root, per_class: int):
    """Class folders a/ and b/ of 8 px images whose colour encodes a unique id (red = id % 256, green = id // 256)."""
    ids = {}
    for c, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            uid = c * per_class + i
            path = root / name / f"{i:04d}.png"
            Image.fromarray(np.full((8, 8, 3), (uid % 256, uid // 256, 9), np.uint8)).save(path)
            ids[str(path)] = uid
    return ids


def _uid(image):
    rgb = np.asarray(image)[0, 0].astype(int)
    return int(rgb[0] + 256 * rgb[1])


def test_folder_held_out_fraction_is_never_trained_on(tmp_path):
    ids = _write_folder(tmp_path / "images", 150)
    train, held_out, num_classes = build_train_and_held_out({"name": "folder", "path": str(tmp_path / "images"),
                                                             "image_size": 8})
    train_files, held_files = {p for p, _ in train.samples}, {p for p, _ in held_out.samples}
    assert num_classes == 2 and held_files and not train_files & held_files
    assert train_files | held_files == set(ids)
    held_ids = {ids[p] for p in held_files}
    trained = set()
    for batch in make_dataset(train, image_size=8, global_batch_size=len(train), seed=0, num_epochs=1):
        trained |= {_uid(image) for image in batch["image"]}
    assert trained == {ids[p] for p in train_files} and not trained & held_ids
    # the split depends on the path inside the root only: a moved copy holds out the same files
    shutil.copytree(tmp_path / "images", tmp_path / "elsewhere" / "copy")
    moved = ImageFolderSource(tmp_path / "elsewhere" / "copy", split="val")
    assert {str(Path(p).relative_to(tmp_path / "elsewhere" / "copy")) for p, _ in moved.samples} == {
        str(Path(p).relative_to(tmp_path / "images")) for p in held_files}


def test_folder_val_beside_train(tmp_path):
    _write_folder(tmp_path / "data" / "train", 3)
    (tmp_path / "data" / "val" / "b").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "data" / "val" / "b" / "x.png")
    train, held_out, _ = build_train_and_held_out({"name": "folder", "path": str(tmp_path / "data" / "train"),
                                                   "image_size": 8})
    assert len(train) == 6 and [label for _, label in held_out.samples] == [1]   # labelled by the train classes
    # a folder too small for a hashed held-out share says how to go on
    with pytest.raises(ValueError, match="eval_every=0"):
        build_train_and_held_out({"name": "folder", "path": str(tmp_path / "data" / "val"), "image_size": 8})
