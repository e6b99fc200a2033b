"""Training data: VAE latents with their text conditioning, grouped into resolution buckets.

On disk a dataset is a `.safetensors` file, or a folder of them, holding `latents` [N, C, H, W] (ComfyUI LATENT
`samples`: raw VAE latents, NCHW; for video families [N, C, T, H, W], frames as an axis, where image latents
train as 1-frame videos; [N, C, 1, H, W], the one-frame latents ComfyUI keeps for families with a video VAE, is
read as [N, C, H, W]) and the conditioning fields the model's family needs (`ModelFamily.conditioning`;
`python -m jaxlora.inspect` lists them): `c_crossattn` [N or 1, T, D], often `pooled_output` [N or 1, P], and
per-sample numbers such as image sizes or guidance [N or 1] (`ModelFamily.number_fields`). A folder
written by ComfyUI's SaveTrainingDataset node (`shard_XXXX.pkl`) is read too. Files of different latent shapes
(frame count and size) become separate buckets, and a batch never mixes buckets.

A `.safetensors` dataset may also carry the empty caption's conditioning (what the text encoders give for ""),
which caption dropout trains with: `empty.c_crossattn` [1, T, D] and, for models with a pooled output,
`empty.pooled_output` [1, P]; the sample's other fields (sizes, guidance) stay its own.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from jaxlora.files import write_new_file
from jaxlora.models.diffusion import DiffusionModel
from jaxlora.models.family import UnknownLayoutError
from jaxlora.models.registry import describe_keys, find_family

SEQUENCE_FIELDS = {"c_crossattn": 3, "pooled_output": 2}  # name -> rank with the sample axis
EMPTY = "empty."  # key prefix of the empty caption's conditioning in a dataset file


class DatasetError(ValueError):
    """A dataset that cannot train this model; the message names the file, key or shape at fault."""


@dataclass(frozen=True)
class Bucket:
    """Samples of one latent shape. Conditioning arrays have one row per sample, or one row shared by all."""

    latents: np.ndarray
    conditioning: Mapping[str, np.ndarray]
    source: str = "arrays"
    empty: Mapping[str, np.ndarray] | None = None  # the empty caption's conditioning fields, one row each

    @property
    def size(self) -> int:
        return self.latents.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.latents.shape[1:])


@dataclass(frozen=True)
class Dataset:
    buckets: tuple[Bucket, ...]

    @property
    def size(self) -> int:
        return sum(bucket.size for bucket in self.buckets)


def _as_array(value) -> np.ndarray:
    array = np.asarray(value)
    return array.astype(np.float32) if array.dtype == ml_dtypes.bfloat16 else array


def make_bucket(
    latents, conditioning: Mapping | np.ndarray, source: str = "arrays", empty: Mapping | None = None
) -> Bucket:
    """Check one group of samples: latents [N, C, H, W] (or [N, C, T, H, W] video); each conditioning field with
    N rows or 1; the empty caption's fields (optional) one row each, among the conditioning's fields."""
    latents = _as_array(latents)
    if latents.ndim == 5 and latents.shape[2] == 1:
        latents = latents[:, :, 0]  # an image of a video-VAE family: ComfyUI's frame axis of 1
    if latents.ndim not in (4, 5):
        raise DatasetError(
            f"{source}: latents must be [N, C, H, W] (images) or [N, C, T, H, W] (videos), got shape {latents.shape}"
        )
    if not isinstance(conditioning, Mapping):
        conditioning = {"c_crossattn": conditioning}
    if "c_crossattn" not in conditioning:
        raise DatasetError(f"{source}: no `c_crossattn` (the text encoder's hidden states)")
    fields = {}
    for name, value in conditioning.items():
        value = _as_array(value)
        rank = SEQUENCE_FIELDS.get(name, 1)
        if value.ndim == rank - 1 and name in SEQUENCE_FIELDS:
            value = value[None]
        if value.ndim == 0:
            value = value.reshape(1)
        if value.ndim != rank:
            raise DatasetError(
                f"{source}: `{name}` must have {rank} dimensions with the sample first, got {value.shape}"
            )
        if value.shape[0] not in (1, latents.shape[0]):
            raise DatasetError(
                f"{source}: `{name}` has {value.shape[0]} entries for {latents.shape[0]} latents; use one per "
                "latent or a single one for all"
            )
        fields[name] = value
    if empty is not None:
        empty = make_bucket(latents[:1], empty, f"{source} (the empty caption)").conditioning
        for name, value in empty.items():
            if name not in fields or value.shape[0] != 1 or value.shape[-1] != fields[name].shape[-1]:
                raise DatasetError(
                    f"{source}: the empty caption's `{name}` {value.shape} must match a conditioning field of the "
                    f"samples ({', '.join(f'{k} {v.shape}' for k, v in fields.items())}) with one row"
                )
    return Bucket(latents, fields, source, empty)


def _rows(value: np.ndarray, count: int) -> np.ndarray:
    return np.broadcast_to(value, (count, *value.shape[1:])) if value.shape[0] == 1 else value


def _tile_tokens(context: np.ndarray, tokens: int) -> np.ndarray:
    """Repeat the token axis to `tokens` (a multiple): attention over repeated keys and values is unchanged,
    which is how ComfyUI batches captions of different lengths."""
    return np.tile(context, (1, tokens // context.shape[1], 1))


def merge_buckets(buckets: Sequence[Bucket]) -> tuple[Bucket, ...]:
    """One bucket per latent shape, in order of first appearance."""
    groups: dict[tuple, list[Bucket]] = {}
    for bucket in buckets:
        groups.setdefault(bucket.shape, []).append(bucket)
    merged = []
    for group in groups.values():
        if len(group) == 1:
            merged.append(group[0])
            continue
        names = set(group[0].conditioning)
        for bucket in group[1:]:
            if set(bucket.conditioning) != names:
                raise DatasetError(
                    f"{bucket.source} has conditioning {sorted(bucket.conditioning)} but {group[0].source} has "
                    f"{sorted(names)}: same-shaped files must carry the same fields"
                )
        tokens = math.lcm(*(b.conditioning["c_crossattn"].shape[1] for b in group))
        fields = {}
        for name in names:
            parts = [_rows(b.conditioning[name], b.size) for b in group]
            if name == "c_crossattn":
                parts = [_tile_tokens(p, tokens) for p in parts]
            fields[name] = np.concatenate(parts)
        latents = np.concatenate([b.latents for b in group])
        empty = group[0].empty if all(b.empty is not None for b in group) else None
        merged.append(Bucket(latents, fields, ", ".join(b.source for b in group), empty))
    return tuple(merged)


def make_dataset(latents, positive, empty: Mapping | None = None) -> Dataset:
    """The node's inputs as a dataset: `latents` [N, C, H, W] (or a list of such arrays, one bucket each) and
    `positive`, the conditioning: an array [N or 1, T, D] or a dict of fields (or a list matching `latents`);
    `empty`, the empty caption's conditioning fields for caption dropout (optional)."""
    if isinstance(latents, list | tuple):
        positives = positive if isinstance(positive, list | tuple) else [positive] * len(latents)
        if len(positives) != len(latents):
            raise DatasetError(f"{len(positives)} conditioning entries for {len(latents)} latent groups")
        buckets = [
            make_bucket(lat, pos, f"latents[{i}]", empty)
            for i, (lat, pos) in enumerate(zip(latents, positives, strict=True))
        ]
    else:
        buckets = [make_bucket(latents, positive, empty=empty)]
    return Dataset(merge_buckets(buckets))


def _read_safetensors(path: Path) -> Bucket:
    """The file's header is checked before any tensor is read, so a wrong file (a model checkpoint) is refused
    at once whatever its size."""
    try:
        with safe_open(path, framework="numpy") as f:
            keys = list(f.keys())
            if "latents" not in keys:
                raise _not_a_dataset(path, keys)
            tensors = {key: f.get_tensor(key) for key in keys}
    except (SafetensorError, OSError) as error:
        raise DatasetError(f"{path} is not a readable .safetensors file: {error}") from error
    latents = tensors.pop("latents")
    empty = {key[len(EMPTY) :]: tensors.pop(key) for key in list(tensors) if key.startswith(EMPTY)}
    return make_bucket(latents, tensors, str(path), empty or None)


def _not_a_dataset(path: Path, keys: list[str]) -> DatasetError:
    """The error for a file without `latents`: its keys in short, and what it is when it is a model."""
    try:
        family, _ = find_family(keys)
        hint = f"; it looks like a {family.name} checkpoint, not a dataset (are the model and dataset swapped?)"
    except UnknownLayoutError:
        hint = ""
    return DatasetError(f"{path} has no `latents` tensor (keys: {describe_keys(keys, 4)}){hint}")


def _read_comfy_folder(folder: Path) -> list[Bucket]:
    from jaxlora.train.comfy_dataset import read_comfy_dataset

    data = read_comfy_dataset(folder)
    return [
        make_bucket(latent[None], {k: np.asarray(v)[None] for k, v in cond.items()}, f"{folder} sample {i}")
        for i, (latent, cond) in enumerate(zip(data.latents, data.conditioning, strict=True))
    ]


def load_dataset(path: str | Path) -> Dataset:
    """A dataset from a .safetensors file, a folder of them, or a ComfyUI SaveTrainingDataset folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"permission denied: {path}")
    if path.is_file():
        return Dataset(merge_buckets([_read_safetensors(path)]))
    if any(path.glob("shard_*.pkl")):
        return Dataset(merge_buckets(_read_comfy_folder(path)))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise DatasetError(f"{path} holds neither .safetensors files nor ComfyUI shard_*.pkl files")
    return Dataset(merge_buckets([_read_safetensors(file) for file in files]))


def save_dataset(
    path: str | Path, latents: np.ndarray, c_crossattn: np.ndarray, empty: Mapping | None = None, **conditioning
) -> Path:
    """Write numpy arrays as a jaxlora dataset file (never over an existing file).

    `latents` [N, C, H, W] are raw VAE latents (not yet multiplied by the latent format's scale factor);
    `c_crossattn` [N or 1, T, D]; optional `pooled_output` [N or 1, P] and per-sample numbers (image sizes,
    `guidance`) as arrays [N or 1] or scalars. `empty`: the empty caption's `c_crossattn` (and `pooled_output`),
    for caption dropout, written as `empty.<field>`.
    """
    bucket = make_bucket(latents, {"c_crossattn": c_crossattn, **conditioning}, str(path), empty)
    tensors = {"latents": np.ascontiguousarray(bucket.latents)}
    tensors.update({k: np.ascontiguousarray(v) for k, v in bucket.conditioning.items()})
    tensors.update({EMPTY + k: np.ascontiguousarray(v) for k, v in (bucket.empty or {}).items()})
    return write_new_file(path, save(tensors))


def check_dataset(dataset: Dataset, model: DiffusionModel) -> None:
    """Refuse, with the file and field named, data this model cannot train on."""
    if dataset.size == 0:
        raise DatasetError("the dataset holds no samples")
    for bucket in dataset.buckets:
        if bucket.latents.ndim == 5 and not model.family.video:
            raise DatasetError(
                f"{bucket.source}: video latents {list(bucket.latents.shape)} for {model.variant.description}, "
                "an image model: it takes [N, C, H, W]"
            )
        channels = bucket.latents.shape[1]
        if channels != model.latent_channels:
            raise DatasetError(
                f"{bucket.source}: latents have {channels} channels, the model takes {model.latent_channels}"
            )
        for field in model.conditioning_fields:
            value = bucket.conditioning.get(field.name)
            if value is None or value.shape[-1] != field.width:
                found = "none" if value is None else f"{value.shape[-1]}-d"
                raise DatasetError(
                    f"{bucket.source}: {model.variant.description} needs {field.name} ({field.width}-d), found "
                    f"{found}: the {field.meaning} the model was trained with"
                )
        for name, values in {"latents": bucket.latents, **bucket.conditioning}.items():
            if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
                raise DatasetError(f"{bucket.source}: {name} contains NaN or infinite values")


def batch_size_warnings(dataset: Dataset, batch_size: int) -> list[str]:
    """Buckets smaller than the batch train on all their samples each step, fewer than asked: say so, rather
    than train silently on smaller batches."""
    return [
        f"batch_size {batch_size} is larger than the {bucket.size} samples of {bucket.source} (latents "
        f"{list(bucket.shape)}): its batches hold {bucket.size}"
        for bucket in dataset.buckets
        if bucket.size < batch_size
    ]


def device_arrays(
    bucket: Bucket, model: DiffusionModel, dtype: jnp.dtype, guidance: float | None = None, with_empty: bool = False
) -> dict[str, jnp.ndarray]:
    """What the train step reads: latents cast to the training dtype first (as ComfyUI does), then scaled by the
    latent format, channels last (NHWC; video NTHWC, an image a 1-frame video for a video model); and the
    network's keyword inputs (context, `y`, guidance) built by the model.
    `guidance` replaces the family's default for samples whose data carries none. `with_empty` adds "empty", the
    network inputs with the empty caption's fields (caption dropout); both contexts are then tiled to a common
    token length, as ComfyUI batches captions of different lengths."""
    latents = jnp.asarray(bucket.latents).astype(dtype)
    if model.family.video and latents.ndim == 4:
        latents = latents[:, :, None]
    latent_hw = bucket.shape[-2:]
    conditioning = dict(bucket.conditioning)
    arrays = {}
    if with_empty:
        empty = {**conditioning, **bucket.empty}
        tokens = math.lcm(conditioning["c_crossattn"].shape[1], empty["c_crossattn"].shape[1])
        conditioning["c_crossattn"] = _tile_tokens(conditioning["c_crossattn"], tokens)
        empty["c_crossattn"] = _tile_tokens(empty["c_crossattn"], tokens)
        arrays["empty"] = model.network_inputs(empty, latent_hw, dtype, guidance)
    return {
        "latents": jnp.moveaxis(model.latent_format.process_in(latents), 1, -1),
        **model.network_inputs(conditioning, latent_hw, dtype, guidance),
        **arrays,
    }
