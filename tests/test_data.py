"""Data stage: reference transforms, the three sources, build_source, the grain pipeline and host batches."""
import io
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from var_jax.data import digits, transforms
from var_jax.data.folder import ImageFolderSource
from var_jax.data.pipeline import (checkpoint_restore_args, checkpoint_save_args, make_dataset, steps_per_epoch)
from var_jax.data.sources import build_source

RNG = np.random.default_rng()


def random_image(height, width, channels=3):
    return RNG.integers(0, 256, (height, width, channels), dtype=np.uint8)


# --------------------------------------------------------------------------------------------- transforms

@pytest.mark.parametrize("resolution, expected", [(256, 288), (512, 576), (32, 36), (16, 18), (4, 4), (12, 14)])
def test_resized_shorter_side_is_python_round_of_1_125(resolution, expected):
    # 4·1.125 = 4.5 and 12·1.125 = 13.5: Python rounds half to even, as the reference does
    assert transforms.resized_shorter_side(resolution) == expected


@pytest.mark.parametrize("height, width", [(37, 50), (64, 30), (40, 40), (13, 90)])
@pytest.mark.parametrize("resolution", [8, 16, 27])
def test_eval_transform_is_lanczos_resize_then_centre_crop(height, width, resolution):
    array = random_image(height, width)
    shorter = round(1.125 * resolution)
    resized = transforms.resize_shorter_side(Image.fromarray(array), shorter)
    assert min(resized.size) == shorter
    # the longer side is truncated like torchvision's Resize(int)
    assert max(resized.size) == int(shorter * max(height, width) / min(height, width))

    reference = np.asarray(Image.fromarray(array).resize(resized.size, Image.Resampling.LANCZOS))
    top = int(round((reference.shape[0] - resolution) / 2.0))
    left = int(round((reference.shape[1] - resolution) / 2.0))
    out = transforms.preprocess(array, resolution, train=False)
    assert out.shape == (resolution, resolution, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, reference[top:top + resolution, left:left + resolution])


@pytest.mark.parametrize("height, width, crop, top_left", [
    (10, 7, 4, (3, 2)),     # (7-4)/2 = 1.5 rounds to 2
    (9, 9, 4, (2, 2)),      # 2.5 rounds half to even: 2
    (11, 12, 4, (4, 4)),    # 3.5 -> 4
    (5, 5, 5, (0, 0)),
])
def test_centre_crop_offsets_known_answers(height, width, crop, top_left):
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    coords = np.stack([rows, cols], axis=-1)
    cropped = transforms.center_crop(coords, crop)
    assert tuple(cropped[0, 0]) == top_left
    assert cropped.shape[:2] == (crop, crop)


def test_crop_larger_than_image_fails_clearly():
    with pytest.raises(ValueError, match="smaller than the crop size"):
        transforms.center_crop(random_image(5, 9), 6)


def test_random_crop_is_seeded_and_covers_every_offset():
    array = random_image(36, 38)   # R=32: already the resized shape? no: shorter side 36 stays, so crops of it

    def crops(seed, count=60):
        rng = np.random.default_rng(seed)
        return [transforms.preprocess(array, 32, train=True, rng=rng) for _ in range(count)]

    first, again, other = crops(7), crops(7), crops(8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))
    # every crop is a window of the (unchanged, 36 px shorter side) image; the offsets cover 0..4 and 0..6
    offsets = set()
    for crop in first:
        matches = [(t, l) for t in range(5) for l in range(7) if np.array_equal(crop, array[t:t + 32, l:l + 32])]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert {t for t, _ in offsets} == set(range(5))
    assert {l for _, l in offsets} == set(range(7))


def test_horizontal_flip_only_when_asked():
    array = random_image(36, 36)
    rng = np.random.default_rng(0)
    windows = [array[t:t + 32, l:l + 32] for t in range(5) for l in range(5)]
    plain = [transforms.preprocess(array, 32, train=True, rng=rng) for _ in range(30)]
    assert all(any(np.array_equal(p, w) for w in windows) for p in plain)
    flipped = [transforms.preprocess(array, 32, train=True, rng=rng, hflip=True) for _ in range(30)]
    is_flipped = [any(np.array_equal(f, w[:, ::-1]) for w in windows) for f in flipped]
    assert 0 < sum(is_flipped) < len(flipped)


def test_model_range_is_x_times_2_minus_1():
    values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    floats = transforms.to_model_range(values)
    assert floats.dtype == np.float32
    np.testing.assert_allclose(floats, values.astype(np.float64) / 255.0 * 2.0 - 1.0, atol=1e-6)
    assert floats.min() == -1.0 and floats.max() == 1.0
    np.testing.assert_array_equal(transforms.from_model_range(floats), values)
    with pytest.raises(TypeError, match="uint8"):
        transforms.to_model_range(floats)


def test_device_conversion_is_the_host_conversion_bit_for_bit():
    values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    on_device = jax.jit(transforms.to_model_range_on_device)(values)
    assert on_device.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(on_device), transforms.to_model_range(values))
    floats = transforms.to_model_range(values)            # already in the model's range: unchanged
    np.testing.assert_array_equal(np.asarray(jax.jit(transforms.to_model_range_on_device)(floats)), floats)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_load_image_for_eval(tmp_path, mode):
    array = random_image(50, 70, 4)
    image = Image.fromarray(array, "RGBA").convert(mode)
    path = tmp_path / f"x_{mode}.png"
    image.save(path)
    out = transforms.load_image_for_eval(path, 24)
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, transforms.preprocess(np.asarray(image.convert("RGB")), 24, train=False))


# --------------------------------------------------------------------------------------------- digits

def test_digits_source_shapes_classes_and_polarity():
    source, num_classes = build_source({"name": "digits", "image_size": 32})
    assert len(source) == 1797 and num_classes == 10   # sklearn's load_digits
    images = np.stack([source[i]["image"] for i in range(len(source))])
    labels = np.array([source[i]["label"] for i in range(len(source))])
    assert images.shape == (1797, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int32 and set(labels.tolist()) == set(range(10))
    assert np.array_equal(images[..., 0], images[..., 1]) and np.array_equal(images[..., 0], images[..., 2])
    # ink bright on a dark background: corners dark, most pixels darker than the mean, the ink near white
    corners = images[:, [0, 0, -1, -1], [0, -1, 0, -1], 0]
    assert corners.mean() < 10
    assert np.mean(np.median(images[..., 0].reshape(1797, -1), axis=1) < images.mean()) > 0.9
    assert np.percentile(images.max(axis=(1, 2, 3)), 5) > 200
    # and it is the real scan: 4×4 block means track the original 8×8 values
    native, native_labels = digits.native_digits("all")
    np.testing.assert_array_equal(labels, native_labels)
    blocks = images[..., 0].reshape(1797, 8, 4, 8, 4).mean(axis=(2, 4)) / 255.0 * 16.0
    assert np.corrcoef(blocks.ravel(), native.ravel())[0, 1] > 0.95


def test_digits_splits_are_disjoint_stratified_and_complete():
    train, test = digits.split_indices("train"), digits.split_indices("test")
    assert len(train) + len(test) == 1797 and not set(train) & set(test)
    _, labels = digits.native_digits("test")
    assert np.bincount(labels, minlength=10).min() >= 30
    with pytest.raises(ValueError, match="split"):
        digits.split_indices("validation")


# --------------------------------------------------------------------------------------------- folder

def write_image(path, array, format=None):
    Image.fromarray(array).save(path, format=format)


@pytest.fixture
def image_folder(tmp_path):
    """3 classes; a corrupt PNG, a truncated JPEG and non-image files among them."""
    root = tmp_path / "folder"
    expected = []
    for label, name in enumerate(["cat", "dog", "eel"]):
        (root / name).mkdir(parents=True)
        for k in range(3):
            array = random_image(20 + 3 * k + label, 25)
            write_image(root / name / f"{k}.png", array)
            expected.append((str(root / name / f"{k}.png"), label, array))
    (root / "dog" / "0b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + RNG.bytes(200))
    jpeg = io.BytesIO()
    Image.fromarray(random_image(30, 30)).save(jpeg, format="JPEG")
    (root / "eel" / "2b_truncated.jpg").write_bytes(jpeg.getvalue()[:200])
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("not a class")
    return root, expected


def test_folder_source_skips_counts_and_reports_unreadable_files(image_folder, caplog):
    root, expected = image_folder
    source, num_classes = build_source({"name": "folder", "path": str(root)})
    assert num_classes == 3 and source.classes == ["cat", "dog", "eel"]
    assert len(source) == 11   # 9 good + 2 unreadable with image extensions; .txt/.md are not listed
    with caplog.at_level(logging.WARNING, logger="var_jax.data.folder"):
        served = [source[i] for i in range(len(source)) for _ in range(2)]   # each twice: warn once per file
    assert source.num_unreadable == 2 and source.num_substitutions == 4
    warned = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warned) == 2 and any("0b_broken.png" in m for m in warned) and any("2b_truncated" in m for m in warned)

    by_path = {path: (label, array) for path, label, array in expected}
    for i, (path, _) in enumerate(source.samples):
        item = source[i]
        if path not in by_path:   # a bad file is replaced by the next readable one, deterministically
            path = source.samples[(i + 1) % len(source)][0]   # the last one wraps to the first
        label, array = by_path[path]
        assert item["label"] == label and item["label"].dtype == np.int32
        np.testing.assert_array_equal(item["image"], array)
    assert all(s["image"].shape[2] == 3 for s in served)


def test_pipeline_over_a_folder_with_bad_files_runs_an_epoch(image_folder):
    root, _ = image_folder
    source, _ = build_source({"name": "folder", "path": str(root)})
    batches = list(make_dataset(source, image_size=16, global_batch_size=4, seed=1, shard_index=0, shard_count=1,
                                num_epochs=1, num_threads=2))
    assert len(batches) == 11 // 4
    assert all(b["image"].shape == (4, 16, 16, 3) for b in batches)


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="'path'"):
        build_source({"name": "folder"})
    with pytest.raises(FileNotFoundError, match="'path'.*does not exist"):
        build_source({"name": "folder", "path": str(tmp_path / "missing")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        build_source({"name": "folder", "path": str(tmp_path / "empty")})
    (tmp_path / "bad" / "only").mkdir(parents=True)
    (tmp_path / "bad" / "only" / "x.png").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="unreadable"):
        ImageFolderSource(tmp_path / "bad")[0]


def test_build_source_rejects_bad_configs():
    with pytest.raises(ValueError, match="'name'"):
        build_source({"path": "/x"})
    with pytest.raises(ValueError, match="'name' must be one of"):
        build_source({"name": "imagenet"})
    with pytest.raises(KeyError, match="pth"):
        build_source({"name": "folder", "pth": "/x"})
    with pytest.raises(ValueError, match="'tfds_name'"):
        build_source({"name": "tfds"})
    with pytest.raises(ValueError, match="'image_size'"):
        build_source({"name": "digits"})
    import ml_collections
    source, num_classes = build_source(ml_collections.ConfigDict({"name": "digits", "image_size": 16,
                                                                  "split": "test", "hflip": False}))
    assert len(source) == 360 and num_classes == 10


# --------------------------------------------------------------------------------------------- TFDS

tfds = pytest.importorskip("tensorflow_datasets")


class VarJaxTestImages(tfds.core.GeneratorBasedBuilder):
    """A tiny on-disk image dataset, written as ArrayRecord (PNG-encoded by PIL, so no TensorFlow needed)."""
    VERSION = tfds.core.Version("1.0.0")
    NUM_CLASSES = 3

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(num_classes=self.NUM_CLASSES)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(7, 0), "test": self._generate_examples(3, 1)}

    def _generate_examples(self, count, seed):
        for i, (array, label) in enumerate(tiny_examples(count, seed)):
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="PNG")
            yield i, {"image": io.BytesIO(buffer.getvalue()), "label": label}


def tiny_examples(count, seed):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, (18 + i, 21, 3), dtype=np.uint8), i % 3) for i in range(count)]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    VarJaxTestImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return str(data_dir)


def test_tfds_array_record_source_reads_what_was_written(tfds_dir):
    source, num_classes = build_source({"name": "tfds", "tfds_name": "var_jax_test_images", "split": "train",
                                        "data_dir": tfds_dir})
    assert num_classes == 3 and len(source) == 7
    assert type(source._source).__name__ == "ArrayRecordDataSource"
    read = sorted((source[i]["image"].tobytes(), int(source[i]["label"])) for i in range(len(source)))
    written = sorted((array.tobytes(), label) for array, label in tiny_examples(7, 0))
    assert read == written
    assert source[0]["label"].dtype == np.int32
    batch = next(iter(make_dataset(source, image_size=16, global_batch_size=7, seed=0, shard_index=0,
                                   shard_count=1, num_threads=2)))
    assert batch["image"].shape == (7, 16, 16, 3) and batch["image"].dtype == np.uint8


def test_tfds_mock_grayscale_dataset_becomes_rgb():
    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
        source, num_classes = build_source({"name": "tfds", "tfds_name": "mnist", "split": "test"})
        item = source[3]
    assert num_classes == 10 and len(source) == 5
    assert item["image"].shape == (28, 28, 3)
    assert np.array_equal(item["image"][..., 0], item["image"][..., 2])


def test_tfds_missing_dataset_fails_immediately(tmp_path, tfds_dir):
    with pytest.raises(FileNotFoundError, match="not prepared"):
        build_source({"name": "tfds", "tfds_name": "var_jax_test_images", "data_dir": str(tmp_path)})
    with pytest.raises(KeyError, match="label_key"):
        build_source({"name": "tfds", "tfds_name": "var_jax_test_images", "data_dir": tfds_dir,
                      "label_key": "class"})


# --------------------------------------------------------------------------------------------- pipeline

class IndexedSource:
    """Example i has label i (any number of classes works), so batches show exactly which examples they hold."""

    def __init__(self, size):
        self.images = [random_image(10 + i % 4, 12) for i in range(size)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"image": self.images[index], "label": np.int32(index)}


def take(dataset, count):
    iterator = iter(dataset)
    return [next(iterator) for _ in range(count)]


def test_same_seed_same_batches_and_another_seed_differs():
    source = IndexedSource(20)
    kwargs = dict(image_size=8, global_batch_size=4, shard_index=0, shard_count=1, num_threads=2)
    first, again = take(make_dataset(source, seed=3, **kwargs), 8), take(make_dataset(source, seed=3, **kwargs), 8)
    other = take(make_dataset(source, seed=4, **kwargs), 8)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert any(not np.array_equal(a["label"], b["label"]) for a, b in zip(first, other))
    assert first[0]["label"].dtype == np.int32 and first[0]["image"].dtype == np.uint8


def test_epochs_are_complete_and_reshuffled():
    source = IndexedSource(12)
    batches = list(make_dataset(source, image_size=8, global_batch_size=4, seed=0, shard_index=0, shard_count=1,
                                num_epochs=3, num_threads=2))
    assert len(batches) == 9 == 3 * steps_per_epoch(12, 4)
    epochs = np.concatenate([b["label"] for b in batches]).reshape(3, 12)
    assert all(sorted(e) == list(range(12)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3


def test_eval_order_and_pixels_follow_the_source():
    source = IndexedSource(6)
    batches = list(make_dataset(source, image_size=8, global_batch_size=3, seed=0, train=False, shard_index=0,
                                shard_count=1, num_epochs=1, num_threads=2))
    images = np.concatenate([b["image"] for b in batches])
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), np.arange(6))
    for i in range(6):
        expected = transforms.preprocess(source.images[i], 8, train=False)
        np.testing.assert_array_equal(images[i], expected)


def test_restoring_iterator_state_mid_epoch_continues_with_the_next_batch():
    source = IndexedSource(30)
    kwargs = dict(image_size=8, global_batch_size=4, seed=11, shard_index=0, shard_count=1, num_threads=2)
    iterator = iter(make_dataset(source, **kwargs))
    for _ in range(5):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(6)]   # crosses the epoch boundary (30 examples = 7.5 batches)
    resumed = iter(make_dataset(source, **kwargs))
    resumed.set_state(state)
    for a, b in zip(expected, [next(resumed) for _ in range(6)]):
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_array_equal(a["image"], b["image"])


def test_iterator_state_round_trips_through_an_orbax_checkpoint_manager(tmp_path):
    import orbax.checkpoint as ocp
    source = IndexedSource(16)
    kwargs = dict(image_size=8, global_batch_size=4, seed=2, shard_index=0, shard_count=1, num_threads=2)
    iterator = iter(make_dataset(source, **kwargs))
    next(iterator), next(iterator)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(2, args=ocp.args.Composite(data=checkpoint_save_args(iterator)))
        manager.wait_until_finished()
    expected = next(iterator)
    resumed = iter(make_dataset(source, **kwargs))
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(manager.latest_step(), args=ocp.args.Composite(data=checkpoint_restore_args(resumed)))
    np.testing.assert_array_equal(next(resumed)["label"], expected["label"])


@pytest.mark.parametrize("size, num_epochs", [(24, 1), (26, 2)])
def test_host_shards_are_disjoint_cover_the_stream_and_match_one_host(size, num_epochs):
    source = IndexedSource(size)
    kwargs = dict(image_size=8, global_batch_size=6, seed=5, num_epochs=num_epochs, num_threads=2)
    single = list(make_dataset(source, shard_index=0, shard_count=1, **kwargs))
    hosts = [list(make_dataset(source, shard_index=p, shard_count=3, **kwargs)) for p in range(3)]
    assert len({len(h) for h in hosts}) == 1 and len(hosts[0]) == len(single) == size * num_epochs // 6
    for step, batch in enumerate(single):
        parts = [h[step] for h in hosts]
        assert all(p["label"].shape == (2,) for p in parts)
        # host p holds the p-th block of the global batch: the same examples, order and crops as one host
        for p, part in enumerate(parts):
            np.testing.assert_array_equal(part["label"], batch["label"][2 * p:2 * p + 2])
            np.testing.assert_array_equal(part["image"], batch["image"][2 * p:2 * p + 2])
    per_host = [set(np.concatenate([b["label"] for b in h]).tolist()) for h in hosts]
    if num_epochs == 1:
        assert not (per_host[0] & per_host[1] or per_host[0] & per_host[2] or per_host[1] & per_host[2])
        assert set.union(*per_host) == set(range(size))


def test_pipeline_rejects_bad_arguments():
    source = IndexedSource(8)
    with pytest.raises(ValueError, match="multiple of the number of hosts"):
        make_dataset(source, image_size=8, global_batch_size=5, seed=0, shard_index=0, shard_count=2)
    with pytest.raises(ValueError, match="shard_index"):
        make_dataset(source, image_size=8, global_batch_size=4, seed=0, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="do not fill one global batch"):
        make_dataset(source, image_size=8, global_batch_size=16, seed=0, shard_index=0, shard_count=1,
                     num_epochs=1)


def test_worker_processes_give_the_same_batches():
    source = IndexedSource(12)
    kwargs = dict(image_size=8, global_batch_size=4, seed=9, shard_index=0, shard_count=1, num_threads=2)
    inline = take(make_dataset(source, **kwargs), 4)
    workers = take(make_dataset(source, worker_count=2, **kwargs), 4)
    for a, b in zip(inline, workers):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_global_batch_from_host_on_8_devices():
    from conftest import run_with_devices
    out = run_with_devices("""
import jax, numpy as np
from var_jax.sharding import make_mesh
from var_jax.data.pipeline import global_batch_from_host
mesh = make_mesh((4, 2, 1))
local = {'image': np.random.default_rng(0).uniform(-1, 1, (16, 8, 8, 3)).astype(np.float32),
         'label': np.arange(16, dtype=np.int32)}
batch = global_batch_from_host(local, mesh)
assert batch['image'].shape == (16, 8, 8, 3) and batch['label'].dtype == np.int32
assert np.array_equal(np.asarray(batch['image']), local['image'])
assert np.array_equal(np.asarray(batch['label']), local['label'])
assert len(batch['label'].addressable_shards) == 8
assert {s.data.shape for s in batch['image'].addressable_shards} == {(2, 8, 8, 3)}
try:
    global_batch_from_host({'x': np.zeros((12, 2))}, mesh)
    raise SystemExit('expected an error')
except ValueError as e:
    assert 'not divisible' in str(e), e
print('ok', batch['image'].sharding.spec)
""", 8)
    assert "ok" in out and "('data', 'fsdp')" in out
