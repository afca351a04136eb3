"""Reference VAR state_dict -> var-jax VAR: logits and loss equal the recorded PyTorch outputs; config inference;
round trip back to the reference names; clear errors for bad checkpoints."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import FIXTURE_NAMES, load_fixture, state_dict
from var_jax.transformer import PATCH_NUMS_256
from var_jax.transformer.convert import config_from_state_dict, var_from_state_dict, var_to_state_dict


@nnx.jit
def forward(model, labels, teacher):
    return model(labels, teacher)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_converted_logits_and_loss_match_reference(name):
    arrays, config = load_fixture(name)
    cfg, model = var_from_state_dict(state_dict(arrays, "var"), heads=config["num_heads"])
    teacher = arrays["var_x_BLCv_wo_first_l"]
    scale = max(config["diag_logits_absmax"], np.abs(arrays["var_logits_BLV"]).max())
    for labels, ref in ((arrays["var_label_B"], arrays["var_logits_BLV"]),
                        (arrays["var_label_B_null"], arrays["var_logits_BLV_null"])):
        logits = np.asarray(forward(model, labels, teacher))
        assert logits.shape == ref.shape and logits.dtype == np.float32
        np.testing.assert_allclose(logits, ref, atol=1e-5 * max(scale, 1.0), rtol=0)
    logits = forward(model, arrays["var_label_B"], teacher)
    # reference loss: CE per token (no smoothing), uniform 1/L over tokens, mean over the batch
    per_token = -jnp.take_along_axis(jax.nn.log_softmax(logits), arrays["var_gt_BL"][..., None], -1)[..., 0]
    np.testing.assert_allclose(float(per_token.mean()), float(arrays["var_loss"]), rtol=1e-6)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_config_inference(name):
    arrays, config = load_fixture(name)
    cfg = config_from_state_dict(state_dict(arrays, "var"), heads=config["num_heads"])
    assert (cfg.depth, cfg.width, cfg.heads, cfg.num_classes) == (
        config["depth"], config["embed_dim"], config["num_heads"], config["num_classes"])
    assert (cfg.vocab_size, cfg.z_channels, cfg.patch_nums, cfg.seq_len) == (
        config["vocab_size"], config["z_channels"], tuple(config["patch_nums"]), config["L"])
    assert (cfg.shared_aln, cfg.attn_l2_norm, cfg.mlp_ratio) == (
        config["shared_aln"], config["attn_l2_norm"], config["mlp_ratio"])


@pytest.mark.parametrize("name", ["tiny", "small_shared"])
def test_round_trip_to_reference_names(name):
    arrays, config = load_fixture(name)
    sd = state_dict(arrays, "var")
    _, model = var_from_state_dict(sd, heads=config["num_heads"])
    back = var_to_state_dict(model)
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert back[key].shape == value.shape and back[key].dtype == value.dtype, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_accepts_torch_tensors_and_infers_patch_nums():
    torch = pytest.importorskip("torch")
    arrays, _ = load_fixture("tiny")
    sd = {k: torch.from_numpy(v) for k, v in state_dict(arrays, "var").items()}
    cfg, model = var_from_state_dict(sd)   # heads from scale_mul_1H11, patch_nums from lvl_1L
    assert cfg.heads == 2 and cfg.patch_nums == (1, 2, 3, 4)
    np.testing.assert_array_equal(model.head.kernel[...], arrays["var/head.weight"].T)


def test_patch_nums_sources_and_heads_rules():
    arrays, _ = load_fixture("small_shared")
    sd = state_dict(arrays, "var")
    with pytest.raises(ValueError, match="heads="):
        config_from_state_dict(sd)                       # width 96, no scale_mul: heads not inferable
    with pytest.raises(ValueError, match="L=155"):
        config_from_state_dict(sd, heads=3, patch_nums=(1, 2, 3, 4))

    class TokenizerConfig:                               # duck-typed: patch_nums, vocab_size, z_channels
        patch_nums, vocab_size, z_channels = (1, 2, 3, 4, 5, 6, 8), 128, 16
    assert config_from_state_dict(sd, TokenizerConfig(), heads=3).patch_nums == (1, 2, 3, 4, 5, 6, 8)
    TokenizerConfig.vocab_size = 4096
    with pytest.raises(ValueError, match="vocab_size"):
        config_from_state_dict(sd, TokenizerConfig(), heads=3)
    tiny = state_dict(load_fixture("tiny")[0], "var")
    with pytest.raises(ValueError, match="disagrees"):
        config_from_state_dict(tiny, heads=4)
    without_buffers = {k: v for k, v in tiny.items() if k != "lvl_1L"}
    with pytest.raises(ValueError, match="patch_nums"):
        config_from_state_dict(without_buffers)          # L=30 is not a released model's
    # the released 256 px shape is known from L alone
    real = dict(without_buffers, pos_1LC=np.zeros((1, 680, 64), np.float32))
    assert config_from_state_dict(real).patch_nums == PATCH_NUMS_256


@pytest.mark.parametrize("edit, error, match", [
    (lambda sd: sd.pop("head.weight"), KeyError, "head.weight"),
    (lambda sd: sd.pop("blocks.1.ffn.fc2.bias"), KeyError, "blocks.1.ffn.fc2.bias"),
    (lambda sd: sd.update({"blocks.0.attn.proj.weight": np.zeros((64, 65), np.float32)}), ValueError,
     "blocks.0.attn.proj.weight"),
    (lambda sd: sd.update({"blocks.0.attn.zero_k_bias": np.ones(64, np.float32)}), ValueError, "zero_k_bias"),
    (lambda sd: sd.update({"head.extra": np.ones(3, np.float32)}), KeyError, "head.extra"),
    (lambda sd: sd.update({"blocks.3.attn.q_bias": np.ones(64, np.float32)}), KeyError, "blocks must be numbered"),
])
def test_bad_checkpoints_name_the_key(edit, error, match):
    sd = dict(state_dict(load_fixture("tiny")[0], "var"))
    edit(sd)
    with pytest.raises(error, match=match.replace(".", r"\.")):
        var_from_state_dict(sd)
