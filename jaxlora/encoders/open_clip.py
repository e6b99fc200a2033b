"""OpenCLIP-layout text towers (`cond_stage_model.model.`, `conditioner.embedders.1.model.` in checkpoints) read
as the transformers layout `clip.py` builds.

The two layouts hold the same numbers: OpenCLIP fuses q, k and v into `attn.in_proj_weight` (rows q, k, v), names
the MLP `c_fc`/`c_proj`, stores the position table without `.weight` and the pooled projection as [width, out]
(`x @ text_projection`). A `TensorView` answers transformers keys from such a file, so the ordinary loader
checks and reads it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from jaxlora.models.family import UnknownLayoutError, key_indices

OPEN_CLIP_MARKER = "transformer.resblocks.0.attn.in_proj_weight"
_LAYER = "text_model.encoder.layers.{i}."
_BLOCK = "transformer.resblocks.{i}."
# (transformers name, OpenCLIP name) within a layer, for tensors stored alike.
_SAME_IN_LAYER = (
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("self_attn.out_proj", "attn.out_proj"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
)
_QKV = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class Source:
    """Where a transformers-layout tensor comes from: the OpenCLIP key, and the function of that tensor."""

    key: str
    convert: Callable[[np.ndarray], np.ndarray] = lambda array: array
    shape: Callable[[tuple[int, ...]], tuple[int, ...]] = lambda shape: shape


def _thirds(part: int) -> tuple[Callable, Callable]:
    return (lambda array: array[part * array.shape[0] // 3 : (part + 1) * array.shape[0] // 3]), (
        lambda shape: (shape[0] // 3, *shape[1:])
    )


def open_clip_sources(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Source]:
    """Every transformers key of the tower whose un-prefixed OpenCLIP `shapes` are given, with its source."""
    sources = {
        "text_model.embeddings.token_embedding.weight": Source("token_embedding.weight"),
        "text_model.embeddings.position_embedding.weight": Source("positional_embedding"),
        "text_model.final_layer_norm.weight": Source("ln_final.weight"),
        "text_model.final_layer_norm.bias": Source("ln_final.bias"),
    }
    if "text_projection" in shapes:
        sources["text_projection.weight"] = Source("text_projection", np.transpose, lambda shape: shape[::-1])
    for i in key_indices(shapes, r"transformer\.resblocks\.(\d+)\."):
        layer, block = _LAYER.format(i=i), _BLOCK.format(i=i)
        for ours, theirs in _SAME_IN_LAYER:
            for name in ("weight", "bias"):
                sources[f"{layer}{ours}.{name}"] = Source(f"{block}{theirs}.{name}")
        for part, projection in enumerate(_QKV):
            convert, shape = _thirds(part)
            sources[f"{layer}self_attn.{projection}.weight"] = Source(f"{block}attn.in_proj_weight", convert, shape)
            sources[f"{layer}self_attn.{projection}.bias"] = Source(f"{block}attn.in_proj_bias", convert, shape)
    return sources


OPEN_CLIP_EXTRAS = ("logit_scale",)  # stored beside the tower, not part of it


def transformers_shapes(own: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The transformers-layout shapes of an OpenCLIP tower given its un-prefixed `own` shapes; an error naming any
    OpenCLIP key that no transformers tensor reads (a layout this module does not know)."""
    sources = open_clip_sources(own)
    unread = set(own) - {source.key for source in sources.values()} - set(OPEN_CLIP_EXTRAS)
    if unread:
        raise UnknownLayoutError(f"OpenCLIP text tower with keys this loader does not know: {sorted(unread)[:8]}")
    return {key: source.shape(own[source.key]) for key, source in sources.items() if source.key in own}


class TensorView:
    """An open safetensors file holding an OpenCLIP tower under `prefix`, read under transformers keys."""

    def __init__(self, file, prefix: str, own: Mapping[str, tuple[int, ...]]):
        self.file = file
        self.prefix = prefix
        self.sources = open_clip_sources(own)

    def get_tensor(self, key: str) -> np.ndarray:
        source = self.sources[key]
        return np.ascontiguousarray(source.convert(self.file.get_tensor(self.prefix + source.key)))
