"""The model directory every command loads with `--checkpoint DIR`, and reading reference checkpoints.

Layout of a model directory:
    config.json   {"format": "var-jax-model", "version": 1, "tokenizer": {...}, "var": {...} or null}: the models'
                  identities (VARConfig.to_dict: no compute dtype, remat or attention implementation; those are
                  the loading process's run settings, and older directories' copies of them are ignored)
    tokenizer/    orbax checkpoint of the tokenizer's parameters (a nested dict of arrays)
    var/          the same for the VAR transformer, when there is one

Only parameters are stored; the module structure (and any buffers) is rebuilt from the configs. A reader never sees
half a directory: locally it is written under a temporary name and renamed into place when complete; on a bucket,
where a rename copies every object, it is written in place with config.json (which every reader requires) removed
first and written last.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import uuid
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from var_jax.orbax_loops import draining_event_loops
from var_jax.paths import atomic_write_text, is_local, user_path
from var_jax.sharding import state_shardings
from var_jax.tokenizer.config import TokenizerConfig
from var_jax.tokenizer.vqvae import VQVAE
from var_jax.transformer.config import VARConfig
from var_jax.transformer.model import VAR

FORMAT_NAME = "var-jax-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
# Config fields the tokenizer and the transformer must agree on: the transformer predicts the tokenizer's codes
# (vocab_size), embeds its latents (z_channels) and walks its scales (patch_nums).
SHARED_FIELDS = ("vocab_size", "z_channels", "patch_nums")
# orbax's per-save bookkeeping (timestamps; on a bucket, a commit marker naming the path): not part of what a
# checkpoint holds
VOLATILE_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")
# Keys under which training checkpoints commonly nest their state_dict (tried in this order).
WRAPPER_KEYS = ("state_dict", "model", "module", "params")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, corrupt, of another format, or not matching its config."""


@dataclasses.dataclass
class ModelBundle:
    tokenizer_config: Any = None     # TokenizerConfig
    tokenizer: Any = None            # VQVAE
    var_config: Any = None           # VARConfig, or None
    var: Any = None                  # VAR, or None


# ---- a module as (structure, parameters, buffers) -------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelParts:
    """What `nnx.merge(graphdef, params, rest)` needs beside the params."""
    graphdef: Any
    rest: Any                # pure dict of the non-Param variables (buffers), concrete arrays
    param_vars: Any          # abstract nnx.State of the Params, with their logical-axis metadata

    def merge(self, params):
        return nnx.merge(self.graphdef, params, self.rest)


def pure_dict(state) -> Any:
    """An nnx.State as a plain nested dict (anything else unchanged)."""
    return nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state


def split_model(model: nnx.Module):
    """(graphdef, Param state with metadata, pure dict of every other variable)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, pure_dict(rest)


def model_parts(model_fn: Callable[[nnx.Rngs], nnx.Module]) -> ModelParts:
    """Structure and buffers of the model, without allocating its params (buffers are built concretely,
    they are small and deterministic)."""
    abstract = nnx.eval_shape(lambda: model_fn(nnx.Rngs(0)))
    graphdef, param_vars, abstract_rest = split_model(abstract)
    # Buffers must be real arrays: build them outside eval_shape from a model on the CPU-sized default device
    # only when there are any (the abstract rest tells).
    rest = {}
    if jax.tree.leaves(abstract_rest):
        rest = jax.jit(lambda: pure_dict(nnx.split(model_fn(nnx.Rngs(0)), nnx.Param, ...)[2]))()
    return ModelParts(graphdef=graphdef, rest=rest, param_vars=param_vars)


# ---- var-jax model directories ----------------------------------------------------------------------------

def _param_dict(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def save_model_dir(directory, tokenizer=None, var=None, *, overwrite: bool = False) -> epath.Path:
    """Write a model directory from `tokenizer=(TokenizerConfig, VQVAE)` and/or `var=(VARConfig, VAR)`."""

    if tokenizer is None and var is None:
        raise ValueError("save_model_dir: nothing to save (give tokenizer=(config, model) and/or var=(config, model))")
    directory = user_path(directory)
    if directory.exists() and not overwrite:
        raise CheckpointError(f"{directory} already exists (pass overwrite=True to replace it)")
    # The same temporary name on every host (each writes its shards there); a stale one from a crash is removed.
    # A bucket has no rename: there the directory itself is emptied, its config.json first.
    in_place = not is_local(directory)
    tmp = directory if in_place else directory.parent / f".{directory.name}.partial"
    if jax.process_index() == 0:
        if in_place and (directory / CONFIG_FILE).exists():
            (directory / CONFIG_FILE).unlink()
        if tmp.exists():
            tmp.rmtree()
    sync_hosts("var_jax.save_model_dir.start")
    config = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
              "tokenizer": tokenizer[0].to_dict() if tokenizer else None,
              "var": var[0].to_dict() if var else None}
    with ocp.StandardCheckpointer() as checkpointer:
        for part, pair in (("tokenizer", tokenizer), ("var", var)):
            if pair is not None:
                checkpointer.save(tmp / part, _param_dict(pair[1]))
        checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        atomic_write_text(tmp / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        if not in_place and directory.exists():
            trash = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
            directory.rename(trash)
            tmp.rename(directory)
            trash.rmtree()
        elif not in_place:
            tmp.rename(directory)
    sync_hosts("var_jax.save_model_dir.done")
    return directory


def sync_hosts(name: str):
    """A barrier over every process of a multi-host run (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def read_model_config(directory) -> dict:
    """config.json of a model directory, checked for format and version."""
    directory = user_path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a var-jax model directory: no {CONFIG_FILE} "
                              f"(convert a reference checkpoint with `python -m var_jax convert`)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: format is {config.get('format') if isinstance(config, dict) else None!r}, "
                              f"expected {FORMAT_NAME!r}")
    if config.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: version {config.get('version')!r} is not supported "
                              f"(this var-jax reads version {FORMAT_VERSION})")
    check_parts_agree(config, path)
    return config


def resolve_model_dir(path) -> epath.Path:
    """A model directory, or a training workdir whose exported model is WORKDIR/model (training workdirs hold a
    run config too, so a candidate must hold a *model* config)."""
    root = user_path(path)
    for candidate in (root, root / "model"):
        try:
            read_model_config(candidate)
            return candidate
        except CheckpointError:
            continue
    raise CheckpointError(f"{root} is neither a model directory (with {CONFIG_FILE}) nor a training workdir "
                          f"containing model/{CONFIG_FILE}")


def check_parts_agree(config: dict, where) -> None:
    """A tokenizer and transformer that disagree on SHARED_FIELDS would run (a larger vocabulary reads rows past
    the codebook as NaN) but give garbage: refuse them, naming both values."""
    tok, var = config.get("tokenizer"), config.get("var")
    if not isinstance(tok, dict) or not isinstance(var, dict):
        return
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v    # JSON lists vs tuples
    for name in SHARED_FIELDS:
        if name in tok and name in var and norm(tok[name]) != norm(var[name]):
            raise CheckpointError(f"{where}: the tokenizer and the VAR transformer disagree on {name}: tokenizer "
                                  f"{tok[name]!r}, transformer {var[name]!r}")


def model_fingerprint(directory) -> str:
    """sha256 over config.json and every file of the parameter checkpoints (relative name and bytes; orbax's
    timestamp file excluded): the same for a moved or copied model directory, different for any other content.
    It reads the whole directory once (about as long as loading it)."""
    directory = user_path(directory)
    config = read_model_config(directory)
    digest = hashlib.sha256()
    files = [directory / CONFIG_FILE]
    for part in ("tokenizer", "var"):
        if config.get(part) is not None and (directory / part).is_dir():
            files += sorted((p for p in _files_under(directory / part) if p.name not in VOLATILE_FILES), key=str)
    for path in files:
        digest.update(str(path)[len(str(directory)):].encode() + b"\0")   # the name inside the directory
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _flat_shapes(tree) -> dict[str, tuple]:
    """'a/0/kernel' -> shape; keys stringified, as orbax stores the integer keys of module lists as strings."""
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): tuple(x.shape)
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _files_under(directory: epath.Path):
    """Every file below `directory` (epath refuses recursive globs, as they are slow on GCS)."""
    for entry in directory.iterdir():
        if entry.is_dir():
            yield from _files_under(entry)
        else:
            yield entry


def _restore_module(path: epath.Path, model_fn, mesh, what: str):
    """Rebuild a module from its constructor and restore its parameters, directly onto their shardings."""


    if not path.is_dir():
        raise CheckpointError(f"{path.parent}: config.json names a {what} but {path} is missing")
    parts = model_parts(model_fn)
    abstract = nnx.to_pure_dict(parts.param_vars)
    if mesh is not None:
        shardings = nnx.to_pure_dict(state_shardings(parts.param_vars, mesh))
    else:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    # a failed read must end the others before the error is raised (orbax_loops: else stray tracebacks follow)
    with draining_event_loops(), ocp.StandardCheckpointer() as checkpointer:
        try:
            item = checkpointer.metadata(path).item_metadata
        except Exception as e:  # orbax raises several types for unreadable directories
            raise CheckpointError(f"{path.parent}: cannot read the {what} checkpoint {path} (its metadata is "
                                  f"damaged: {_root_cause(e)})") from None
        if item is None or getattr(item, "tree", None) is None:   # orbax only logs a warning for this
            raise CheckpointError(f"{path.parent}: the {what} checkpoint {path} has no readable parameter metadata "
                                  f"(_METADATA or the array index is missing or damaged); copy or export the model "
                                  f"directory again")
        stored = item.tree
        want, have = _flat_shapes(target), _flat_shapes(stored)
        if want != have:
            problems = sorted(set(want) ^ set(have)) + sorted(
                f"{k}: config says {want[k]}, stored {have[k]}" for k in set(want) & set(have) if want[k] != have[k])
            raise CheckpointError(f"{path} does not match the {what} config in config.json; differing parameters: "
                                  f"{problems[:10]}{' ...' if len(problems) > 10 else ''}")
        try:
            params = checkpointer.restore(path, target)
        except Exception as e:  # tensorstore reports a missing or truncated array file with a long spec dump
            raise CheckpointError(f"{path.parent}: cannot read the {what} parameters in {path} (an array file is "
                                  f"missing or truncated: {_root_cause(e)}); copy or export the model directory "
                                  f"again") from None
    return parts.merge(params)


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost exception of a chain (tensorstore's names the file and the byte range)."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:300]


def load_model_dir(directory, mesh=None, run_settings=None) -> ModelBundle:
    """Load a model directory; with a mesh, parameters are restored straight onto their logical-axis shardings.
    The transformer runs with `run_settings` (a transformer.RunSettings; None: the defaults, resolved for this
    process's backend)."""

    directory = user_path(directory)
    config = read_model_config(directory)
    bundle = ModelBundle()
    try:
        if config.get("tokenizer") is not None:
            bundle.tokenizer_config = TokenizerConfig.from_dict(config["tokenizer"]).validate()
        if config.get("var") is not None:
            bundle.var_config = VARConfig.from_dict(config["var"]).with_run_settings(run_settings)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / CONFIG_FILE}: invalid model config: {e}") from None
    if bundle.tokenizer_config is not None:
        cfg = bundle.tokenizer_config
        bundle.tokenizer = _restore_module(directory / "tokenizer", lambda rngs: VQVAE(cfg, rngs=rngs), mesh,
                                           "tokenizer")
    if bundle.var_config is not None:
        vcfg = bundle.var_config
        bundle.var = _restore_module(directory / "var", lambda rngs: VAR(vcfg, rngs=rngs), mesh, "var")
    for model in (bundle.tokenizer, bundle.var):
        if model is not None:
            model.eval()
    return bundle


# ---- reference (PyTorch) checkpoints --------------------------------------------------------------------

def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(hasattr(v, "shape") for v in obj.values())


def _select(obj, key: str | None, path):
    """Walk `key` ('trainer.vae_local') into a nested checkpoint, else unwrap the usual wrapper keys."""
    if key:
        for part in key.split("."):
            if not isinstance(obj, dict) or part not in obj:
                have = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise CheckpointError(f"{path}: no entry {part!r} (of --key {key!r}); available: {have}")
            obj = obj[part]
    while not _is_state_dict(obj):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
        if inner is None:
            have = sorted(obj)[:20] if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(f"{path} does not hold a state_dict of tensors at the top level or under "
                                  f"{list(WRAPPER_KEYS)}; top-level entries: {have} (select one with key=...)")
        obj = inner
    return obj


def _tensor_to_numpy(t) -> np.ndarray:
    t = t.detach().cpu()
    if t.is_floating_point() and t.dtype.itemsize < 4:   # bfloat16 / float16 have no exact numpy twin here
        t = t.float()
    return t.numpy()


# The first bytes of what torch.save writes: a zip archive (as every .npz is), or before torch 1.6 a pickle
# (protocol 2 or later starts with the PROTO opcode 0x80).
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_MAGIC = b"\x80"


def _file_start(path, size: int = 4) -> bytes:
    with path.open("rb") as f:
        return f.read(size)


def _torch_load_problem(error: BaseException) -> str:
    """torch.load's error as one clause: its messages run to paragraphs (and suggest weights_only=False, which
    would run code from the file)."""
    reason = _root_cause(error)
    unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", reason)
    if unsupported:
        return (f"it holds Python objects besides tensors ({unsupported.group(1)}), which a weights-only load "
                "refuses; save the state_dict alone (torch.save(model.state_dict(), PATH))")
    return f"it is damaged or truncated ({reason.split('. ')[0].rstrip('.')})"


def read_state_dict(path, key: str | None = None) -> dict[str, np.ndarray]:
    """A reference state_dict as numpy arrays, from `.pth`/`.pt` (torch, weights only) or `.npz`.

    `key` selects a nested entry: dotted names for torch files ('trainer.vae_local'), the `key/` prefix of npz
    entries ('vae' picks 'vae/...'). Without it a top-level dict wrapping the state_dict is unwrapped.
    """
    path = user_path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        if not _file_start(path).startswith(ZIP_MAGIC):
            raise CheckpointError(f"{path} is not an .npz archive (it does not start like the zip file np.savez "
                                  "writes)")
        try:
            with path.open("rb") as f, np.load(f, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except ValueError as e:
            if "allow_pickle" not in str(e):
                raise CheckpointError(f"{path} is a damaged .npz: {_root_cause(e)}") from None
            raise CheckpointError(f"{path} holds object arrays (pickled Python objects), which are never loaded; "
                                  "save plain numeric arrays") from None
        except Exception as e:  # zipfile / zlib / numpy raise many types for a damaged file
            raise CheckpointError(f"{path} is a damaged or truncated .npz: {_root_cause(e)}") from None
        if key:
            prefix = key.rstrip("/") + "/"
            arrays = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            if not arrays:
                raise CheckpointError(f"{path}: no entries under {prefix!r}")
        return arrays
    if suffix not in (".pth", ".pt"):
        raise CheckpointError(f"{path}: unknown checkpoint type {suffix!r} (expected .pth, .pt or .npz)")
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"reading {path} needs PyTorch: pip install -e .[convert]") from None
    start = _file_start(path)
    if not (start.startswith(ZIP_MAGIC) or start[:1] == PICKLE_MAGIC):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither the zip archive nor the pickle that "
                              "torch.save writes)")
    try:
        with path.open("rb") as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of a damaged or non-torch file
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: {_torch_load_problem(e)}") from None
    return {k: _tensor_to_numpy(v) for k, v in _select(obj, key, path).items()}
