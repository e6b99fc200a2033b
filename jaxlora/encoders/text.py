"""Captions to a family's text conditioning (`c_crossattn`, `pooled_output`) as ComfyUI's CLIPTextEncode gives it.

The family says which towers and layers (`ModelFamily.text_conditioning`); the towers come from the checkpoint or
from text-encoder files; the tokenizer from a folder of tokenizer files. All chunks of all captions (and the
empty caption, the reference of prompt weights) run through each tower in fixed-size jitted batches, so one
compile serves a whole dataset whatever the caption lengths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.encoders.clip import CLIPTextModel
from jaxlora.encoders.clip_tokens import ClipTokenizer, TokenChunks
from jaxlora.encoders.loading import MissingEncoderError, load_clip
from jaxlora.models.family import TextConditioning, TextTower

ROWS_PER_CALL = 8  # chunks per encoder call: a fixed batch, so every dataset compiles each tower once


def _tower_function(model: CLIPTextModel, tower: TextTower, end: int) -> Callable[[np.ndarray], tuple]:
    """tokens [ROWS_PER_CALL, 77] -> (hidden, pooled) as numpy, jitted with the weights as an argument."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens):
        out = nnx.merge(graphdef, state)(tokens, end, tower.layer, tower.normed)
        return out.hidden.astype(jnp.float32), out.pooled.astype(jnp.float32)

    return lambda tokens: tuple(np.asarray(a) for a in run(state, jnp.asarray(tokens)))


@dataclass
class _Tower:
    spec: TextTower
    tokenizer: ClipTokenizer
    run: Callable[[np.ndarray], tuple]

    def encode(self, captions: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per caption: hidden states [1, 77 x chunks, D] with ComfyUI's prompt weights applied, and the pooled
        output [1, P] of its first chunk."""
        chunks = [self.tokenizer.chunks(caption) for caption in captions]
        empty = self.tokenizer.empty()
        rows = np.concatenate([c.tokens for c in chunks] + [empty[None]])
        padding = -len(rows) % ROWS_PER_CALL
        rows = np.concatenate([rows, np.broadcast_to(empty, (padding, empty.size))])
        outputs = [self.run(rows[i : i + ROWS_PER_CALL]) for i in range(0, len(rows), ROWS_PER_CALL)]
        hidden = np.concatenate([h for h, _ in outputs])
        pooled = np.concatenate([p for _, p in outputs])
        empty_hidden = hidden[len(rows) - padding - 1]
        results, start = [], 0
        for chunk in chunks:
            count = len(chunk.tokens)
            z = _weighted(hidden[start : start + count], chunk, empty_hidden)
            results.append((z.reshape(1, -1, z.shape[-1]), pooled[start : start + 1]))
            start += count
        return results


def _weighted(hidden: np.ndarray, chunk: TokenChunks, empty_hidden: np.ndarray) -> np.ndarray:
    """ComfyUI's prompt weights: a weighted token's state moves away from the empty caption's by its weight."""
    weights = chunk.weights[..., None]
    return np.where(weights != 1.0, (hidden - empty_hidden) * weights + empty_hidden, hidden)


class CaptionEncoder:
    """Encodes captions for one family variant: `encode(captions)` gives per caption the dataset fields."""

    def __init__(self, recipe: TextConditioning, towers: dict[str, tuple[CLIPTextModel, ClipTokenizer]]):
        self.recipe = recipe
        self.towers = [
            _Tower(spec, towers[spec.role][1], _tower_function(towers[spec.role][0], spec, towers[spec.role][1].end))
            for spec in recipe.towers
        ]

    def encode(self, captions: Sequence[str]) -> list[dict[str, np.ndarray]]:
        per_tower = [tower.encode(captions) for tower in self.towers]
        fields = []
        for i in range(len(captions)):
            encoded = {"c_crossattn": np.concatenate([out[i][0] for out in per_tower], axis=-1)}
            if self.recipe.pooled_from is not None:
                index = [t.spec.role for t in self.towers].index(self.recipe.pooled_from)
                encoded["pooled_output"] = per_tower[index][i][1]
            fields.append(encoded)
        return fields


def load_caption_encoder(
    recipe: TextConditioning,
    files: Sequence[str | Path],
    bpe,
    dtype: str = "fp32",
) -> CaptionEncoder:
    """The towers of `recipe`, each from the first of `files` that holds it (text-encoder files first, then the
    checkpoint), with `bpe` (`clip_tokens.build_clip_bpe`) as their tokenizer."""
    towers = {}
    for spec in recipe.towers:
        for path in files:
            try:
                model = load_clip(path, spec.role, dtype)
            except MissingEncoderError:
                continue
            towers[spec.role] = (model, ClipTokenizer(bpe, spec.pad_with_end))
            break
        else:
            names = ", ".join(str(p) for p in files)
            raise MissingEncoderError(
                f"no CLIP-{spec.role.upper()} text encoder in {names}: pass its file with --text-encoders "
                "(ComfyUI keeps them in models/text_encoders/)"
            )
    return CaptionEncoder(recipe, towers)
