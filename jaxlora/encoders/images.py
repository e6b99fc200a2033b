"""A folder of captioned images: finding them, checking them, and fitting them into aspect-ratio buckets.

Layout, as ComfyUI's image-folder loader and kohya read it: images (png, jpg, jpeg, webp) with a same-named `.txt`
caption beside each (a missing caption is the empty caption, with a warning); images in a sub-folder named
`N_name` count N times (kohya repeats). Every problem is reported with its file before anything is encoded.

Buckets keep about the target area (`resolution` squared) at the image's aspect ratio, with sides that are
multiples of `step` pixels (64: 8 latent pixels of an 8x VAE, which the networks' downsampling divides evenly);
each image goes to the bucket of the nearest aspect ratio, is scaled to cover it and centre-cropped (Pillow,
Lanczos). Images are never upscaled.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")
MAX_ASPECT = 4.0  # buckets span aspect ratios 1:4 to 4:1


class ImageFolderError(ValueError):
    """A folder that cannot become a dataset; the message names the file at fault."""


@dataclass(frozen=True)
class CaptionedImage:
    path: Path
    caption: str
    repeats: int
    size: tuple[int, int]  # (width, height) in pixels, as stored


@dataclass(frozen=True)
class Placement:
    """Where an image lands: its bucket (width, height) and the crop's top-left corner in the scaled image."""

    bucket: tuple[int, int]
    scaled: tuple[int, int]
    crop: tuple[int, int]


def _repeats(path: Path, root: Path) -> int:
    folder = path.parent.relative_to(root).parts
    match = REPEATS_FOLDER.match(folder[0]) if folder else None
    return int(match.group(1)) if match else 1


def scan_folder(root: str | Path) -> list[CaptionedImage]:
    """Every image under `root` with its caption and repeats, sorted by path; errors name the file."""
    root = Path(root)
    if not root.is_dir():
        raise ImageFolderError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise ImageFolderError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    stems = {p.with_suffix("") for p in images}
    orphans = [p for p in files if p.suffix == ".txt" and p.with_suffix("") not in stems]
    if orphans:
        raise ImageFolderError(
            f"caption without an image: {orphans[0]} (no {orphans[0].stem}.png/.jpg/.webp beside it)"
        )
    found = []
    for path in images:
        caption_file = path.with_suffix(".txt")
        if caption_file.is_file():
            caption = caption_file.read_text(encoding="utf-8").strip()
        else:
            warnings.warn(
                f"{path} has no caption file {caption_file.name}: trained with the empty caption", stacklevel=2
            )
            caption = ""
        found.append(CaptionedImage(path, caption, _repeats(path, root), _checked_size(path)))
    return found


def _checked_size(path: Path) -> tuple[int, int]:
    """The image's size after reading every pixel, so truncated files fail here and not halfway through encoding."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.size
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ImageFolderError(f"{path} is not a readable image: {error}") from error


def bucket_sizes(resolution: int, step: int = 64) -> list[tuple[int, int]]:
    """(width, height) buckets: for each width a multiple of `step`, the largest height (a multiple of `step`)
    whose area stays within resolution^2, aspect ratios from 1:4 to 4:1."""
    area = resolution * resolution
    buckets = []
    for width in range(step, int(resolution * math.sqrt(MAX_ASPECT)) + 1, step):
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= MAX_ASPECT:
            buckets.append((width, height))
    return buckets


def place(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> Placement:
    """The bucket of the nearest aspect ratio (in log scale), the covering scale and the centred crop."""
    width, height = size
    bucket = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - math.log(width / height)), -b[0] * b[1]))
    scale = max(bucket[0] / width, bucket[1] / height)
    scaled = (max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale)))
    crop = ((scaled[0] - bucket[0]) // 2, (scaled[1] - bucket[1]) // 2)
    return Placement(bucket, scaled, crop)


def check_sizes(images: Sequence[CaptionedImage], buckets: Sequence[tuple[int, int]], resolution: int) -> None:
    """Refuse, naming the file, an image that would have to be upscaled to fill its bucket."""
    for image in images:
        placement = place(image.size, buckets)
        if placement.scaled[0] > image.size[0] or placement.scaled[1] > image.size[1]:
            raise ImageFolderError(
                f"{image.path} is {image.size[0]}x{image.size[1]}, smaller than its {placement.bucket[0]}x"
                f"{placement.bucket[1]} bucket at resolution {resolution}: use a lower --resolution or a larger image"
            )


def load_pixels(image: CaptionedImage, placement: Placement) -> np.ndarray:
    """The image scaled and cropped to its bucket: [height, width, 3] float32 in [0, 1] (RGB; alpha dropped)."""
    with Image.open(image.path) as source:
        rgb = source.convert("RGB")
    if rgb.size != placement.scaled:
        rgb = rgb.resize(placement.scaled, Image.Resampling.LANCZOS)
    left, top = placement.crop
    rgb = rgb.crop((left, top, left + placement.bucket[0], top + placement.bucket[1]))
    return np.asarray(rgb, np.float32) / 255.0
