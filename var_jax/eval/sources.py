"""Image sets to evaluate, read batch by batch so that 50,000 images never sit in memory at once.

* `.npz` with `arr_0` uint8 (N, H, W, 3) (the ADM layout): `arr_0.npy` is streamed from the archive (stored or
  deflated), one batch of rows at a time.
* a folder of image files (sorted by name; all of one size; converted to RGB).
* an in-memory uint8 array (`ArrayImages`), e.g. the embedded held-out digits.

Every source yields RGB batches; `stored_channels` says whether the set itself is grey (1) or colour (3), so that
two sets of different kinds are not compared as if they were alike.
"""
from __future__ import annotations

import contextlib
import zipfile

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# PIL modes of one colour channel (with or without alpha): a folder of these is a grey image set
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


class SourceError(ValueError):
    """An image set that cannot be read; the message is one line naming the path."""


def _check_shape(shape, dtype, where: str):
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3):
        raise SourceError(f"{where}: arr_0 must be uint8 (N, H, W, 3), got {dtype} {tuple(shape)}")
    if shape[0] == 0:
        raise SourceError(f"{where}: holds no images")


def _rgb(batch: np.ndarray) -> np.ndarray:
    return np.repeat(batch, 3, axis=-1) if batch.shape[-1] == 1 else batch


class ArrayImages:
    def __init__(self, images: np.ndarray, name: str = "array"):
        images = np.asarray(images)
        _check_shape(images.shape, images.dtype, name)
        self.images, self.name = images, name

    def __len__(self):
        return len(self.images)

    @property
    def image_shape(self):
        return tuple(self.images.shape[1:3]) + (3,)

    @property
    def stored_channels(self) -> int:
        return int(self.images.shape[-1])

    def batches(self, batch_size: int):
        for start in range(0, len(self.images), batch_size):
            yield _rgb(self.images[start:start + batch_size])


class NpzImages:
    """`arr_0` of an .npz, streamed."""

    MEMBER = "arr_0.npy"

    def __init__(self, path):
        self.path, self.name = path, str(path)
        try:
            with self._open() as (_, f):
                self._shape, self._fortran, self._dtype = _read_npy_header(f)
        except SourceError:
            raise
        except Exception as e:   # a damaged archive: zipfile / numpy raise many types
            raise SourceError(f"{path}: cannot read as .npz: {first_line(e)}") from None
        _check_shape(self._shape, self._dtype, str(path))

    def _open(self):

        @contextlib.contextmanager
        def opened():
            with self.path.open("rb") as raw, zipfile.ZipFile(raw) as archive:
                if self.MEMBER not in archive.namelist():
                    names = [n[:-4] for n in archive.namelist()]
                    raise SourceError(f"{self.path}: no 'arr_0' entry (has {names})")
                with archive.open(self.MEMBER) as f:
                    yield archive, f
        return opened()

    def __len__(self):
        return self._shape[0]

    @property
    def image_shape(self):
        return tuple(self._shape[1:3]) + (3,)

    @property
    def stored_channels(self) -> int:
        return int(self._shape[-1])

    def batches(self, batch_size: int):
        if self._fortran:   # column-major rows cannot be streamed: read the array whole
            with self.path.open("rb") as raw, np.load(raw, allow_pickle=False) as data:
                yield from ArrayImages(np.ascontiguousarray(data["arr_0"]), self.name).batches(batch_size)
            return
        row_bytes = int(np.prod(self._shape[1:]))
        with self._open() as (_, f):
            _read_npy_header(f)
            for start in range(0, len(self), batch_size):
                n = min(batch_size, len(self) - start)
                data = f.read(n * row_bytes)
                if len(data) != n * row_bytes:
                    raise SourceError(f"{self.path}: arr_0 is truncated at image {start + len(data) // row_bytes}")
                yield _rgb(np.frombuffer(data, np.uint8).reshape((n,) + tuple(self._shape[1:])))


def _read_npy_header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


class FolderImages:
    def __init__(self, path):
        self.path, self.name = path, str(path)
        self.files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise SourceError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        self._shape = self._load(self.files[0]).shape
        with self.files[0].open("rb") as f, Image.open(f) as image:   # the first one was just read
            self.stored_channels = 1 if image.mode in GREY_MODES else 3

    def _load(self, file) -> np.ndarray:
        try:
            with file.open("rb") as f, Image.open(f) as image:
                return np.asarray(image.convert("RGB"), np.uint8)
        except Exception as e:
            raise SourceError(f"{file}: cannot read as an image: {first_line(e)}") from None

    def __len__(self):
        return len(self.files)

    @property
    def image_shape(self):
        return self._shape

    def batches(self, batch_size: int):
        for start in range(0, len(self.files), batch_size):
            images = []
            for file in self.files[start:start + batch_size]:
                image = self._load(file)
                if image.shape != self._shape:
                    raise SourceError(f"{self.path}: images must all have one size; {file.name} is "
                                      f"{image.shape[1]}×{image.shape[0]}, {self.files[0].name} is "
                                      f"{self._shape[1]}×{self._shape[0]}")
                images.append(image)
            yield np.stack(images)


def open_images(path):
    """A folder or an .npz with arr_0 (epath.Path from var_jax.paths.user_path)."""
    if path.is_dir():
        return FolderImages(path)
    if not path.is_file():
        raise SourceError(f"{path} does not exist")
    return NpzImages(path)


def first_line(e: Exception) -> str:
    """The first line of an error's message (its type name when it has none), for one-line CLI errors."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
