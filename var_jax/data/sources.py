"""Choosing a data source from a small config.

    {'name': 'digits', 'image_size': 32}                                    # embedded, no download
    {'name': 'shapes', 'image_size': 32, 'split': 'train'}                  # procedural, unlimited ('val': held out)
    {'name': 'folder', 'path': '/data/imagenet/train'}                      # one sub-folder per class
    {'name': 'tfds', 'tfds_name': 'imagenet2012', 'split': 'train', 'data_dir': '/data/tfds'}

Every source is a random-access sequence of {'image': uint8 (H, W, 3), 'label': int32} with a `num_classes`
attribute; the grain pipeline (pipeline.py) applies the reference transforms.
"""
from __future__ import annotations

from typing import Any, Mapping

SOURCE_NAMES = ("digits", "shapes", "folder", "tfds")
# Keys of the data config; pipeline options may share the dict, build_source ignores them.
SOURCE_KEYS = ("name", "path", "tfds_name", "split", "data_dir", "image_size", "image_key", "label_key")
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
            source = ImageFolderSource(path)
        except (FileNotFoundError, ValueError) as error:
            raise type(error)(f"data config field 'path': {error}") from error
    elif name == "tfds":
        from var_jax.data.tfds_source import TfdsSource
        source = TfdsSource(_required(config, "tfds_name", "for name='tfds' (e.g. 'imagenet2012')"),
                            split=split or "train", data_dir=config.get("data_dir"),
                            image_key=config.get("image_key") or "image",
                            label_key=config.get("label_key") or "label")
    else:
        raise ValueError(f"data config field 'name' must be one of {SOURCE_NAMES}, got {name!r}")
    return source, int(source.num_classes)
