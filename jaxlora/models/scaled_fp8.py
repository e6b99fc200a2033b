"""ComfyUI's scaled-fp8 checkpoints (the `*_fp8_scaled.safetensors` files users download): float8 weights, each
with one float32 scale beside it, read as a quantized frozen base whose scales are the file's.

Two layouts are in use; both are read here. Sources, in ComfyUI: comfy/utils.py `convert_old_quants` (the legacy
layout and its conversion to the newer one), comfy/ops.py `mixed_precision_ops` (`Linear._load_from_state_dict`:
which keys a quantized layer consumes) and comfy/quant_ops.py `TensorCoreFP8Layout.dequantize` (the math).
- legacy (the files published through 2025): a marker tensor `<prefix>scaled_fp8` (empty; its dtype names the fp8
  format, float32 meaning e4m3), and beside each scaled linear weight `<layer>.scale_weight` (float32, one value)
  and optionally `<layer>.scale_input`. ComfyUI converts this to the newer layout on load.
- comfy_quant (since late 2025): beside each quantized weight a `<layer>.comfy_quant` uint8 tensor holding JSON
  (`{"format": "float8_e4m3fn", ...}`), `<layer>.weight_scale` and optionally `<layer>.input_scale`; or, instead of
  the `comfy_quant` tensors, the same per-layer JSON in the header's `_quantization_metadata` string
  (`{"layers": {<layer>: {...}}}`).
In both the weight stands for `stored.float() * scale`. Layers without a scale (norms, embeddings, often the first
and last linears) are stored wide and load as in any file. Input scales and `full_precision_matrix_mult` steer
ComfyUI's fp8 matmul kernels; the step here dequantizes each weight and multiplies wide, so they are read past.
Weights may be e4m3 or e5m2 (kept as stored either way; ComfyUI's legacy conversion labels every scaled layer e4m3
and notes that it knows of no e5m2 file). Other comfy_quant formats (nvfp4, int8, mxfp8) are refused, naming the
layer and the format.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING

from safetensors import safe_open

from jaxlora.models.family import CheckpointError

if TYPE_CHECKING:
    from jaxlora.models.checkpoint import CheckpointIndex

# comfy_quant format -> the safetensors dtype its weights are stored in
FP8_FORMATS = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
MARKER = "scaled_fp8"
CONFIG = ".comfy_quant"
# (weight-scale suffix, input-scale suffix) of the legacy layout, then of the comfy_quant one
SUFFIXES = ((".scale_weight", ".scale_input"), (".weight_scale", ".input_scale"))
SCALE_DTYPES = ("F32", "F16", "BF16")


class ScaledFp8Error(CheckpointError):
    pass


@dataclass(frozen=True)
class FileScales:
    """A checkpoint's scaled weights (file key of the weight -> file key of its scale), and every key that only
    describes the scaling (scales, input scales, comfy_quant, the marker): the loader reads past those."""

    scales: Mapping[str, str]
    auxiliary: frozenset[str]


def _layer_formats(index: CheckpointIndex) -> dict[str, str | None]:
    """layer key -> comfy_quant "format", from the `comfy_quant` tensors and the header's metadata."""
    configs = {}
    if "_quantization_metadata" in index.metadata:
        try:
            configs |= json.loads(index.metadata["_quantization_metadata"])["layers"]
        except (ValueError, KeyError, TypeError) as error:
            raise ScaledFp8Error(f"{index.path}: unreadable _quantization_metadata ({error})") from error
    keys = [key for key in index.shapes if key.endswith(CONFIG)]
    if keys:
        with safe_open(index.path, framework="numpy") as f:
            for key in keys:
                try:
                    configs[key[: -len(CONFIG)]] = json.loads(f.get_tensor(key).tobytes())
                except ValueError as error:
                    raise ScaledFp8Error(f"{index.path}: {key} is not JSON bytes ({error})") from error
    return {layer: conf.get("format") if isinstance(conf, dict) else None for layer, conf in configs.items()}


def _check_scale(index: CheckpointIndex, key: str, weight: str) -> None:
    if weight not in index.shapes:
        raise ScaledFp8Error(f"{index.path}: scale {key} has no weight {weight} beside it")
    if prod(index.shapes[key]) != 1 or index.dtypes[key] not in SCALE_DTYPES:
        raise ScaledFp8Error(
            f"{index.path}: {key} is {index.dtypes[key]} of shape {list(index.shapes[key])}; a weight's scale is one "
            "float (shape [] or [1]), one per tensor"
        )
    if index.dtypes[weight] not in FP8_FORMATS.values():
        raise ScaledFp8Error(
            f"{index.path}: {weight} is stored as {index.dtypes[weight]} but has a scale {key}; scales belong to "
            f"float8 weights ({', '.join(FP8_FORMATS.values())})"
        )


def find_scales(index: CheckpointIndex) -> FileScales:
    """The scaled weights of a checkpoint from its header (and its few small `comfy_quant` tensors), every scale
    checked: beside an fp8 weight, one value, and agreeing with the layer's comfy_quant format. A file without
    scales gives an empty `FileScales`."""
    scales, auxiliary = {}, set()
    for key in index.shapes:
        if key == MARKER or key.endswith("." + MARKER) or key.endswith(CONFIG):
            auxiliary.add(key)
        for scale_suffix, input_suffix in SUFFIXES:
            if key.endswith(input_suffix):
                auxiliary.add(key)
            elif key.endswith(scale_suffix):
                weight = key[: -len(scale_suffix)] + ".weight"
                _check_scale(index, key, weight)
                scales[weight] = key
                auxiliary.add(key)
    for layer, format_ in _layer_formats(index).items():
        weight = f"{layer}.weight"
        if format_ not in FP8_FORMATS:
            raise ScaledFp8Error(
                f"{index.path}: layer {layer} is quantized as {format_!r}; of ComfyUI's quantized formats only "
                f"scaled fp8 ({', '.join(FP8_FORMATS)}) is read"
            )
        if weight not in scales:
            raise ScaledFp8Error(f"{index.path}: layer {layer} is marked {format_} but has no scaled weight {weight}")
        if index.dtypes[weight] != FP8_FORMATS[format_]:
            raise ScaledFp8Error(f"{index.path}: {weight} is marked {format_} but stored as {index.dtypes[weight]}")
    return FileScales(scales, frozenset(auxiliary))
