"""The quantizer's resampling operators against PyTorch's recorded outputs and float64 references."""
import numpy as np
import pytest

from conftest import load_fixture
from var_jax.tokenizer.resize import area_matrix, area_resize, bicubic_resize


def nhwc(x):
    return np.transpose(x, (0, 2, 3, 1))


def area_loop(x, out_h, out_w):
    """Adaptive average pooling written out cell by cell, float64 (NHWC)."""
    b, in_h, in_w, c = x.shape
    out = np.zeros((b, out_h, out_w, c), np.float64)
    for i in range(out_h):
        h0, h1 = (i * in_h) // out_h, -((-(i + 1) * in_h) // out_h)
        for j in range(out_w):
            w0, w1 = (j * in_w) // out_w, -((-(j + 1) * in_w) // out_w)
            out[:, i, j] = x[:, h0:h1, w0:w1].astype(np.float64).mean(axis=(1, 2))
    return out


@pytest.mark.parametrize("name", ["tiny", "small_shared"])
def test_ops_match_recorded_pytorch(name):
    arrays, _ = load_fixture(name)
    x = nhwc(arrays["op_area_in"])
    checked = 0
    for key in arrays:
        if key.startswith("op_area_out_"):
            pn = int(key.rsplit("_", 1)[1])
            np.testing.assert_allclose(np.asarray(area_resize(x, pn)), nhwc(arrays[key]), atol=1e-6, rtol=0)
            checked += 1
        elif key.startswith("op_bicubic_in_"):
            pn = key.rsplit("_", 1)[1]
            want = nhwc(arrays[f"op_bicubic_out_{pn}"])
            got = np.asarray(bicubic_resize(nhwc(arrays[key]), want.shape[1]))
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
            checked += 1
    assert checked >= 6


def test_area_matrix_equals_direct_loop_on_non_integer_ratios():
    rng = np.random.default_rng()
    for in_size, out_size in [(16, 13), (13, 5), (10, 3), (32, 24), (7, 7), (5, 9), (1, 4)]:
        x = rng.normal(size=(2, in_size, in_size + 1, 3))
        want = area_loop(x, out_size, out_size + 2)
        rows, cols = area_matrix(in_size, out_size), area_matrix(in_size + 1, out_size + 2)
        got64 = np.einsum("oh,pw,bhwc->bopc", rows, cols, x)
        np.testing.assert_allclose(got64, want, atol=1e-12, rtol=0)
        got32 = np.asarray(area_resize(x.astype(np.float32), (out_size, out_size + 2)))
        np.testing.assert_allclose(got32, want, atol=1e-6, rtol=0)


def test_area_matrix_rows_are_averages():
    m = area_matrix(16, 13)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-15)
    # 16 -> 13: windows overlap (cell 0 covers [0, 2), cell 1 covers [1, 3))
    assert np.count_nonzero(m[0]) == 2 and np.count_nonzero(m[1]) == 2 and m[1, 1] == 0.5


def test_bicubic_same_size_is_identity_and_bad_rank_is_rejected():
    x = np.random.default_rng().normal(size=(1, 4, 4, 2)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(bicubic_resize(x, 4)), x)
    with pytest.raises(ValueError, match="NHWC"):
        area_resize(x[0], 2)
