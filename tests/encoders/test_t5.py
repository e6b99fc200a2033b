"""The T5 v1.1 encoder against transformers' T5EncoderModel on the same weights (fp32), with sequences longer than
the exact-distance range so the log-spaced position buckets are exercised."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file
from safetensors.torch import save_file as torch_save_file

from jaxlora.encoders.loading import MissingEncoderError, load_t5
from jaxlora.encoders.t5 import T5Config, T5Encoder
from jaxlora.models.demo import random_network_tensors
from tests.models.test_scaled_fp8 import scaled_checkpoint

TINY_T5 = T5Config(width=64, depth=3, heads=4, head_width=16, mlp_width=96, vocab_size=300)
TOLERANCE = 2e-5  # max |diff| relative to max |value|, fp32


def transformers_t5(config: T5Config, tensors: dict[str, np.ndarray]) -> torch.nn.Module:
    model = transformers.T5EncoderModel(
        transformers.T5Config(
            vocab_size=config.vocab_size,
            d_model=config.width,
            d_kv=config.head_width,
            d_ff=config.mlp_width,
            num_layers=config.depth,
            num_heads=config.heads,
            feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            dropout_rate=0.0,
            layer_norm_epsilon=1e-6,
        )
    ).eval()
    state = {k: torch.from_numpy(v) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight"}  # tied to `shared`
    return model


@pytest.mark.parametrize("prefix", ["", "text_encoders.t5xxl.transformer."])
def test_t5_matches_transformers(prefix, tmp_path):
    tensors = random_network_tensors(T5Encoder(TINY_T5), seed=5)
    tensors["shared.weight"] *= 10  # embeddings of real scale, so the norms see more than their epsilon
    path = tmp_path / "t5xxl.safetensors"
    save_file({prefix + k: v for k, v in tensors.items()}, str(path))
    ours = load_t5(path)
    assert ours.config == TINY_T5
    theirs = transformers_t5(TINY_T5, tensors)
    assert sum(p.numel() for p in theirs.parameters()) == sum(v.size for v in tensors.values())
    tokens = np.random.default_rng(0).integers(0, 300, (2, 200))  # offsets up to 199: beyond max_distance
    with torch.no_grad():
        expected = theirs(input_ids=torch.from_numpy(tokens)).last_hidden_state.numpy()
    got = np.asarray(ours(jnp.asarray(tokens)), np.float64)
    assert np.abs(got - expected).max() / np.abs(expected).max() <= TOLERANCE


def test_file_without_t5_names_what_to_pass(tmp_path):
    path = tmp_path / "clip_l.safetensors"
    save_file({"text_model.embeddings.token_embedding.weight": np.zeros((4, 4), np.float32)}, str(path))
    with pytest.raises(MissingEncoderError, match="t5xxl"):
        load_t5(path)


def test_fp8_stored_t5_loads_as_its_cast(tmp_path):
    """`t5xxl_fp8_e4m3fn.safetensors` as users download it: fp8 weights load, cast, equal to the same weights
    written in fp32 after the fp8 rounding."""
    tensors = random_network_tensors(T5Encoder(TINY_T5), seed=6)
    fp8 = {k: torch.from_numpy(v).to(torch.float8_e4m3fn) for k, v in tensors.items()}
    torch_save_file(fp8, str(tmp_path / "t5xxl_fp8_e4m3fn.safetensors"))
    save_file({k: v.float().numpy() for k, v in fp8.items()}, str(tmp_path / "rounded.safetensors"))
    ours, rounded = load_t5(tmp_path / "t5xxl_fp8_e4m3fn.safetensors"), load_t5(tmp_path / "rounded.safetensors")
    tokens = jnp.asarray(np.arange(40)[None] % 300)
    np.testing.assert_array_equal(ours(tokens), rounded(tokens))


def test_scaled_fp8_t5_loads_multiplied_by_its_scales(tmp_path):
    """`t5xxl_fp8_e4m3fn_scaled.safetensors` as ComfyUI publishes it (legacy layout, no prefix): the encoder
    computes exactly what the dequantized weights (torch: w8.float() * scale) written in fp32 compute."""
    wide = random_network_tensors(T5Encoder(TINY_T5), seed=6)
    tensors, metadata, dequantized = scaled_checkpoint("legacy", wide_tensors=wide, prefix="")
    assert "encoder.block.0.layer.0.SelfAttention.q.scale_weight" in tensors
    torch_save_file(tensors, str(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"), metadata=metadata)
    torch_save_file(dequantized, str(tmp_path / "dequantized.safetensors"))
    ours = load_t5(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors")
    tokens = jnp.asarray(np.arange(40)[None] % 300)
    np.testing.assert_array_equal(ours(tokens), load_t5(tmp_path / "dequantized.safetensors")(tokens))
