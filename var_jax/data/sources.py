"""Choosing a data source from a small config.

    {'name': 'digits', 'image_size': 32}                                    # embedded, no download
    {'name': 'shapes', 'image_size': 32, 'split': 'train'}                  # procedural, unlimited ('val': held out)
    {'name': 'folder', 'path': '/data/imagenet/train'}                      # one sub-folder per class
    {'name': 'tfds', 'tfds_name': 'imagenet2012', 'split': 'train', 'data_dir': '/data/tfds'}
    {'name': 'tokens', 'dir': 'tokens/train', 'eval_dir': 'tokens/val'}    # `var-jax tokenize` output (tokens.py)

Every source is a random-access sequence of {'image': uint8 (H, W, 3), 'label': int32} with a `num_classes`
attribute; the grain pipeline (pipeline.py) applies the reference transforms. A token set ('tokens') holds
{'tokens': (L,), 'label'} instead, cropped when it was tokenised.

Training and held-out splits (`build_train_and_held_out`, what the trainer reads): with `split` / `eval_split`
unset, each source trains on TRAIN_SPLITS and evaluates on HELD_OUT_SPLITS, which never overlap: digits 'train' /
'test' (a fixed stratified 20%), shapes 'train' / 'val' (indices 0..9,999), folder 'train' / 'val' (a `val/`
folder beside `train/`, else a hashed 2% of the files, left out of training; folder.py), TFDS 'train' /
'validation', tokens `dir` / `eval_dir` (without eval_dir: the held-out images of the source it was
tokenised from, encoded in the step). `build_source` alone keeps each source's whole default split (digits 'all',
folder 'all').
"""
from __future__ import annotations

from typing import Any, Mapping

SOURCE_NAMES = ("digits", "shapes", "folder", "tfds", "tokens")
# Keys of the data config; pipeline options may share the dict, build_source ignores them.
SOURCE_KEYS = ("name", "path", "tfds_name", "split", "eval_split", "data_dir", "image_size", "image_key",
               "label_key", "dir", "eval_dir")
# The splits the trainer uses when `split` / `eval_split` are unset: disjoint, so held-out images are never trained on.
TRAIN_SPLITS = {"digits": "train", "shapes": "train", "folder": "train", "tfds": "train"}
HELD_OUT_SPLITS = {"digits": "test", "shapes": "val", "folder": "val", "tfds": "validation"}
PIPELINE_KEYS = ("hflip", "worker_count", "num_threads", "prefetch_buffer_size")


def _as_dict(config: Mapping[str, Any] | Any) -> dict:
    if hasattr(config, "to_dict"):   # ml_collections.ConfigDict
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"data config must be a dict or ConfigDict, got {type(config).__name__}")
    unknown = sorted(set(config) - set(SOURCE_KEYS) - set(PIPELINE_KEYS))
    if unknown:
        raise KeyError(f"data config: unknown field(s) {unknown}; known: {SOURCE_KEYS + PIPELINE_KEYS}")
    return dict(config)


def _required(config: dict, field: str, why: str):
    value = config.get(field)
    if value in (None, ""):
        raise ValueError(f"data config field {field!r} is required {why}")
    return value


def build_source(config) -> tuple[Any, int]:
    """(source, num_classes) for a data config; missing paths or names fail here, naming the field."""
    config = _as_dict(config)
    name = _required(config, "name", f"(one of {SOURCE_NAMES})")
    split = config.get("split")
    if name == "digits":
        from var_jax.data.digits import DigitsSource
        source = DigitsSource(resolution=int(_required(config, "image_size", "for name='digits'")),
                              split=split or "all")
    elif name == "shapes":
        from var_jax.data.shapes import ShapesSource
        source = ShapesSource(resolution=int(_required(config, "image_size", "for name='shapes'")),
                              split=split or "train")
    elif name == "folder":
        from var_jax.data.folder import ImageFolderSource
        path = _required(config, "path", "for name='folder' (a directory with one sub-folder per class)")
        try:
            source = ImageFolderSource(path, split=split or "all")
        except (FileNotFoundError, ValueError) as error:
            raise type(error)(f"data config field 'path': {error}") from error
    elif name == "tfds":
        from var_jax.data.tfds_source import TfdsSource
        source = TfdsSource(_required(config, "tfds_name", "for name='tfds' (e.g. 'imagenet2012')"),
                            split=split or "train", data_dir=config.get("data_dir"),
                            image_key=config.get("image_key") or "image",
                            label_key=config.get("label_key") or "label")
    elif name == "tokens":
        source = _token_source(config, "dir")
    else:
        raise ValueError(f"data config field 'name' must be one of {SOURCE_NAMES}, got {name!r}")
    return source, int(source.num_classes)


def _token_source(config: dict, field: str):
    """The token set data.dir (training) or data.eval_dir (held out), checked against its role."""
    from var_jax.data.tokens import TokenSource
    source = TokenSource(_required(config, field, "for name='tokens' (a `var-jax tokenize` output directory)"))
    held_out = source.meta["transform"] == "eval"
    if held_out != (field == "eval_dir"):
        raise ValueError(f"data config field {field!r}: {source.directory} holds the {source.meta['split']!r} split "
                         f"with the {source.meta['transform']} transform; data.dir takes a training split, "
                         f"data.eval_dir a held-out one (`var-jax tokenize --split ...`)")
    if config.get("hflip") and not source.flip:
        raise ValueError(f"data config field 'hflip': {source.directory} was tokenized without --flip")
    return source


def build_train_and_held_out(config, *, held_out: bool = True) -> tuple[Any, Any, int]:
    """(training source, held-out source or None, num_classes): `split` / `eval_split` default to the source's
    TRAIN_SPLITS / HELD_OUT_SPLITS entries (see the module docstring)."""
    config = _as_dict(config)
    name = _required(config, "name", f"(one of {SOURCE_NAMES})")
    if name not in SOURCE_NAMES:
        raise ValueError(f"data config field 'name' must be one of {SOURCE_NAMES}, got {name!r}")
    if name == "tokens":
        return _token_train_and_held_out(config, held_out)
    train, num_classes = build_source({**config, "split": config.get("split") or TRAIN_SPLITS[name]})
    if not held_out:
        return train, None, num_classes
    try:
        evaluation, eval_classes = build_source({**config, "split": config.get("eval_split") or HELD_OUT_SPLITS[name]})
    except ValueError as error:
        raise ValueError(f"held-out split: {error} (set data.eval_split, or eval_every=0 to train without held-out "
                         "evaluation)") from error
    if eval_classes != num_classes:
        raise ValueError(f"the held-out split has {eval_classes} classes, the training split {num_classes}")
    return train, evaluation, num_classes


def _token_train_and_held_out(config: dict, held_out: bool) -> tuple[Any, Any, int]:
    """A token set for training; held out, data.eval_dir, or else the held-out images of the data config the
    training tokens were made from (its meta.json)."""
    train = _token_source(config, "dir")
    if not held_out:
        return train, None, train.num_classes
    if config.get("eval_dir"):
        evaluation = _token_source(config, "eval_dir")
    else:
        images = {k: v for k, v in train.meta["source"].items() if k in SOURCE_KEYS and v not in ("", None)}
        evaluation, _ = build_source({**images, "split": images.get("eval_split") or HELD_OUT_SPLITS[images["name"]]})
    if evaluation.num_classes != train.num_classes:
        raise ValueError(f"the held-out split has {evaluation.num_classes} classes, the training tokens "
                         f"{train.num_classes}")
    return train, evaluation, train.num_classes
