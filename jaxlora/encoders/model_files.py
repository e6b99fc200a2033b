"""Where a diffusion model's VAE, text encoders and tokenizers come from: the checkpoint itself, or the files a
user names (ComfyUI's models/vae/ and models/text_encoders/, a tokenizer folder). Shared by datasets made from
images and by sample images during training, so both find and check the same files the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from jaxlora.encoders.loading import ROLE_SLOTS, VAE_SLOTS, MissingEncoderError, find_slot, load_vae
from jaxlora.encoders.prompts import find_tokenizer
from jaxlora.encoders.text import T5_ROLE, CaptionEncoder, TokenizerFiles, load_caption_encoder
from jaxlora.encoders.vae import AutoencoderKL
from jaxlora.models.checkpoint import read_index
from jaxlora.models.family import TextConditioning


@dataclass(frozen=True)
class EncoderFiles:
    """The model's checkpoint, a VAE file (None: the checkpoint's), text-encoder files searched before the
    checkpoint, and a tokenizer folder (None: fetched once from the hub)."""

    model: Path
    vae: Path | None = None
    text_encoders: tuple[Path, ...] = ()
    tokenizers: Path | None = None

    @classmethod
    def of(
        cls,
        model: str | Path,
        vae: str | Path | None = None,
        text_encoders: Sequence[str | Path] = (),
        tokenizers: str | Path | None = None,
    ) -> EncoderFiles:
        return cls(
            Path(model),
            Path(vae) if vae else None,
            tuple(Path(f) for f in text_encoders),
            Path(tokenizers) if tokenizers else None,
        )

    @property
    def all(self) -> list[Path]:
        """Every file the encoders come from (what a dataset's fingerprint covers)."""
        return [self.model, *([self.vae] if self.vae else []), *self.text_encoders]

    def check(self, recipe: TextConditioning) -> TokenizerFiles:
        """Refuse a missing VAE, text encoder or tokenizer by reading headers only; the tokenizers found."""
        vae_file = self.vae or self.model
        if find_slot(read_index(vae_file), VAE_SLOTS) is None:
            raise MissingEncoderError(
                f"{vae_file} has no VAE: pass --vae with the VAE file (ComfyUI keeps them in models/vae/)"
            )
        searched = (*self.text_encoders, self.model)
        for tower in recipe.towers:
            if not any(find_slot(read_index(f), ROLE_SLOTS[tower.role]) for f in searched):
                raise MissingEncoderError(
                    f"no {tower.role.upper()} text encoder in {', '.join(str(f) for f in searched)}: pass its file "
                    "with --text-encoders (ComfyUI keeps them in models/text_encoders/)"
                )
        kinds = {"t5" if tower.role == T5_ROLE else "clip" for tower in recipe.towers}
        return TokenizerFiles(**{kind: find_tokenizer(kind, self.tokenizers) for kind in kinds})

    def caption_encoder(self, recipe: TextConditioning, tokenizers: TokenizerFiles, dtype: str) -> CaptionEncoder:
        return load_caption_encoder(recipe, [*self.text_encoders, self.model], tokenizers, dtype)

    def load_vae(self, dtype: str) -> AutoencoderKL:
        return load_vae(self.vae or self.model, dtype)
