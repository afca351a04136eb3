"""Zero-shot editing: edit masks (against PyTorch's bilinear resize), the editing API and the `edit` command."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import load_fixture
from test_sampler import fixture_bundle, run_command

from var_jax.sample.edit import edit, source_tokens
from var_jax.sample.masks import bilinear_resize, box_keep_mask, image_keep_mask, scale_keep_masks

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def reference_keep_masks(keep, patch_nums):
    """The notebook's `replace_embedding` mask: bilinear (align_corners=False) to pn×pn, > 0.5, all-ones if pn² ≤ 3."""
    out = []
    for pn in patch_nums:
        m = F.interpolate(torch.tensor(keep, dtype=torch.float32)[None, None], size=(pn, pn), mode="bilinear",
                          align_corners=False).gt(0.5)[0, 0].numpy()
        out.append(np.ones_like(m) if pn * pn <= 3 else m)
    return out


def test_scale_masks_match_pytorch_bilinear_threshold():
    rng = np.random.default_rng()
    for side, patch_nums in ((16, PATCH_NUMS_256), (32, (1, 2, 3, 4, 6, 9, 13, 18, 24, 32))):
        for trial in range(12):
            if trial % 2:
                keep = (rng.random((side, side)) > 0.5).astype(np.float32)
            else:
                y0, y1 = np.sort(rng.uniform(0, 1, 2))
                x0, x1 = np.sort(rng.uniform(0, 1, 2))
                keep = box_keep_mask(side, (y0, x0, y1, x1), "inpaint" if trial % 4 else "outpaint")
            for pn, mine, ref in zip(patch_nums, scale_keep_masks(keep, patch_nums),
                                     reference_keep_masks(keep, patch_nums)):
                np.testing.assert_array_equal(mine, ref, err_msg=f"{side} -> {pn}")
        # the values themselves agree to float32 rounding
        t = F.interpolate(torch.tensor(keep)[None, None], size=(13, 13), mode="bilinear", align_corners=False)
        np.testing.assert_allclose(bilinear_resize(keep, 13), t[0, 0].numpy(), atol=2e-7)


def test_box_and_image_masks_mark_the_region_to_regenerate():
    inpaint = box_keep_mask(16, (0.25, 0.5, 0.75, 1.0), "inpaint")
    assert inpaint[4:12, 8:16].sum() == 0 and inpaint.sum() == 256 - 64     # the box is regenerated
    np.testing.assert_array_equal(box_keep_mask(16, (0.25, 0.5, 0.75, 1.0), "outpaint"), 1 - inpaint)
    # the reference rounds with Python's round (half to even): 0.1·16 = 1.6 -> 2, 0.8·16 = 12.8 -> 13
    assert box_keep_mask(16, (0.1, 0.1, 0.8, 0.8), "outpaint").sum() == 11 * 11
    painted = np.zeros((64, 64), np.float32)
    painted[16:48, 32:64] = 1.0                                                  # white = marked, 4 px per cell
    np.testing.assert_array_equal(image_keep_mask(painted, 16, "inpaint"), inpaint)
    with pytest.raises(ValueError, match="box"):
        box_keep_mask(16, (0.5, 0.1, 0.2, 0.9), "inpaint")
    with pytest.raises(ValueError, match="edit mode"):
        box_keep_mask(16, (0.1, 0.1, 0.2, 0.2), "paint")
    with pytest.raises(ValueError, match="multiples of 16"):
        image_keep_mask(np.zeros((30, 30)), 16, "inpaint")


def source_image(name):
    arrays, _ = load_fixture(name)
    return np.clip(np.rint((arrays["vae_img"][0].transpose(1, 2, 0) + 1) * 127.5), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("mode", ["inpaint", "outpaint"])
def test_edit_keeps_the_source_tokens_outside_the_edited_region(mode):
    bundle = fixture_bundle("tiny_stress")
    image = source_image("tiny_stress")
    out = edit(bundle, image, box=(0.25, 0.0, 1.0, 0.75), mode=mode, label=3, seed=1)
    src = source_tokens(bundle.tokenizer, image[None])
    regenerated_differs = False
    for k, (tokens, source, keep) in enumerate(zip(out["tokens"], src, out["keep"])):
        np.testing.assert_array_equal(out["source_tokens"][k], source)
        keep = keep.reshape(-1)
        np.testing.assert_array_equal(tokens[0][keep], source[0][keep], err_msg=f"scale {k}")
        regenerated_differs |= bool(np.any(tokens[0][~keep] != source[0][~keep]))
    assert out["keep"][0].all() and not out["keep"][-1].all()
    assert regenerated_differs                     # the region was really regenerated
    assert out["image"].shape == image.shape and out["image"].dtype == np.uint8


def test_edit_command_writes_the_edited_image(tmp_path, capsys):
    from PIL import Image

    from var_jax.checkpoints import save_model_dir
    from var_jax.cli.common import CommandError

    bundle = fixture_bundle("tiny")
    model_dir = save_model_dir(tmp_path / "model", tokenizer=(bundle.tokenizer_config, bundle.tokenizer),
                               var=(bundle.var_config, bundle.var))
    image = source_image("tiny")
    Image.fromarray(image).save(tmp_path / "in.png")
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    run_command("edit", ["--checkpoint", str(model_dir), "--image", str(tmp_path / "in.png"), "--mask",
                         str(tmp_path / "mask.png"), "--mode", "inpaint", "--out", str(tmp_path / "out.png")])
    assert "tokens regenerated" in capsys.readouterr().out
    edited = np.asarray(Image.open(tmp_path / "out.png"))
    assert edited.shape == image.shape and edited.dtype == np.uint8
    with pytest.raises(CommandError, match="--box must be y0,x0,y1,x1"):
        run_command("edit", ["--checkpoint", str(model_dir), "--image", str(tmp_path / "in.png"), "--box",
                             "0.1,0.2", "--out", str(tmp_path / "bad.png")])
