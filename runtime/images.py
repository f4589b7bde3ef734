"""Image files on the device: decoding with Pillow, and a folder of class folders read lazily.

What stays true:
- A decoded sample is float32 (C, H, W) on the 0-255 scale whatever the file's bit depth: 16-bit
  images (Pillow modes I;16*, and I, which older Pillow gives 16-bit PNGs) are multiplied by
  255/65535, so the manifest's `scale` (1/255 for photos) maps 8- and 16-bit files alike to 0..1.
  (Pillow reads 48-bit RGB PNGs as 8-bit RGB; floating-point images are refused: their range is unknown.)
- The EXIF orientation is applied first, as a photo viewer does; alpha is dropped.
- Channels follow the model (`to_channels`): grey is repeated for RGB models, colour becomes grey by
  ITU-R 601 luma (`LUMA`: Pillow's and torchvision's weights) for one-channel models.
- Resizing follows the manifest's rule (runtime.data.bilinear_matrix) and is done by Pillow as the image
  is decoded, in the image's own depth: 8-bit images round to whole grey levels (within 1 of the rule
  on the 0-255 scale; 1.5 for colour made grey, whose luma Pillow rounds too), 16-bit ones are resized
  as 32-bit floats (exact to float32) (tests/runtime/test_photos.py).
- `ImageFiles` holds paths only; opening the folder reads each file's header (size, mode), never its
  pixels, which are decoded when samples are taken (`files[idx]`): a folder larger than memory trains
  batch by batch.

Pillow is imported when an image is opened, so the runtime itself needs numpy + onnxruntime only.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Sequence

import numpy as np

from pockprop.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_GREY_MODES = {"1", "L", "LA", "La"}
_SIXTEEN_BIT = 65535.0
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _pil() -> Any:
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise DataError("reading images needs Pillow: pip install 'pockprop[images]'") from None
    return Image, ImageOps


def to_channels(x: np.ndarray, channels: int, source: str) -> np.ndarray:
    """(N, C', H, W) -> (N, channels, H, W): alpha dropped, grey repeated or colour reduced to luma."""
    if x.shape[1] == 4:
        x = x[:, :3]
    have = x.shape[1]
    if have == channels:
        return x
    if have == 1 and channels == 3:
        return np.repeat(x, 3, axis=1)
    if have == 3 and channels == 1:
        return np.einsum("c,nchw->nhw", LUMA, x.astype(np.float32, copy=False))[:, None]
    raise DataError(f"{source}: samples have {have} channels, the model expects {channels}")


def _pixels(im: Any, channels: int) -> tuple[Any, float]:
    """The image in a mode Pillow resizes (8-bit L or RGB, 32-bit float for deeper), and its full scale."""
    if im.mode == "F":
        raise DataError("a floating-point image: its value range is unknown; save it as 8- or 16-bit")
    if im.mode.startswith("I"):
        return im.convert("F"), _SIXTEEN_BIT
    mode = "L" if im.mode in _GREY_MODES or channels == 1 else "RGB"  # colour -> L: Pillow's luma, rounded
    return (im if im.mode == mode else im.convert(mode)), 255.0  # convert copies even to the same mode


def _resize(im: Any, size: tuple[int, int], antialias: bool) -> Any:
    Image, _ = _pil()
    (w_in, h_in), (h, w) = im.size, size
    if (h_in, w_in) == (h, w):
        return im
    bilinear = getattr(Image, "Resampling", Image).BILINEAR
    if antialias:  # Pillow's triangle filter widened by the shrink factor: torch's antialias=True
        return im.resize((w, h), bilinear)
    # point sampling at half-pixel centres, clamped at the edges: torch's antialias=False
    affine = getattr(Image, "Transform", Image).AFFINE
    return im.transform((w, h), affine, (w_in / w, 0, 0, 0, h_in / h, 0), resample=bilinear)


def decode(path: str, channels: int, size: tuple[int, int] | None = None, antialias: bool = False) -> np.ndarray:
    """One image file as float32 (channels, H, W) on the 0-255 scale, resized to `size` if given."""
    Image, ImageOps = _pil()
    try:
        with Image.open(path) as im:
            if im.getexif().get(0x0112, 1) != 1:  # exif_transpose copies the image even when upright
                im = ImageOps.exif_transpose(im)
            im, full = _pixels(im, channels)
            if size is not None:
                im = _resize(im, size, antialias)
            x = np.asarray(im, np.float32)
    except DataError as ex:
        raise DataError(f"{path}: {ex}") from None
    except Exception as ex:  # Pillow raises many types for a bad file; the file is what is wrong
        raise DataError(f"{path}: cannot decode image ({ex})") from None
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    if full != 255.0:
        if x.size and x.max() > full:
            raise DataError(f"{path}: a 32-bit integer image with values above 65535: its range is unknown")
        x = x * np.float32(255.0 / full)
    return to_channels(x[None], channels, path)[0]


def header_size(path: str) -> tuple[int, int]:
    """(height, width) as decoded (after EXIF rotation), read from the header without decoding pixels."""
    Image, _ = _pil()
    try:
        with Image.open(path) as im:
            w, h = im.size
            # only formats that keep EXIF in the header: Pillow decodes a PNG to find its eXIf chunk
            if im.format in ("JPEG", "MPO", "TIFF", "WEBP") and im.getexif().get(0x0112, 1) in _ROTATED:
                w, h = h, w
    except Exception as ex:  # Pillow raises many types for a bad file; the file is what is wrong
        raise DataError(f"{path}: cannot decode image ({ex})") from None
    return h, w


class ImageFiles:
    """Image samples by path: `files[idx]` decodes those (float32 (n, C, H, W), 0-255); nothing is cached."""

    ndim = 4
    dtype = np.dtype(np.float32)

    def __init__(self, paths: Sequence[str], channels: int, size: tuple[int, int], antialias: bool,
                 resize: bool) -> None:
        self.paths = list(paths)
        self.channels, self.size, self.antialias, self.resize = channels, tuple(size), antialias, resize

    @classmethod
    def index(cls, paths: Sequence[str], channels: int = 3, size: tuple[int, int] | None = None,
              antialias: bool = False) -> "ImageFiles":
        """Check every file's header; without a target `size` all images must have the same size."""
        first: tuple[int, int] | None = None
        for p in paths:
            hw = header_size(p)
            if first is None:
                first = hw
            elif size is None and hw != first:
                raise DataError(f"{p}: {hw[1]}x{hw[0]} pixels (WxH), the first image was {first[1]}x{first[0]}; "
                                "give the manifest a resize step")
        hw = (int(size[0]), int(size[1])) if size is not None else first or (0, 0)
        return cls(paths, channels, hw, antialias, resize=size is not None)

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"ImageFiles({len(self.paths)} files as {self.shape[1:]})"

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.paths), self.channels, *self.size)

    def _one(self, path: str) -> np.ndarray:
        x = decode(path, self.channels, self.size if self.resize else None, self.antialias)
        if x.shape[1:] != self.size:
            raise DataError(f"{path}: {x.shape[2]}x{x.shape[1]} pixels (WxH) once decoded, the others are "
                            f"{self.size[1]}x{self.size[0]}; give the manifest a resize step")
        return x

    def __getitem__(self, idx: Any) -> np.ndarray:
        if isinstance(idx, (int, np.integer)):
            return self._one(self.paths[idx])
        chosen = self.select(idx).paths
        out = np.empty((len(chosen), self.channels, *self.size), np.float32)
        for i, p in enumerate(chosen):
            out[i] = self._one(p)
        return out

    def select(self, idx: Any) -> "ImageFiles":
        """The files at `idx` (a slice or index array), still undecoded."""
        picked = self.paths[idx] if isinstance(idx, slice) else [self.paths[i] for i in np.asarray(idx).reshape(-1)]
        return ImageFiles(picked, self.channels, self.size, self.antialias, self.resize)

    def digest(self) -> str:
        """sha256 of the files' bytes in order, and of how they are decoded: identifies the samples."""
        h = hashlib.sha256(repr((self.channels, self.size, self.antialias, self.resize)).encode())
        for p in self.paths:
            one = hashlib.sha256()
            try:
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 20):
                        one.update(chunk)
            except OSError as ex:
                raise DataError(f"{p}: cannot read ({ex.strerror})") from None
            h.update(one.digest())
        return h.hexdigest()


def index_folder(path: str) -> tuple[list[str], list[int], list[str]]:
    """root/<class>/<image>: (image paths, label per image, class names); labels index the sorted names."""
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))
    if not classes:
        raise DataError(f"{path}: expected one sub-folder of images per class, found none")
    paths, labels = [], []
    for label, cls in enumerate(classes):
        folder = os.path.join(path, cls)
        for name in sorted(os.listdir(folder)):
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                paths.append(os.path.join(folder, name))
                labels.append(label)
    if not paths:
        raise DataError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders {classes}")
    return paths, labels, classes
