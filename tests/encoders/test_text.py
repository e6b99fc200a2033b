"""Captions to SDXL conditioning from a checkpoint holding both towers (CLIP-L in the transformers layout, bigG in
the OpenCLIP layout), against transformers' models on the same weights with ComfyUI's rules written out: the
penultimate layers side by side, prompt weights against the empty caption, bigG's pooled output of the first
chunk."""

import numpy as np
import torch
from safetensors.numpy import save_file

from jaxlora.encoders.clip import CLIPTextConfig, CLIPTextModel
from jaxlora.encoders.prompts import build_clip_bpe, clip_tokenizer, find_tokenizer, t5_tokenizer
from jaxlora.encoders.t5 import T5Config, T5Encoder
from jaxlora.encoders.text import TokenizerFiles, load_caption_encoder
from jaxlora.models.demo import random_network_tensors
from jaxlora.models.flux_family import FLUX_DEV, FLUX_FAMILY
from jaxlora.models.unet_family import SDXL, UNET_FAMILY
from tests.encoders.conftest import T5_PIECES
from tests.encoders.test_clip import open_clip_layout, relative_error, transformers_model
from tests.encoders.test_t5 import transformers_t5

VOCAB = 521  # the conftest tokenizer's size; its end-of-text id is the last
TINY_L = CLIPTextConfig(width=768, depth=3, mlp_width=256, vocab_size=VOCAB)
TINY_G = CLIPTextConfig(width=128, depth=3, mlp_width=256, vocab_size=VOCAB, projection=64)
TOLERANCE = 2e-5


def test_sdxl_captions_match_comfyui_rules(tokenizer_folder, tmp_path):
    l_tensors, g_tensors = (
        random_network_tensors(CLIPTextModel(TINY_L), 1),
        random_network_tensors(CLIPTextModel(TINY_G), 2),
    )
    checkpoint = tmp_path / "sdxl.safetensors"
    save_file(
        {f"conditioner.embedders.0.transformer.{k}": v for k, v in l_tensors.items()}
        | {f"conditioner.embedders.1.model.{k}": v for k, v in open_clip_layout(g_tensors, TINY_G.depth).items()},
        str(checkpoint),
    )
    bpe = build_clip_bpe(tokenizer_folder)
    recipe = UNET_FAMILY.text_conditioning(SDXL, None)
    encoder = load_caption_encoder(recipe, [checkpoint], TokenizerFiles(clip=bpe))
    captions = ["a red cat", "(dog:1.4) " + "cat " * 80]  # one chunk; two chunks with a weighted word
    ours = encoder.encode(captions)

    end = bpe.token_to_id("<|endoftext|>")
    towers = [
        (transformers_model(TINY_L, l_tensors, eos=end), clip_tokenizer(bpe, pad_with_end=True)),
        (transformers_model(TINY_G, g_tensors, eos=end), clip_tokenizer(bpe, pad_with_end=False)),
    ]
    for caption, fields in zip(captions, ours, strict=True):
        parts, pooled = [], None
        for model, tokenizer in towers:
            chunks = tokenizer.chunks(caption)
            rows = np.concatenate([chunks.tokens, tokenizer.empty()[None]]).astype(np.int64)
            with torch.no_grad():
                out = model(input_ids=torch.from_numpy(rows), output_hidden_states=True)
            hidden = out.hidden_states[-2].numpy()  # penultimate, no final norm
            z, z_empty = hidden[:-1].copy(), hidden[-1]
            for i, j in zip(*np.nonzero(chunks.weights != 1.0), strict=True):
                z[i, j] = (z[i, j] - z_empty[j]) * chunks.weights[i, j] + z_empty[j]
            parts.append(z.reshape(1, -1, z.shape[-1]))
            pooled = getattr(out, "text_embeds", None)
        expected = np.concatenate(parts, axis=-1)
        assert fields["c_crossattn"].shape == expected.shape == (1, 77 * len(chunks.tokens), 768 + 128)
        assert relative_error(fields["c_crossattn"], expected) <= TOLERANCE
        assert relative_error(fields["pooled_output"], pooled[:1].numpy()) <= TOLERANCE
    assert fields["c_crossattn"].shape[1] == 154


TINY_T5 = T5Config(width=64, depth=2, heads=4, head_width=16, mlp_width=96, vocab_size=len(T5_PIECES))


def test_flux_captions_match_comfyui_rules(tokenizer_folder, t5_tokenizer_folder, tmp_path):
    """Flux.1: T5's final states over rows padded to 256 tokens (longer captions longer), weights applied
    against the empty caption of the same length; CLIP-L's pooled output unprojected although the file has a
    projection."""
    l_config = CLIPTextConfig(width=768, depth=2, mlp_width=256, vocab_size=VOCAB, projection=32)
    l_tensors, t5_tensors = (
        random_network_tensors(CLIPTextModel(l_config), 1),
        random_network_tensors(T5Encoder(TINY_T5), 2),
    )
    save_file(l_tensors, str(tmp_path / "clip_l.safetensors"))
    save_file(t5_tensors, str(tmp_path / "t5xxl_fp16.safetensors"))
    tokenizers = TokenizerFiles(
        clip=find_tokenizer("clip", tokenizer_folder), t5=find_tokenizer("t5", t5_tokenizer_folder)
    )
    encoder = load_caption_encoder(
        FLUX_FAMILY.text_conditioning(FLUX_DEV, None),
        [tmp_path / "t5xxl_fp16.safetensors", tmp_path / "clip_l.safetensors"],
        tokenizers,
    )
    captions = ["a red cat", "(dog:0.5) " + "cat " * 300]
    ours = encoder.encode(captions)

    t5 = transformers_t5(TINY_T5, t5_tensors)
    clip = transformers_model(l_config, l_tensors, eos=tokenizers.clip.token_to_id("<|endoftext|>"))
    t5_rows, clip_rows = t5_tokenizer(tokenizers.t5, 256), clip_tokenizer(tokenizers.clip)
    for caption, fields in zip(captions, ours, strict=True):
        chunk = t5_rows.chunks(caption)
        length = chunk.tokens.shape[1]
        rows = np.stack([chunk.tokens[0], t5_rows.empty(length)]).astype(np.int64)
        with torch.no_grad():
            hidden = t5(input_ids=torch.from_numpy(rows)).last_hidden_state.numpy()
        z = np.where(
            chunk.weights[0, :, None] != 1, (hidden[0] - hidden[1]) * chunk.weights[0, :, None] + hidden[1], hidden[0]
        )
        assert fields["c_crossattn"].shape == (1, length, 64) and length == (256 if caption == "a red cat" else 302)
        assert relative_error(fields["c_crossattn"][0], z) <= TOLERANCE
        with torch.no_grad():
            first_row = torch.from_numpy(clip_rows.chunks(caption).tokens[:1].astype(np.int64))
            pooled = clip.text_model(input_ids=first_row).pooler_output  # before text_projection
        assert relative_error(fields["pooled_output"], pooled.numpy()) <= TOLERANCE
