"""Captions to SDXL conditioning from a checkpoint holding both towers (CLIP-L in the transformers layout, bigG in
the OpenCLIP layout), against transformers' models on the same weights with ComfyUI's rules written out: the
penultimate layers side by side, prompt weights against the empty caption, bigG's pooled output of the first
chunk."""

import numpy as np
import torch
from safetensors.numpy import save_file

from jaxlora.encoders.clip import CLIPTextConfig, CLIPTextModel
from jaxlora.encoders.clip_tokens import ClipTokenizer, build_clip_bpe
from jaxlora.encoders.text import load_caption_encoder
from jaxlora.models.demo import random_network_tensors
from jaxlora.models.unet_family import SDXL, UNET_FAMILY
from tests.encoders.test_clip import open_clip_layout, relative_error, transformers_model

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
    encoder = load_caption_encoder(recipe, [checkpoint], bpe)
    captions = ["a red cat", "(dog:1.4) " + "cat " * 80]  # one chunk; two chunks with a weighted word
    ours = encoder.encode(captions)

    end = bpe.token_to_id("<|endoftext|>")
    towers = [
        (transformers_model(TINY_L, l_tensors, eos=end), ClipTokenizer(bpe, pad_with_end=True)),
        (transformers_model(TINY_G, g_tensors, eos=end), ClipTokenizer(bpe, pad_with_end=False)),
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
