"""Captions to a family's text conditioning (`c_crossattn`, `pooled_output`) as ComfyUI's CLIPTextEncode gives it.

The family says which towers and layers (`ModelFamily.text_conditioning`); the towers come from the checkpoint or
from text-encoder files; the tokenizers from tokenizer files. All rows of all captions (and the empty caption,
the reference of prompt weights) run through each tower in fixed-size jitted batches, so one compile serves a
whole dataset (T5 rows longer than the minimum compile once per length: ComfyUI attends over T5 padding without
a mask, so padding rows to a common length would change the numbers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tokenizers import Tokenizer

from jaxlora.encoders.clip import CLIPTextModel
from jaxlora.encoders.loading import MissingEncoderError, load_clip, load_t5
from jaxlora.encoders.prompts import PromptTokenizer, TokenChunks, clip_tokenizer, t5_tokenizer
from jaxlora.encoders.t5 import T5Encoder
from jaxlora.models.family import TextConditioning, TextTower

ROWS_PER_CALL = 8  # token rows per encoder call: a fixed batch, so every dataset compiles each tower once
T5_ROLE = "t5"


def _tower_function(model: CLIPTextModel | T5Encoder, tower: TextTower, end: int) -> Callable[[np.ndarray], tuple]:
    """tokens [ROWS_PER_CALL, T] -> (hidden, pooled or None) as numpy, jitted with the weights as an argument."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens):
        network = nnx.merge(graphdef, state)
        if isinstance(network, T5Encoder):
            return network(tokens).astype(jnp.float32), None
        out = network(tokens, end, tower.layer, tower.normed, projected=tower.projected)
        return out.hidden.astype(jnp.float32), out.pooled.astype(jnp.float32)

    def call(tokens: np.ndarray) -> tuple:
        hidden, pooled = run(state, jnp.asarray(tokens))
        return np.asarray(hidden), None if pooled is None else np.asarray(pooled)

    return call


@dataclass
class _Tower:
    spec: TextTower
    tokenizer: PromptTokenizer
    run: Callable[[np.ndarray], tuple]

    def encode(self, captions: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Per caption: hidden states [1, tokens, D] with ComfyUI's prompt weights applied, and the pooled
        output [1, P] of its first row (None for T5)."""
        chunks = [self.tokenizer.chunks(caption) for caption in captions]
        results: list = [None] * len(captions)
        for length in sorted({chunk.tokens.shape[1] for chunk in chunks}):
            members = [i for i, chunk in enumerate(chunks) if chunk.tokens.shape[1] == length]
            empty = self.tokenizer.empty(length)
            rows = np.concatenate([chunks[i].tokens for i in members] + [empty[None]])
            empty_row = len(rows) - 1
            rows = np.concatenate([rows, np.broadcast_to(empty, (-len(rows) % ROWS_PER_CALL, length))])
            outputs = [self.run(rows[i : i + ROWS_PER_CALL]) for i in range(0, len(rows), ROWS_PER_CALL)]
            hidden = np.concatenate([h for h, _ in outputs])
            pooled = None if outputs[0][1] is None else np.concatenate([p for _, p in outputs])
            start = 0
            for i in members:
                count = len(chunks[i].tokens)
                z = _weighted(hidden[start : start + count], chunks[i], hidden[empty_row])
                results[i] = (z.reshape(1, -1, z.shape[-1]), None if pooled is None else pooled[start : start + 1])
                start += count
        return results


def _weighted(hidden: np.ndarray, chunk: TokenChunks, empty_hidden: np.ndarray) -> np.ndarray:
    """ComfyUI's prompt weights: a weighted token's state moves away from the empty caption's by its weight."""
    weights = chunk.weights[..., None]
    return np.where(weights != 1.0, (hidden - empty_hidden) * weights + empty_hidden, hidden)


class CaptionEncoder:
    """Encodes captions for one family variant: `encode(captions)` gives per caption the dataset fields."""

    def __init__(self, recipe: TextConditioning, towers: dict[str, tuple[CLIPTextModel | T5Encoder, PromptTokenizer]]):
        self.recipe = recipe
        self.towers = []
        for spec in recipe.towers:
            model, tokenizer = towers[spec.role]
            self.towers.append(_Tower(spec, tokenizer, _tower_function(model, spec, tokenizer.end)))

    def encode(self, captions: Sequence[str]) -> list[dict[str, np.ndarray]]:
        per_tower = {tower.spec.role: (tower.spec, tower.encode(captions)) for tower in self.towers}
        fields = []
        for i in range(len(captions)):
            hidden = [out[i][0] for spec, out in per_tower.values() if spec.hidden]
            encoded = {"c_crossattn": np.concatenate(hidden, axis=-1)}
            if self.recipe.pooled_from is not None:
                encoded["pooled_output"] = per_tower[self.recipe.pooled_from][1][i][1]
            fields.append(encoded)
        return fields


@dataclass(frozen=True)
class TokenizerFiles:
    """The tokenizers of the two kinds of towers, built with `prompts.build_clip_bpe` / `tokenizers` from files."""

    clip: Tokenizer | None = None
    t5: Tokenizer | None = None


def _tokenizer(spec: TextTower, tokenizers: TokenizerFiles) -> PromptTokenizer:
    bpe = tokenizers.t5 if spec.role == T5_ROLE else tokenizers.clip
    if bpe is None:
        raise MissingEncoderError(f"no {'T5' if spec.role == T5_ROLE else 'CLIP'} tokenizer was given")
    if spec.role == T5_ROLE:
        return t5_tokenizer(bpe, spec.min_length)
    return clip_tokenizer(bpe, spec.pad_with_end)


def load_caption_encoder(
    recipe: TextConditioning, files: Sequence[str | Path], tokenizers: TokenizerFiles, dtype: str = "fp32"
) -> CaptionEncoder:
    """The towers of `recipe`, each from the first of `files` that holds it (text-encoder files first, then the
    checkpoint), with their tokenizers."""
    towers = {}
    for spec in recipe.towers:
        load = load_t5 if spec.role == T5_ROLE else lambda path, dtype, role=spec.role: load_clip(path, role, dtype)
        for path in files:
            try:
                model = load(path, dtype)
            except MissingEncoderError:
                continue
            towers[spec.role] = (model, _tokenizer(spec, tokenizers))
            break
        else:
            raise MissingEncoderError(
                f"no {spec.role.upper()} text encoder in {', '.join(str(p) for p in files)}: pass its file with "
                "--text-encoders (ComfyUI keeps them in models/text_encoders/)"
            )
    return CaptionEncoder(recipe, towers)
