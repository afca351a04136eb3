"""Any TFDS image-classification dataset prepared on disk, read through `tfds.data_source` (ArrayRecord files,
random access, no TensorFlow needed to read) as a grain source.

Preparing ImageNet (ILSVRC2012) once, from the manual download (ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar placed in MANUAL_DIR). Writing the PNG/JPEG features needs TensorFlow at build time
only, e.g. in a separate environment:

    pip install tensorflow tensorflow-datasets
    tfds build imagenet2012 --manual_dir MANUAL_DIR --data_dir DATA_DIR --file_format array_record

then point the config at it: {'name': 'tfds', 'tfds_name': 'imagenet2012', 'split': 'train',
'data_dir': 'DATA_DIR'}. Datasets built in the default tfrecord format cannot be read by random access;
rebuild them with `--file_format array_record`.
"""
from __future__ import annotations

import numpy as np


def as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> uint8 (H, W, 3)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an image of shape (H, W[, 1|3|4]), got {image.shape}")
    if image.dtype != np.uint8:
        raise TypeError(f"expected uint8 image data, got {image.dtype}")
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return image[:, :, :3]


class TfdsSource:
    """Random-access source of {'image': uint8 (H, W, 3), 'label': int32} over one split of a prepared dataset."""

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
                 image_key: str = "image", label_key: str = "label"):
        import tensorflow_datasets as tfds
        self.name, self.split, self.image_key, self.label_key = name, split, image_key, label_key
        try:
            # download=False: a missing dataset must fail here, never start a multi-hour download on a trainer
            self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as error:
            raise FileNotFoundError(
                f"TFDS dataset {name!r} (split {split!r}, data_dir {data_dir!r}) is not prepared or not readable: "
                f"{error}. Build it with `tfds build {name} --data_dir DIR --file_format array_record`") from error
        features = self._source.dataset_info.features
        for field, key in (("image_key", image_key), ("label_key", label_key)):
            if key not in features:
                raise KeyError(f"TFDS dataset {name!r} has no feature {key!r} ({field}); "
                               f"features: {sorted(features.keys())}")
        self.num_classes = int(features[label_key].num_classes)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        example = self._source[int(index)]
        return {"image": as_rgb(example[self.image_key]), "label": np.int32(example[self.label_key])}

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, classes={self.num_classes}, len={len(self)})"
