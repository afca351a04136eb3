"""The README's bitwise-token commands on the embedded digits at tiny step counts: a BSQ tokenizer and a bitwise VAR
with self-correction train (held-out evaluation included), `sample` draws from them and `reconstruct` runs."""
import json

import numpy as np

from conftest import REPO_ROOT
from var_jax.cli import main

BITS = 12
QUICK = ["--config.log_every=1", "--config.sample_every=0", "--config.checkpoint_every=2"]


def test_digits_bsq_tokenizer_bitwise_var_sample_and_reconstruct(tmp_path):
    tok, var = tmp_path / "tok", tmp_path / "var"
    # the digits' own 8 px with downsampling 2 (the 4x4 latent of patch_nums (1,2,3,4)): the least to compile
    assert main(["train", "--config", f"{REPO_ROOT}/configs/digits_tokenizer.py:steps=2,batch=8,image_size=8",
                 "--workdir", str(tok), "--config.tokenizer.ch_mult=(1,1)",
                 "--config.tokenizer.quantizer=bsq", f"--config.tokenizer.bits={BITS}",
                 "--config.loss.vq_weight=4", "--config.eval_every=0", *QUICK]) == 0
    config = json.loads((tok / "model" / "config.json").read_text())["tokenizer"]
    assert (config["quantizer"], config["bits"], config["vocab_size"], config["z_channels"]) == ("bsq", BITS, 4096, 12)
    record = [json.loads(line) for line in (tok / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"code_usage", "bit_ones_0", f"bit_ones_{BITS - 1}"} <= set(record) and np.isfinite(record["vq"])

    assert main(["train", "--config", f"{REPO_ROOT}/configs/digits_var.py:depth=1,width=32,batch=8,steps=2,image_size=8",
                 "--workdir", str(var), f"--config.tokenizer_checkpoint={tok}", "--config.model.head=bitwise",
                 "--config.loss.bitwise_self_correction=0.1", "--config.eval_every=2", "--config.eval_batch_size=120",
                 *QUICK]) == 0
    record = [json.loads(line) for line in (var / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"Accm", "TokAccm", "val/loss", "val/acc", "val/token_acc"} <= set(record)
    assert 0 < record["val/loss"] < 1.0 and 0 <= record["val/token_acc"] <= record["val/acc"] <= 100   # per bit

    samples = tmp_path / "samples"
    assert main(["sample", "--checkpoint", str(var / "model"), "--num-per-class", "1", "--batch-size", "10",
                 "--out", str(samples)]) == 0
    with np.load(samples / "samples.npz") as data:
        assert data["arr_0"].shape == (10, 8, 8, 3) and list(data["arr_1"]) == list(range(10))
    assert main(["reconstruct", "--checkpoint", str(tok / "model"), "--images", str(samples / "samples.npz"),
                 "--out", str(tmp_path / "rec.npz")]) == 0
    with np.load(tmp_path / "rec.npz") as data:
        assert data["arr_0"].shape == (10, 8, 8, 3) and data["tokens_3"].shape == (10, 16)
        assert 0 <= data["tokens_3"].min() and data["tokens_3"].max() < 2 ** BITS
