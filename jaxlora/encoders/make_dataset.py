"""A folder of captioned images -> a jaxlora dataset folder (one `.safetensors` file per bucket), encoded in JAX.

Everything that can be wrong is checked before any weight is read: the images and captions (`images.py`), the
family's support for captions, the VAE and every text encoder the family needs (in the checkpoint or the files
given), the tokenizer files. Then the VAE encodes each bucket in fixed-size jitted batches, the text towers
encode the captions, and the folder is written under a temporary name and renamed into place: a reader never
sees half a dataset. A `dataset.json` records what the folder was made from; the same images, captions, files
and settings find the folder already made and re-use it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.encoders.images import CaptionedImage, bucket_sizes, check_sizes, load_pixels, place, scan_folder
from jaxlora.encoders.model_files import EncoderFiles
from jaxlora.encoders.vae import AutoencoderKL, encode
from jaxlora.files import PARTIAL, folder_lock, write_new_file
from jaxlora.models.diffusion import load_model
from jaxlora.train.data import save_dataset

FORMAT = 2  # bump when the written data would differ for the same inputs (2: the empty caption's fields)
MANIFEST = "dataset.json"
IMAGES_PER_CALL = 4  # VAE batch: fixed, so each bucket compiles once
TILE_LIMIT = 4  # captions of different lengths tile to their lcm; beyond 4x the longest, ComfyUI refuses too


@dataclass(frozen=True)
class ImageDatasetSettings:
    """How images become latents: the bucket resolution and side step in pixels, the encoders' weight dtype."""

    resolution: int = 512
    step: int = 64
    dtype: str = "fp32"

    def __post_init__(self):
        if self.resolution < self.step or self.resolution % 8:
            raise ValueError(f"resolution {self.resolution} must be a multiple of 8 and at least {self.step}")


def _file_identity(path: Path) -> str:
    """Name, size and a hash of the first and last MiB: enough to tell model files apart without reading GBs."""
    digest = hashlib.sha256(f"{path.name}:{path.stat().st_size}".encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        digest.update(f.read())
    return digest.hexdigest()


def fingerprint(images: Sequence[CaptionedImage], files: Sequence[Path], settings: ImageDatasetSettings) -> str:
    """What the dataset is made from: every image's bytes, caption and repeats, the encoder files, the settings."""
    digest = hashlib.sha256(json.dumps({"format": FORMAT, **asdict(settings)}, sort_keys=True).encode())
    for image in images:
        digest.update(hashlib.sha256(image.path.read_bytes()).digest())
        digest.update(json.dumps([image.caption, image.repeats]).encode())
    for path in files:
        digest.update(_file_identity(path).encode())
    return digest.hexdigest()


def _vae_function(vae: AutoencoderKL) -> Callable[[np.ndarray], np.ndarray]:
    """NHWC images [IMAGES_PER_CALL, H, W, 3] in [0, 1] -> raw latents NCHW, jitted, weights as an argument."""
    graphdef, state = nnx.split(vae)

    @jax.jit
    def run(state, images):
        latents = encode(nnx.merge(graphdef, state), images)
        return jnp.transpose(latents, (0, 3, 1, 2)).astype(jnp.float32)

    return lambda images: np.asarray(run(state, jnp.asarray(images, jnp.float32)))


def make_image_dataset(
    images_folder: str | Path,
    model_path: str | Path,
    out: str | Path,
    tokenizers: str | Path | None,
    settings: ImageDatasetSettings = ImageDatasetSettings(),
    vae_path: str | Path | None = None,
    text_encoders: Sequence[str | Path] = (),
    progress: Callable[[str], None] = print,
    name_by_inputs: bool = False,
) -> Path:
    """Encode `images_folder` for the model at `model_path` into the dataset folder `out` and return it; a folder
    already made there from the same inputs is re-used, a different one is never overwritten. `tokenizers`: a
    folder with the tokenizer files (`prompts.find_tokenizer`; None: fetched once from the hub). With
    `name_by_inputs`, `out` is a parent folder and the dataset gets a folder named after the images folder and a
    digest of the inputs, so each set of inputs has its own."""
    out = Path(out)
    sources = EncoderFiles.of(model_path, vae_path, text_encoders, tokenizers)
    model = load_model(sources.model, weights=False)  # the header: family, variant, config
    recipe = model.family.text_conditioning(model.variant, model.network.config)
    images = scan_folder(images_folder)
    buckets = bucket_sizes(settings.resolution, settings.step)
    check_sizes(images, buckets, settings.resolution)
    found = sources.check(recipe)
    made_from = fingerprint(images, sources.all, settings)
    if name_by_inputs:
        out = out / f"{Path(images_folder).resolve().name}_{made_from[:12]}"
    if (out / MANIFEST).is_file():
        if json.loads((out / MANIFEST).read_text())["fingerprint"] == made_from:
            progress(f"{out}: already made from these images, captions, files and settings; re-used")
            return out
        raise FileExistsError(f"{out} holds a dataset made from other inputs; jaxlora never overwrites: choose another")
    if out.exists():
        raise FileExistsError(f"{out} exists and is not a jaxlora image dataset; choose another folder")

    *captions, empty = sources.caption_encoder(recipe, found, settings.dtype).encode(
        [image.caption for image in images] + [""]  # the empty caption: what caption dropout trains with
    )
    vae = _vae_function(sources.load_vae(settings.dtype))
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(place(image.size, buckets).bucket, []).append(i)

    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.parent / f".{out.name}.{secrets.token_hex(6)}{PARTIAL}"
    scratch.mkdir()
    try:
        with folder_lock(scratch):
            written = []
            for (width, height), members in sorted(groups.items()):
                latents = _encode_bucket([images[i] for i in members], buckets, vae, progress)
                fields = _bucket_fields([images[i] for i in members], [captions[i] for i in members], buckets, model)
                repeats = np.repeat(np.arange(len(members)), [images[i].repeats for i in members])
                name = f"bucket_{width}x{height}.safetensors"
                fields = {k: v[repeats] for k, v in fields.items()}
                save_dataset(scratch / name, latents[repeats], empty=empty, **fields)
                written.append(
                    {
                        "file": name,
                        "width": width,
                        "height": height,
                        "images": len(members),
                        "samples": int(repeats.size),
                    }
                )
            manifest = {"fingerprint": made_from, "format": FORMAT, "settings": asdict(settings), "buckets": written}
            write_new_file(scratch / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        (scratch / ".lock").unlink()
        if out.exists():
            raise FileExistsError(f"{out} appeared while encoding; jaxlora never overwrites it")
        os.rename(scratch, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    sizes = ", ".join(f"{b['width']}x{b['height']}" for b in written)
    progress(f"{out}: {sum(b['samples'] for b in written)} samples in {len(written)} buckets ({sizes})")
    return out


def _encode_bucket(members: Sequence[CaptionedImage], buckets, vae, progress) -> np.ndarray:
    """Raw latents [N, C, h, w] of one bucket's images, in fixed-size batches (the last padded)."""
    latents = []
    for start in range(0, len(members), IMAGES_PER_CALL):
        batch = [load_pixels(image, place(image.size, buckets)) for image in members[start : start + IMAGES_PER_CALL]]
        count = len(batch)
        batch += [batch[-1]] * (IMAGES_PER_CALL - count)
        latents.append(vae(np.stack(batch))[:count])
        progress(f"encoded {start + count}/{len(members)} images of {members[0].path.parent}")
    return np.concatenate(latents)


def _bucket_fields(
    members: Sequence[CaptionedImage], captions: Sequence[dict], buckets, model
) -> dict[str, np.ndarray]:
    """Per-sample conditioning: caption fields (token axis tiled to a common length, which leaves attention
    unchanged) and the image-size numbers the family declares (original size, crop corner, bucket size)."""
    lengths = sorted({c["c_crossattn"].shape[1] for c in captions})
    tokens = math.lcm(*lengths)
    if tokens > TILE_LIMIT * lengths[-1]:
        long = [str(m.path) for m, c in zip(members, captions, strict=True) if c["c_crossattn"].shape[1] != lengths[0]]
        raise ValueError(
            f"captions of {' and '.join(map(str, lengths))} tokens in one bucket would be tiled to {tokens} tokens "
            f"(ComfyUI would not batch them either): shorten these captions to fit {lengths[0]} tokens: "
            + ", ".join(long[:5])
        )
    fields = {
        "c_crossattn": np.concatenate(
            [np.tile(c["c_crossattn"], (1, tokens // c["c_crossattn"].shape[1], 1)) for c in captions]
        )
    }
    if "pooled_output" in captions[0]:
        fields["pooled_output"] = np.concatenate([c["pooled_output"] for c in captions])
    geometry = {name: [] for name in ("height", "width", "crop_h", "crop_w", "target_height", "target_width")}
    for image in members:
        placement = place(image.size, buckets)
        geometry["height"].append(image.size[1])
        geometry["width"].append(image.size[0])
        geometry["crop_h"].append(placement.crop[1])
        geometry["crop_w"].append(placement.crop[0])
        geometry["target_height"].append(placement.bucket[1])
        geometry["target_width"].append(placement.bucket[0])
    for name in model.family.number_fields:
        if name in geometry:
            fields[name] = np.asarray(geometry[name], np.float32)
    return fields
