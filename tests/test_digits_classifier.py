"""The digits classifier that scores generated samples: accurate on held-out real digits, chance on garbage."""
import numpy as np
import pytest

from var_jax.data import digits
from var_jax.eval.digits_classifier import digits_classifier, render_like_pipeline, to_digit_features

RESOLUTION = 32


@pytest.fixture(scope="module")
def classifier():
    return digits_classifier(RESOLUTION)


def test_held_out_real_digits_are_recognised(classifier):
    assert classifier.held_out_accuracy >= 0.9
    # independently of the number it reports: the held-out split as the training pipeline crops it
    images, labels = digits.native_digits("test")
    rendered = render_like_pipeline(images, RESOLUTION, train=True, rng=np.random.default_rng())
    score = classifier.score(rendered, labels)
    assert score["accuracy"] >= 0.9
    assert score["in_distribution"] >= 0.75
    assert min(score["predicted_counts"]) >= 25   # ~36 per class


def test_uint8_samples_score_like_float_samples(classifier):
    images, labels = digits.native_digits("test")
    floats = render_like_pipeline(images[:50], RESOLUTION, train=False)
    uint8 = np.clip(np.rint((floats + 1) * 127.5), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(classifier.predict(uint8), classifier.predict(floats))
    assert classifier.accuracy(uint8, labels[:50]) >= 0.9


def test_noise_and_constant_images_score_near_chance(classifier):
    rng = np.random.default_rng()
    labels = np.tile(np.arange(10), 20)   # balanced requests: a constant guess scores exactly 0.1
    noise = rng.uniform(-1, 1, (200, RESOLUTION, RESOLUTION, 3)).astype(np.float32)
    constant = np.repeat(rng.uniform(-1, 1, (200, 1, 1, 1)), RESOLUTION, 1).repeat(RESOLUTION, 2).repeat(3, 3)
    for garbage in (noise, constant.astype(np.float32)):
        score = classifier.score(garbage, labels)
        assert score["accuracy"] <= 0.2
        assert score["in_distribution"] <= 0.05


def test_features_are_block_means_on_the_0_16_scale():
    # a 64 px image made of constant 8×8 blocks comes back as exactly those 8×8 values (float64 reference)
    rng = np.random.default_rng()
    blocks = rng.integers(0, 256, (3, 8, 8)).astype(np.uint8)
    images = np.repeat(np.repeat(blocks, 8, axis=1), 8, axis=2)[..., None].repeat(3, axis=3)
    expected = blocks.astype(np.float64).reshape(3, 64) / 255.0 * 16.0
    np.testing.assert_allclose(to_digit_features(images), expected, atol=1e-4)
    # area averaging of a non-constant image: 4×4 block means at 32 px
    image = rng.uniform(-1, 1, (1, 32, 32, 1))
    expected = ((image[0, :, :, 0] + 1) / 2).reshape(8, 4, 8, 4).mean(axis=(1, 3)).reshape(1, 64) * 16
    np.testing.assert_allclose(to_digit_features(image.astype(np.float32)), expected, atol=1e-4)


def test_bad_inputs_fail_clearly(classifier):
    with pytest.raises(ValueError, match="NHWC"):
        to_digit_features(np.zeros((4, 32, 32)))
    with pytest.raises(ValueError, match="NHWC"):
        to_digit_features(np.zeros((4, 4, 4, 3)))
    with pytest.raises(ValueError, match="labels"):
        classifier.score(np.zeros((4, 32, 32, 3), np.float32), np.zeros(3))
