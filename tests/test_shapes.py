"""The procedural shapes dataset: deterministic from (seed, index), balanced, held-out range disjoint from
training, anti-aliased; reachable through build_source and the grain pipeline."""
import numpy as np
import pytest

from var_jax.data import shapes
from var_jax.data.pipeline import make_dataset
from var_jax.data.sources import build_source

RNG = np.random.default_rng()


def test_same_seed_and_index_give_the_same_image_in_any_order():
    indices = RNG.integers(0, shapes.MAX_INDEX, size=8)
    first = [shapes.render(i, 32) for i in indices]
    again = [shapes.render(i, 32) for i in indices[::-1]][::-1]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert all(a.shape == (32, 32, 3) and a.dtype == np.uint8 for a in first)
    # another seed, or the neighbouring index of the same class, is another image
    assert not np.array_equal(shapes.render(indices[0], 32, seed=1), first[0])
    assert not np.array_equal(shapes.render(indices[0] + shapes.NUM_CLASSES, 32), first[0])


def test_classes_are_exactly_balanced_over_any_ten_consecutive_indices():
    for split in ("train", "val"):
        source = shapes.ShapesSource(16, split=split)
        start = int(RNG.integers(0, len(source) - 1000))
        labels = [int(source[i]["label"]) for i in range(start, start + 1000)]
        assert np.bincount(labels, minlength=shapes.NUM_CLASSES).tolist() == [100] * shapes.NUM_CLASSES


def test_train_and_held_out_ranges_are_disjoint_and_the_held_out_range_is_fixed():
    train, val = shapes.ShapesSource(split="train"), shapes.ShapesSource(split="val")
    assert (val.start, val.stop) == (0, shapes.HELD_OUT_SIZE) == (shapes.ShapesSource(split="test").start,
                                                                    shapes.ShapesSource(split="test").stop)
    assert train.start >= val.stop and train.stop <= shapes.MAX_INDEX
    assert len(train) == shapes.DEFAULT_TRAIN_SIZE > 2 ** 30
    small = shapes.ShapesSource(split="train", train_size=50)
    assert len(small) == 50 and small.start == train.start
    np.testing.assert_array_equal(train[3]["image"], shapes.render(train.start + 3, 32))
    with pytest.raises(IndexError):
        small[50]
    with pytest.raises(ValueError, match="split"):
        shapes.ShapesSource(split="all")


def test_edges_are_anti_aliased_and_colours_contrast():
    for index in RNG.integers(0, shapes.MAX_INDEX, size=20):
        image = shapes.render(index, 32).astype(np.int64)
        colours, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
        background, foreground = colours[np.argsort(counts)[::-1][:2]]
        assert np.linalg.norm(background - foreground) >= shapes.MIN_CONTRAST - 1
        # pixels that are neither colour: partial coverage along the edges (a binary rendering has none)
        pure = (image == background).all(-1) | (image == foreground).all(-1)
        assert (~pure).sum() >= 4, f"index {index}: no intermediate edge pixels"


def test_build_source_and_pipeline_read_shapes():
    source, num_classes = build_source({"name": "shapes", "image_size": 16, "split": "val"})
    assert num_classes == 10 and len(source) == shapes.HELD_OUT_SIZE
    batch = next(iter(make_dataset(build_source({"name": "shapes", "image_size": 16})[0], image_size=16,
                                   global_batch_size=8, seed=0, shard_index=0, shard_count=1, num_threads=1)))
    assert batch["image"].shape == (8, 16, 16, 3) and batch["label"].shape == (8,)
    assert batch["image"].dtype == np.uint8 and batch["image"].min() < batch["image"].max()


def test_shapes_classifier_recognises_held_out_shapes_and_rejects_noise():
    from var_jax.eval.shapes_classifier import shape_features, shapes_classifier
    classifier = shapes_classifier(32)
    assert classifier.held_out_accuracy >= 0.95
    start = int(RNG.integers(0, shapes.HELD_OUT_SIZE - 100))
    images = np.stack([shapes.render(i, 32) for i in range(start, start + 100)])
    labels = np.array([shapes.label_of(i) for i in range(start, start + 100)])
    score = classifier.score(images, labels)
    assert score["accuracy"] >= 0.95 and score["in_distribution"] >= 0.8
    assert sum(score["predicted_counts"]) == 100
    # the same images in [-1, 1], rotated by 90°: same features up to sampling, same classes
    rotated = np.rot90(images, axes=(1, 2)).astype(np.float32) / 127.5 - 1.0
    assert classifier.accuracy(rotated, labels) >= 0.95
    assert shape_features(images).shape == (100, 84)
    noise = RNG.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    assert classifier.score(noise, np.zeros(40, int))["in_distribution"] <= 0.1


@pytest.mark.parametrize("arg", ["", "latent=4", "image_size=64,latent=8"])
def test_shapes_configs_agree_and_the_tokenizer_shape_is_valid(arg):
    from conftest import repo_config
    from var_jax.tokenizer.config import TokenizerConfig
    tok, var = repo_config(f"shapes_tokenizer.py:{arg}"), repo_config(f"shapes_var.py:{arg}")
    assert tok.data.name == var.data.name == "shapes" and tok.data.image_size == var.data.image_size
    assert tuple(tok.patch_nums) == tuple(var.patch_nums)
    TokenizerConfig(**tok.tokenizer.to_dict(), patch_nums=tuple(tok.patch_nums)).validate(image_size=tok.data.image_size)
    assert (var.model.width, var.model.heads) == (-1, -1)     # derived from depth: 64·depth, depth
