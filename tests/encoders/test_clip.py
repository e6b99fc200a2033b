"""CLIP text towers against transformers' CLIPTextModel / CLIPTextModelWithProjection on the same weights (fp32):
every layer ComfyUI selects, normed or not, and the pooled output at the first end-of-text token."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from jaxlora.encoders.clip import CLIPTextConfig, CLIPTextModel
from jaxlora.encoders.loading import MissingEncoderError, load_clip
from jaxlora.models.demo import random_network_tensors
from jaxlora.models.family import CheckpointError

# Width 768 is CLIP-L's (quick-GELU); 128 stands for the OpenCLIP towers (exact GELU) with a pooled projection.
TINY_L = CLIPTextConfig(width=768, depth=3, mlp_width=256, vocab_size=1000)
TINY_G = CLIPTextConfig(width=128, depth=3, mlp_width=256, vocab_size=1000, projection=64)
END = 999  # the end-of-text id of the tiny vocabularies (49407 in CLIP's)
TOLERANCE = 2e-5  # max |diff| relative to max |value|, fp32


def transformers_model(config: CLIPTextConfig, tensors: dict[str, np.ndarray], eos: int = END) -> torch.nn.Module:
    hf_config = transformers.CLIPTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.width,
        intermediate_size=config.mlp_width,
        num_hidden_layers=config.depth,
        num_attention_heads=config.heads,
        max_position_embeddings=config.positions,
        hidden_act="quick_gelu" if config.quick_gelu else "gelu",
        projection_dim=config.projection or config.width,
        bos_token_id=eos - 1,
        eos_token_id=eos,
        pad_token_id=1,
    )
    cls = transformers.CLIPTextModelWithProjection if config.projection else transformers.CLIPTextModel
    model = cls(hf_config).eval()
    # transformers' CLIPTextModel holds the tower's modules at its top level (the files' `text_model.` is its
    # checkpoint prefix); the projection variant keeps them under `text_model`.
    strip = "" if config.projection else "text_model."
    state = {k.removeprefix(strip): torch.from_numpy(v) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and {m.removeprefix("text_model.") for m in missing} <= {"embeddings.position_ids"}
    return model


def relative_error(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def token_batch(length: int = 77) -> np.ndarray:
    """Two captions as ComfyUI lays them out: start token, words, end token, then padding (end tokens for CLIP-L,
    0 for OpenCLIP: both appear, so the first end token must be the one pooled)."""
    rng = np.random.default_rng(3)
    tokens = np.full((2, length), END, np.int64)
    tokens[:, 0] = 998
    tokens[0, 1:6] = rng.integers(1, 990, 5)
    tokens[0, 6] = END
    tokens[1, 1:20] = rng.integers(1, 990, 19)
    tokens[1, 20] = END
    tokens[1, 21:] = 0
    return tokens


@pytest.mark.parametrize(
    ("config", "prefix"), [(TINY_L, "cond_stage_model.transformer."), (TINY_G, "")], ids=["clip-l", "open-clip"]
)
def test_clip_matches_transformers(config, prefix, tmp_path):
    tensors = random_network_tensors(CLIPTextModel(config), seed=4)
    path = tmp_path / "clip.safetensors"
    save_file(
        {prefix + k: v for k, v in tensors.items()}
        | {prefix + "text_model.embeddings.position_ids": np.arange(77)[None]},
        str(path),
    )
    ours = load_clip(path)
    assert ours.config == config
    theirs = transformers_model(config, tensors)
    assert sum(p.numel() for p in theirs.parameters()) == sum(v.size for v in tensors.values())

    tokens = token_batch()
    with torch.no_grad():
        out = theirs(input_ids=torch.from_numpy(tokens), output_hidden_states=True)
    final_norm = (theirs.text_model if config.projection else theirs).final_layer_norm
    for layer in (-1, -2, -config.depth):
        expected = out.hidden_states[layer]
        with torch.no_grad():
            normed = final_norm(expected)
        assert relative_error(ours(jnp.asarray(tokens), END, layer, normed_hidden=False).hidden, expected) <= TOLERANCE
        assert relative_error(ours(jnp.asarray(tokens), END, layer, normed_hidden=True).hidden, normed) <= TOLERANCE
    pooled = out.text_embeds if config.projection else out.pooler_output
    assert relative_error(ours(jnp.asarray(tokens), END).pooled, pooled) <= TOLERANCE


def test_layer_outside_the_tower_is_refused():
    with pytest.raises(ValueError, match="layer -4"):
        CLIPTextModel(TINY_G)(jnp.zeros((1, 77), jnp.int32), END, layer=-4)


def test_file_without_clip_names_what_to_pass(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": np.zeros((8, 3, 3, 3), np.float32)}, str(path))
    with pytest.raises(MissingEncoderError, match="models/text_encoders/"):
        load_clip(path)


def open_clip_layout(tensors: dict[str, np.ndarray], depth: int) -> dict[str, np.ndarray]:
    """The same tower as OpenCLIP stores it (written from OpenCLIP's module names: fused in_proj, c_fc/c_proj,
    ln_final, bare positional_embedding, text_projection as [width, out]), plus its logit_scale."""
    t = {k.removeprefix("text_model."): v for k, v in tensors.items()}
    out = {
        "token_embedding.weight": t["embeddings.token_embedding.weight"],
        "positional_embedding": t["embeddings.position_embedding.weight"],
        "ln_final.weight": t["final_layer_norm.weight"],
        "ln_final.bias": t["final_layer_norm.bias"],
        "text_projection": t["text_projection.weight"].T.copy(),
        "logit_scale": np.float32(4.6)[None],
    }
    for i in range(depth):
        layer, block = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for name in ("weight", "bias"):
            out[f"{block}attn.in_proj_{name}"] = np.concatenate(
                [t[f"{layer}self_attn.{p}_proj.{name}"] for p in "qkv"], axis=0
            )
            for ours, theirs in [
                ("layer_norm1", "ln_1"),
                ("layer_norm2", "ln_2"),
                ("self_attn.out_proj", "attn.out_proj"),
                ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj"),
            ]:
                out[f"{block}{theirs}.{name}"] = t[f"{layer}{ours}.{name}"]
    return out


def test_open_clip_layout_reads_as_the_same_tower(tmp_path):
    """SDXL's second encoder inside a checkpoint (OpenCLIP layout) loads to the very tower of the transformers
    layout, which matches transformers above."""
    tensors = random_network_tensors(CLIPTextModel(TINY_G), seed=6)
    reference = tmp_path / "clip_g.safetensors"
    save_file(tensors, str(reference))
    checkpoint = tmp_path / "sdxl.safetensors"
    prefix = "conditioner.embedders.1.model."
    save_file({prefix + k: v for k, v in open_clip_layout(tensors, TINY_G.depth).items()}, str(checkpoint))
    ours, expected = load_clip(checkpoint, role="g"), load_clip(reference, role="g")
    assert ours.config == TINY_G
    tokens = jnp.asarray(token_batch())
    for layer in (-1, -2):
        a, b = ours(tokens, END, layer, normed_hidden=False), expected(tokens, END, layer, normed_hidden=False)
        np.testing.assert_array_equal(a.hidden, b.hidden)
        np.testing.assert_array_equal(a.pooled, b.pooled)


def test_open_clip_tower_with_unknown_keys_is_refused(tmp_path):
    tensors = open_clip_layout(random_network_tensors(CLIPTextModel(TINY_G)), TINY_G.depth)
    tensors["transformer.resblocks.0.attn.extra_weight"] = np.zeros(3, np.float32)
    path = tmp_path / "sd2.safetensors"
    save_file({"cond_stage_model.model." + k: v for k, v in tensors.items()}, str(path))
    with pytest.raises(CheckpointError, match="extra_weight"):
        load_clip(path, role="h")
