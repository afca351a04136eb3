"""Reference state_dict <-> VQVAE conversion, the model directory, and the convert / reconstruct commands."""
import argparse
import json
import shutil

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import fixture_path, load_fixture, run_with_devices, state_dict
from var_jax.checkpoints import CheckpointError, load_model_dir, read_state_dict, save_model_dir
from var_jax.cli.common import CommandError
from var_jax.cli import convert as convert_cmd
from var_jax.cli import reconstruct as reconstruct_cmd
from var_jax.tokenizer.config import TokenizerConfig
from var_jax.tokenizer.convert import (StateDictMismatch, infer_config, reference_shapes, vqvae_from_state_dict,
                                       vqvae_to_state_dict)
from var_jax.tokenizer.quantizer import f_to_tokens
from var_jax.tokenizer.vqvae import VQVAE


def tiny_vae():
    arrays, config = load_fixture("tiny")
    return arrays, tuple(config["patch_nums"]), state_dict(arrays, "vae")


def assert_same_state_dict(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def recorded_tokens_hold(model, arrays):
    """The quantizer of `model`, on the recorded f, gives the recorded tokens."""
    f = np.transpose(arrays["vae_f"], (0, 2, 3, 1))
    tokens, _ = jax.jit(f_to_tokens, static_argnums=2)(model.quantizer_params(), f, model.cfg)
    for k, t in enumerate(tokens):
        np.testing.assert_array_equal(np.asarray(t), arrays[f"vae_idx_{k}"])


def command(module, argv):
    """Run one CLI command module as `python -m var_jax <command> argv` would."""
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


# ---- state_dict conversion ---------------------------------------------------------------------------------

def test_pth_round_trip(tmp_path):
    arrays, patch_nums, sd = tiny_vae()
    torch.save({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, tmp_path / "vae.pth")
    cfg, model = vqvae_from_state_dict(read_state_dict(tmp_path / "vae.pth"), patch_nums=patch_nums)
    assert (cfg.vocab_size, cfg.z_channels, cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.share_quant_resi,
            cfg.quant_conv_ks, cfg.attention_levels) == (64, 8, 32, (1, 1, 2, 2, 4), 2, 4, 3, (4,))
    assert_same_state_dict(vqvae_to_state_dict(model), sd)
    recorded_tokens_hold(model, arrays)


def test_wrapped_and_npz_state_dicts(tmp_path):
    _, patch_nums, sd = tiny_vae()
    tensors = {k: torch.from_numpy(v.copy()) for k, v in sd.items()}
    torch.save({"epoch": 3, "state_dict": tensors}, tmp_path / "wrapped.pth")
    assert_same_state_dict(read_state_dict(tmp_path / "wrapped.pth"), sd)
    torch.save({"trainer": {"vae_local": tensors, "var_wo_ddp": {}}, "args": {}}, tmp_path / "trainer.pth")
    assert_same_state_dict(read_state_dict(tmp_path / "trainer.pth", key="trainer.vae_local"), sd)
    with pytest.raises(CheckpointError, match="trainer"):
        read_state_dict(tmp_path / "trainer.pth")
    with pytest.raises(CheckpointError, match="no entry 'vae'"):
        read_state_dict(tmp_path / "trainer.pth", key="trainer.vae")
    assert_same_state_dict(read_state_dict(fixture_path("tiny"), key="vae"), sd)


def test_corrupt_or_unknown_files_give_clear_errors(tmp_path):
    (tmp_path / "bad.pth").write_bytes(np.random.default_rng().bytes(300))
    with pytest.raises(CheckpointError, match="bad.pth"):
        read_state_dict(tmp_path / "bad.pth")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="bad.npz"):
        read_state_dict(tmp_path / "bad.npz")
    (tmp_path / "weights.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unknown checkpoint type '.ckpt'"):
        read_state_dict(tmp_path / "weights.ckpt")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pth")


def test_partial_or_misshaped_state_dict_names_the_keys():
    _, patch_nums, sd = tiny_vae()
    broken = dict(sd)
    del broken["decoder.up.2.block.1.conv2.bias"]
    broken["encoder.mid.attn_1.qkv.weight"] = np.zeros((96, 128, 3, 3), np.float32)
    broken["quantize.extra"] = np.zeros(3, np.float32)
    with pytest.raises(StateDictMismatch) as err:
        vqvae_from_state_dict(broken, patch_nums=patch_nums)
    message = str(err.value)
    assert "decoder.up.2.block.1.conv2.bias" in message and "quantize.extra" in message
    assert "encoder.mid.attn_1.qkv.weight: expected (384, 128, 1, 1), got (96, 128, 3, 3)" in message
    with pytest.raises(StateDictMismatch, match="quantize.embedding.weight"):
        vqvae_from_state_dict({k: v for k, v in sd.items() if k != "quantize.embedding.weight"})


def test_released_tokenizer_shape_is_inferred():
    """vae_ch160v4096z32.pth: same key names as the fixtures (README), its shapes give the default config."""
    released = nnx.eval_shape(lambda: VQVAE(TokenizerConfig(), rngs=nnx.Rngs(0)))
    shapes = reference_shapes(released)
    _, _, tiny_sd = tiny_vae()
    assert sorted(shapes) == sorted(k for k in tiny_sd if k != "quantize.ema_vocab_hit_SV")
    assert shapes["quantize.embedding.weight"] == (4096, 32)
    assert shapes["encoder.down.4.block.0.conv1.weight"] == (640, 320, 3, 3)
    assert shapes["quant_conv.weight"] == (32, 32, 3, 3)
    zeros = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}   # no memory
    assert infer_config(zeros) == TokenizerConfig()
    assert infer_config(zeros, patch_nums=(1, 2, 3, 4, 6, 9, 13, 18, 24, 32)).image_size == 512


@pytest.mark.parametrize("share,quant_resi,phi_key", [
    (1, 0.5, "quantize.quant_resi.qresi.weight"), (0, 0.5, "quantize.quant_resi.2.weight"),
    (3, 0.5, "quantize.quant_resi.qresi_ls.2.weight"), (4, 0.0, None)])
def test_phi_sharing_modes_convert_both_ways(share, quant_resi, phi_key):
    cfg = TokenizerConfig(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                          attn_levels=(0, 1), patch_nums=(1, 2, 3), share_quant_resi=share, quant_resi=quant_resi)
    shapes = reference_shapes(nnx.eval_shape(lambda: VQVAE(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng()
    sd = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    assert (phi_key in sd) if phi_key else not any("quant_resi" in k for k in sd)
    got_cfg, model = vqvae_from_state_dict(sd, patch_nums=cfg.patch_nums, quant_resi=quant_resi)
    assert got_cfg == cfg
    back = vqvae_to_state_dict(model)
    assert back.pop("quantize.ema_vocab_hit_SV").shape == (3, 16)
    assert_same_state_dict(back, sd)


# ---- model directories --------------------------------------------------------------------------------------

def test_model_dir_round_trip_and_errors(tmp_path):
    arrays, patch_nums, sd = tiny_vae()
    cfg, model = vqvae_from_state_dict(sd, patch_nums=patch_nums)
    out = save_model_dir(tmp_path / "m", tokenizer=(cfg, model))
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "var-jax-model" and config["version"] == 1 and config["var"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]       # no temporary left behind
    bundle = load_model_dir(out)
    assert bundle.tokenizer_config == cfg and bundle.var is None
    assert_same_state_dict(vqvae_to_state_dict(bundle.tokenizer), sd)

    with pytest.raises(CheckpointError, match="already exists"):
        save_model_dir(out, tokenizer=(cfg, model))
    save_model_dir(out, tokenizer=(cfg, model), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]

    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_dir(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model_dir(tmp_path / "empty")
    for edit, message in [({"format": "other"}, "format"), ({"version": 9}, "version 9"),
                          ({"tokenizer": {**cfg.to_dict(), "vocab_size": 32}}, "does not match.*codebook"),
                          ({"tokenizer": {**cfg.to_dict(), "ch": 40}}, "invalid model config.*ch")]:
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(out, bad)
        (bad / "config.json").write_text(json.dumps({**config, **edit}))
        with pytest.raises(CheckpointError, match=message):
            load_model_dir(bad)


# ---- the commands ---------------------------------------------------------------------------------------------

def test_convert_and_reconstruct_commands(tmp_path, capsys):
    arrays, patch_nums, _ = tiny_vae()
    fixture = str(fixture_path("tiny"))
    # --var given, no --patch-nums: the scale schedule comes from the VAR checkpoint
    command(convert_cmd, ["--vae", fixture, "--vae-key", "vae", "--var", fixture, "--var-key", "var",
                          "--out", str(tmp_path / "model")])
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert tuple(config["tokenizer"]["patch_nums"]) == patch_nums and config["var"]["depth"] == 2
    assert "tokenizer: 4,375,003 parameters" in capsys.readouterr().out   # n_params_vae of the fixture

    rng = np.random.default_rng()
    recorded = np.clip(np.rint((arrays["vae_img"].transpose(0, 2, 3, 1) + 1) * 127.5), 0, 255).astype(np.uint8)
    images = np.concatenate([recorded, rng.integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)])
    np.savez(tmp_path / "in.npz", images)
    command(reconstruct_cmd, ["--checkpoint", str(tmp_path / "model"), "--images", str(tmp_path / "in.npz"),
                              "--out", str(tmp_path / "rec.npz"), "--batch-size", "2"])
    assert "PSNR" in capsys.readouterr().out
    with np.load(tmp_path / "rec.npz") as rec:
        assert sorted(rec.files) == ["arr_0"] + [f"tokens_{k}" for k in range(len(patch_nums))]
        assert rec["arr_0"].dtype == np.uint8 and rec["arr_0"].shape == images.shape
        for k, pn in enumerate(patch_nums):
            assert rec[f"tokens_{k}"].dtype == np.int32 and rec[f"tokens_{k}"].shape == (5, pn * pn)
            # uint8 rounding of the inputs moves f by ~1e-3: the recorded tokens are expected, not guaranteed
            assert np.mean(rec[f"tokens_{k}"][:2] == arrays[f"vae_idx_{k}"]) > 0.8
        shutil.copy(tmp_path / "rec.npz", tmp_path / "rec_single_device.npz")

    # a folder of images of another size: resized and center-cropped to 64 px
    folder = tmp_path / "folder"
    folder.mkdir()
    from PIL import Image
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, size=(80, 96, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    command(reconstruct_cmd, ["--checkpoint", str(tmp_path / "model"), "--images", str(folder),
                              "--out", str(tmp_path / "rec_folder.npz"), "--batch-size", "2"])
    with np.load(tmp_path / "rec_folder.npz") as rec:
        assert rec["arr_0"].shape == (2, 64, 64, 3)

    np.savez(tmp_path / "wrong.npz", images[:, :32])
    with pytest.raises(CommandError, match=r"uint8 \(N, 64, 64, 3\).*\(5, 32, 64, 3\)"):
        command(reconstruct_cmd, ["--checkpoint", str(tmp_path / "model"), "--images", str(tmp_path / "wrong.npz"),
                                  "--out", str(tmp_path / "x.npz")])
    with pytest.raises(CommandError, match="already exists"):
        command(convert_cmd, ["--vae", fixture, "--vae-key", "vae", "--out", str(tmp_path / "model")])

    # sharded: restored onto a (data 4, tensor 2) mesh, batch split over 4 devices; same outputs
    code = f"""
import argparse, jax, numpy as np
import var_jax
from var_jax.checkpoints import load_model_dir
from var_jax.sharding import make_mesh
from var_jax.cli import reconstruct
bundle = load_model_dir({str(tmp_path / "model")!r}, mesh=make_mesh((4, 1, 2)))
sharding = bundle.tokenizer.codebook[...].sharding
print("codebook devices", len(sharding.device_set), sharding.spec == jax.sharding.PartitionSpec("tensor", None))
parser = argparse.ArgumentParser(); reconstruct.add_arguments(parser)
reconstruct.run(parser.parse_args(["--checkpoint", {str(tmp_path / "model")!r}, "--images",
    {str(tmp_path / "in.npz")!r}, "--out", {str(tmp_path / "rec_sharded.npz")!r}, "--batch-size", "4",
    "--mesh", "4,1,2"]))
"""
    out = run_with_devices(code, 8)
    assert "codebook devices 8 True" in out
    with np.load(tmp_path / "rec_single_device.npz") as a, np.load(tmp_path / "rec_sharded.npz") as b:
        for k in a.files:
            if k.startswith("tokens_"):
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1
