"""Bad input to the commands: one line naming the problem (exit status 2), found before a model is loaded where
possible, and no output file left behind. Also damaged model directories (and no stray tracebacks from the reads
a failed restore left in flight), files `convert` cannot read, image sets `eval` must not compare, the model
fingerprint that ties a resumed `sample` run to its checkpoint, streaming reconstruction and multi-host sampling."""
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from var_jax.checkpoints import CheckpointError, load_model_dir, model_fingerprint, read_model_config
from var_jax.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny tokenizer + VAR model directory (the 'tiny' reference fixture, 64 px, 10 classes)."""
    from test_sampler import fixture_bundle

    from var_jax.checkpoints import save_model_dir
    bundle = fixture_bundle("tiny")
    return save_model_dir(tmp_path_factory.mktemp("models") / "tiny",
                          tokenizer=(bundle.tokenizer_config, bundle.tokenizer), var=(bundle.var_config, bundle.var))


def fails(capsys, argv, message):
    """main(argv) exits with status 2 and one `var-jax CMD: error: ...` line containing `message`."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(f"var-jax {argv[0]}: error:") and message in err[-1], err


def copy_model(model_dir, tmp_path, name="copy"):
    return shutil.copytree(model_dir, tmp_path / name)


# ---- sample / edit options -------------------------------------------------------------------------------------

BAD_SAMPLING = [(["--cfg", "nan"], "--cfg must be a finite number"), (["--cfg", "inf"], "--cfg must be a finite"),
                (["--top-p", "nan"], "--top-p must be in [0, 1]"), (["--top-p", "1.5"], "--top-p must be in [0, 1]"),
                (["--top-k", "-1"], "--top-k must be >= 0"), (["--seed", "-1"], "--seed must be in 0..4294967295"),
                (["--seed", str(2 ** 32)], "--seed must be in 0..4294967295")]


@pytest.mark.parametrize("extra, message", BAD_SAMPLING)
def test_sample_refuses_bad_sampling_options(model_dir, tmp_path, capsys, extra, message):
    fails(capsys, ["sample", "--checkpoint", str(model_dir), "--out", str(tmp_path / "out"), *extra], message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", BAD_SAMPLING[::2])
def test_edit_refuses_bad_sampling_options(model_dir, tmp_path, capsys, extra, message):
    fails(capsys, ["edit", "--checkpoint", str(model_dir), "--image", "x.png", "--box", "0,0,1,1",
                   "--out", str(tmp_path / "e.png"), *extra], message)
    assert not (tmp_path / "e.png").exists()


def test_edit_refuses_an_unwritable_out_before_loading(model_dir, tmp_path, capsys):
    argv = ["edit", "--checkpoint", str(model_dir), "--image", "missing.png", "--box", "0,0,1,1", "--out"]
    fails(capsys, argv + [str(tmp_path / "e.xyz")], "cannot write images with extension '.xyz'")
    (tmp_path / "dir.png").mkdir()
    fails(capsys, argv + [str(tmp_path / "dir.png")], "is a directory")
    fails(capsys, argv + [str(tmp_path / "e.png"), "--class", "10"], "--class 10 out of range")
    # the input image is read before the model: a missing one is named
    fails(capsys, argv + [str(tmp_path / "e.png")], "--image missing.png: cannot read")
    assert sorted(os.listdir(tmp_path)) == ["dir.png"]


def test_sample_refuses_an_out_that_is_a_file(model_dir, tmp_path, capsys):
    (tmp_path / "out.npz").write_bytes(b"keep")
    fails(capsys, ["sample", "--checkpoint", str(model_dir), "--out", str(tmp_path / "out.npz")],
          "is an existing file")
    assert (tmp_path / "out.npz").read_bytes() == b"keep"


# ---- model directories -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("vocab_size", 128), ("z_channels", 16), ("patch_nums", [1, 2, 4])])
def test_tokenizer_and_transformer_must_agree(model_dir, tmp_path, capsys, field, value):
    copy = copy_model(model_dir, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    mine = config["tokenizer"][field]
    config["var"][field] = value
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=re.escape(f"disagree on {field}: tokenizer {mine!r}, transformer {value!r}")):
        read_model_config(copy)
    fails(capsys, ["sample", "--checkpoint", str(copy), "--out", str(tmp_path / "out")], f"disagree on {field}")
    assert not (tmp_path / "out").exists()


def _largest_array_file(directory):
    files = [os.path.join(d, f) for d, _, names in os.walk(directory / "tokenizer" / "ocdbt.process_0")
             for f in names]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncate", "delete", "metadata"])
def test_damaged_model_directory_is_a_checkpoint_error(model_dir, tmp_path, capsys, damage):
    copy = copy_model(model_dir, tmp_path)
    if damage == "truncate":
        os.truncate(_largest_array_file(copy), 1000)
        message = "cannot read the tokenizer parameters"
    elif damage == "delete":
        os.remove(_largest_array_file(copy))
        message = "cannot read the tokenizer parameters"
    else:
        os.remove(copy / "tokenizer" / "_METADATA")
        message = "has no readable parameter metadata"
    with pytest.raises(CheckpointError, match=message) as info:
        load_model_dir(copy)
    assert str(copy) in str(info.value) and "TensorStore" not in str(info.value)
    np.savez(tmp_path / "in.npz", np.zeros((1, 64, 64, 3), np.uint8))
    fails(capsys, ["reconstruct", "--checkpoint", str(copy), "--images", str(tmp_path / "in.npz"),
                   "--out", str(tmp_path / "rec.npz")], message)
    assert not (tmp_path / "rec.npz").exists()


def _late_read_hits_a_closed_loop(drain: bool) -> bool:
    """Orbax's restore in miniature: one read fails at once while another is still in flight in a thread that
    posts its result back to the loop (as tensorstore does), and the loop is closed when the error propagates
    (as orbax's asyncio_utils does). Whether the late result then found the loop closed."""
    from var_jax.orbax_loops import draining_event_loops
    closed, threads = [], []

    def complete_later(loop, future):
        time.sleep(random.uniform(0.1, 0.3))
        try:
            loop.call_soon_threadsafe(future.set_result, b"array bytes")
        except RuntimeError:       # 'Event loop is closed': what tensorstore then prints a traceback for
            closed.append(True)

    async def read():
        loop, future = asyncio.get_running_loop(), asyncio.get_running_loop().create_future()
        threads.append(threading.Thread(target=complete_later, args=(loop, future)))
        threads[-1].start()
        return await future

    async def truncated():
        raise ValueError("OUT_OF_RANGE: byte range not valid for value of size 1000")

    async def restore():
        return await asyncio.gather(read(), truncated(), read())

    with draining_event_loops() if drain else contextlib.nullcontext():
        loop = asyncio.new_event_loop()
        try:
            with pytest.raises(ValueError, match="OUT_OF_RANGE"):
                loop.run_until_complete(restore())
        finally:
            loop.close()
    for thread in threads:
        thread.join()
    return bool(closed)


# A checkpoint whose small arrays lost their chunk files while large ones are still being read: a restore fails
# with reads in flight (without draining_event_loops this printed "Event loop is closed" tracebacks in about
# three of five restores here). Run in a fresh process, so that what it prints when it exits is seen too.
_FAILED_RESTORES = """
import os, sys
import numpy as np, jax, orbax.checkpoint as ocp
from var_jax.orbax_loops import draining_event_loops
path, rng = sys.argv[1], np.random.default_rng(int(sys.argv[2]))
big = {f"big{i}": rng.standard_normal((1024, 2048), dtype=np.float32) for i in range(4)}
small = {f"small{i}": rng.standard_normal(100, dtype=np.float32) for i in range(8)}
with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)) as checkpointer:
    checkpointer.save(path, args=ocp.args.PyTreeSave({**big, **small}))
for name in small:
    for chunk in os.listdir(os.path.join(path, name)):
        if not chunk.startswith("."):
            os.remove(os.path.join(path, name, chunk))
target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in {**big, **small}.items()}
for attempt in range(4):
    try:
        with draining_event_loops(), ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)) as checkpointer:
            checkpointer.restore(path, args=ocp.args.PyTreeRestore(target))
    except Exception:
        print("failed", flush=True)
"""


def test_a_failed_restore_ends_its_reads_before_the_error_is_raised(model_dir, tmp_path):
    from conftest import REPO_ROOT
    assert _late_read_hits_a_closed_loop(drain=False)       # the hazard is real
    assert not _late_read_hits_a_closed_loop(drain=True)    # and draining removes it

    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _FAILED_RESTORES, str(tmp_path / "ckpt"),
                           str(random.randrange(2 ** 31))], env=env, capture_output=True, text=True, timeout=300)
    assert proc.stdout.split() == ["failed"] * 4, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]

    # the command on a truncated model directory: its one line, and nothing after it
    copy = copy_model(model_dir, tmp_path)
    os.truncate(_largest_array_file(copy), 1000)
    np.savez(tmp_path / "in.npz", np.zeros((1, 64, 64, 3), np.uint8))
    proc = subprocess.run([sys.executable, "-m", "var_jax", "reconstruct", "--checkpoint", str(copy), "--images",
                           str(tmp_path / "in.npz"), "--out", str(tmp_path / "rec.npz")],
                          env=env, capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "cannot read the tokenizer parameters" in err[0], err[:20]


def test_fingerprint_follows_content_not_path(model_dir, tmp_path):
    moved = copy_model(model_dir, tmp_path, "moved")
    assert model_fingerprint(moved) == model_fingerprint(model_dir)
    config = json.loads((moved / "config.json").read_text())
    config["var"]["num_classes"] += 0                     # same content, other formatting: another digest
    (moved / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(moved) != model_fingerprint(model_dir)


# ---- convert ---------------------------------------------------------------------------------------------------

def _one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith(f"var-jax {argv[0]}: error: "), err
    return err[0]


def test_convert_says_in_one_line_what_is_not_a_checkpoint(tmp_path, capsys):
    import argparse

    import torch
    rng = np.random.default_rng()
    noise = bytearray(rng.integers(0, 256, int(rng.integers(100, 5000)), dtype=np.uint8).tobytes())
    noise[0] = int(rng.choice([b for b in range(256) if b not in (0x80, ord("P"))]))   # no zip / pickle start
    weights = {"w": torch.from_numpy(rng.standard_normal((64, 64)).astype(np.float32))}
    torch.save(weights, tmp_path / "good.pth")
    np.savez(tmp_path / "good.npz", w=rng.standard_normal((64, 64)))
    files = {"noise.pth": bytes(noise), "noise.pt": bytes(noise), "noise.npz": bytes(noise),
             "cut.pth": (tmp_path / "good.pth").read_bytes()[:int(rng.integers(100, 1000))],
             "cut.npz": (tmp_path / "good.npz").read_bytes()[:int(rng.integers(100, 1000))]}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    torch.save({"args": argparse.Namespace(depth=16), "model": weights}, tmp_path / "objects.pth")
    np.savez(tmp_path / "objects.npz", a=np.array([{"depth": 16}], dtype=object))
    expected = {"noise.pth": "is not a PyTorch checkpoint", "noise.pt": "is not a PyTorch checkpoint",
                "noise.npz": "is not an .npz archive", "cut.pth": "is damaged or truncated",
                "cut.npz": "is a damaged or truncated .npz",
                "objects.pth": "holds Python objects besides tensors (argparse.Namespace)",
                "objects.npz": "holds object arrays"}
    for name, message in expected.items():
        line = _one_line_error(capsys, ["convert", "--vae", str(tmp_path / name), "--out", str(tmp_path / "out")])
        assert message in line and str(tmp_path / name) in line, (name, line)
        assert "weights_only=False" not in line and len(line) < 400, (name, line)
    # a state_dict without the transformer's keys: the message itself, not the repr of a KeyError
    line = _one_line_error(capsys, ["convert", "--vae", str(tmp_path / "good.pth"), "--var", str(tmp_path / "good.pth"),
                                    "--out", str(tmp_path / "out")])
    assert line.startswith("var-jax convert: error: reference VAR state_dict: missing key"), line
    assert not (tmp_path / "out").exists()


# ---- eval ------------------------------------------------------------------------------------------------------

def test_eval_refuses_image_sets_of_other_sizes_or_colours_and_warns_when_too_few(tmp_path, capsys):
    from PIL import Image
    rng = np.random.default_rng()
    side = int(rng.choice([16, 24, 32]))

    def images(path, n, size, channels):
        np.savez(path, rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8))
        return str(path)

    samples = images(tmp_path / "s.npz", 4, side, 3)
    digits = ["eval", "--features", "digits", "--samples", samples, "--ref"]
    line = _one_line_error(capsys, digits + [images(tmp_path / "grey_big.npz", 4, 2 * side, 1)])
    assert f"the samples are {side}×{side} RGB images but the references are {2 * side}×{2 * side} grey" in line
    line = _one_line_error(capsys, digits + [images(tmp_path / "grey.npz", 4, side, 1)])
    assert f"references are {side}×{side} grey" in line
    folder = tmp_path / "grey_pngs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8), mode="L").save(folder / f"{i}.png")
    assert f"references are {side}×{side} grey" in _one_line_error(capsys, digits + [str(folder)])
    # a statistics file remembers its images
    assert main(["eval", "--features", "digits", "--ref", images(tmp_path / "big.npz", 5, 2 * side, 3),
                 "--save-stats", str(tmp_path / "stats.npz")]) == 0
    capsys.readouterr()
    assert f"references are {2 * side}×{2 * side} RGB" in _one_line_error(capsys, digits + [str(tmp_path / "stats.npz")])

    # comparable but few: the metrics, and a warning on stderr and in the JSON
    few, dims = int(rng.integers(2, 60)), 64     # the digits network: 64 pool features, 64 pixels for sFID
    assert main(digits[:3] + ["--samples", images(tmp_path / "few.npz", few, side, 3), "--ref",
                               images(tmp_path / "ref.npz", 80, side, 3), "--out", str(tmp_path / "m.json")]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("var-jax eval: warning:")]
    assert len(warnings) == 1 and f"{few} samples and 80 references are too few" in warnings[0], captured.err
    assert f"FID {dims}, sFID {dims}" in warnings[0] and "FID" in captured.out
    assert json.loads((tmp_path / "m.json").read_text())["warning"] == warnings[0].split("warning: ", 1)[1]
    assert main(digits[:3] + ["--samples", images(tmp_path / "many.npz", dims + 1, side, 3), "--ref",
                               str(tmp_path / "ref.npz"), "--out", str(tmp_path / "m2.json")]) == 0
    assert "warning" not in capsys.readouterr().err
    assert json.loads((tmp_path / "m2.json").read_text())["warning"] is None


# ---- reconstruct -----------------------------------------------------------------------------------------------

def test_reconstruct_refuses_out_not_npz_and_empty_npz(model_dir, tmp_path, capsys):
    np.savez(tmp_path / "in.npz", np.zeros((2, 64, 64, 3), np.uint8))
    argv = ["reconstruct", "--checkpoint", str(model_dir), "--images"]
    fails(capsys, argv + [str(tmp_path / "in.npz"), "--out", str(tmp_path / "rec.png")], "must end in .npz")
    np.savez(tmp_path / "empty.npz", np.zeros((0, 64, 64, 3), np.uint8))
    fails(capsys, argv + [str(tmp_path / "empty.npz"), "--out", str(tmp_path / "rec.npz")], "holds no images")
    assert sorted(os.listdir(tmp_path)) == ["empty.npz", "in.npz"]


def test_npz_images_are_read_a_batch_at_a_time(tmp_path):
    from var_jax.cli.reconstruct import open_images
    images = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    for save in (np.savez, np.savez_compressed):
        save(tmp_path / "in.npz", images)
        batches = list(open_images(str(tmp_path / "in.npz"), 64).batches(2))
        assert [len(b) for b in batches] == [2, 2, 1]
        np.testing.assert_array_equal(np.concatenate(batches), images)


def test_reconstruct_skips_and_reports_unreadable_images(model_dir, tmp_path, capsys):
    from PIL import Image
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "c.png", "d.png"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / name)
    (folder / "b.png").write_bytes(b"not a png")
    assert main(["reconstruct", "--checkpoint", str(model_dir), "--images", str(folder),
                 "--out", str(tmp_path / "rec.npz"), "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    assert "over 3 images" in captured.out and "skipped 1 unreadable file(s): b.png" in captured.out
    assert "b.png" in captured.err
    with np.load(tmp_path / "rec.npz") as rec:
        assert rec["arr_0"].shape == (3, 64, 64, 3) and rec["tokens_3"].shape == (3, 16)
    assert sorted(os.listdir(tmp_path)) == ["images", "rec.npz"]      # no temporary file left


# ---- sample: resume by content, several hosts ------------------------------------------------------------------

def test_host_batches_split_every_batch_once():
    from var_jax.cli.sample import host_batches
    single = host_batches(10, 3)
    assert single == [(0, 0, 3), (1, 3, 6), (2, 6, 9), (3, 9, 10)]
    split = [host_batches(10, 3, h, 3) for h in range(3)]
    assert sorted(b for host in split for b in host) == single and split[1] == [(1, 3, 6)]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_sample_resumes_a_moved_checkpoint_refuses_another_and_matches_two_hosts(model_dir, tmp_path, capsys):
    """One single-host run; the same run with the checkpoint moved resumes without sampling again; another
    model under the same path is refused; two processes joined by jax.distributed write the same samples.npz."""
    from conftest import REPO_ROOT
    moved = copy_model(model_dir, tmp_path, "moved")
    args = ["--classes", "1,2,3", "--num-per-class", "2", "--batch-size", "2", "--top-k", "5", "--seed", "7"]
    assert main(["sample", "--checkpoint", str(model_dir), "--out", str(tmp_path / "one"), *args]) == 0
    with np.load(tmp_path / "one" / "samples.npz") as data:
        single = data["arr_0"]
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "one" / "shards").iterdir()}
    (tmp_path / "one" / "samples.npz").unlink()
    assert main(["sample", "--checkpoint", str(moved), "--out", str(tmp_path / "one"), *args]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "one" / "shards").iterdir()} == stamps
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps(config, indent=1))     # another model directory content
    fails(capsys, ["sample", "--checkpoint", str(moved), "--out", str(tmp_path / "one"), *args],
          "different settings (model_sha256)")

    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT),
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen([sys.executable, "-m", "var_jax", "sample", "--checkpoint", str(model_dir),
                               "--out", str(tmp_path / "two"), *args, "--coordinator_address", f"localhost:{port}",
                               "--num_processes", "2", "--process_id", str(i)],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outputs)
    with np.load(tmp_path / "two" / "samples.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], single)
        np.testing.assert_array_equal(data["arr_1"], [1, 1, 2, 2, 3, 3])
