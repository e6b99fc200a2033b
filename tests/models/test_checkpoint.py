"""Loading checkpoints: prefixes, dtypes, v-prediction detection, and every error path of the loader."""

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxlora import load_model
from jaxlora.models.checkpoint import KeyMismatchError, ShapeMismatchError, torch_parameters
from jaxlora.models.demo import random_tensors
from jaxlora.models.family import CheckpointError, UnknownLayoutError
from jaxlora.models.unet import UNetConfig
from tests.models.tiny_unets import FAMILIES

PREFIX = "model.diffusion_model."


@pytest.fixture(scope="module")
def sd1_tensors():
    return random_tensors(FAMILIES["sd1"].config, seed=2)


def write(tmp_path, tensors, prefix=PREFIX, name="model.safetensors"):
    path = tmp_path / name
    save_file({prefix + key: value for key, value in tensors.items()}, str(path))
    return path


def parameters(model):
    return {key: np.asarray(site.value(name)) for key, site, name in torch_parameters(model.network)}


@pytest.mark.parametrize("prefix", ["diffusion_model.", ""])
def test_bare_diffusion_model_loads_the_same_weights_as_a_full_checkpoint(tmp_path, sd1_tensors, prefix):
    full = tmp_path / "full.safetensors"
    vae_key = {"first_stage_model.decoder.conv_in.weight": np.zeros((4, 4), np.float32)}
    save_file({**{PREFIX + k: v for k, v in sd1_tensors.items()}, **vae_key}, str(full))
    bare = write(tmp_path, sd1_tensors, prefix=prefix, name="bare.safetensors")
    reference, other = parameters(load_model(full, dtype="fp32")), parameters(load_model(bare, dtype="fp32"))
    assert reference.keys() == other.keys()
    for key in reference:
        np.testing.assert_array_equal(reference[key], other[key])


def test_weights_arrive_in_flax_layout_with_the_requested_dtype(tmp_path, sd1_tensors):
    fp16 = {key: value.astype(np.float16) for key, value in sd1_tensors.items()}
    model = load_model(write(tmp_path, fp16), dtype="bf16")
    assert model.dtype == jnp.bfloat16
    conv = model.network.input_blocks[1][0].in_layers["2"].weight[...]
    linear = model.network.input_blocks[1][1].transformer_blocks.block.attn2.to_k.weight[...][0]  # a scanned stack
    assert conv.dtype == linear.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(conv, np.float32),
        fp16["input_blocks.1.0.in_layers.2.weight"].transpose(2, 3, 1, 0).astype(jnp.bfloat16).astype(np.float32),
    )
    np.testing.assert_array_equal(
        np.asarray(linear, np.float32),
        fp16["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].T.astype(jnp.bfloat16).astype(np.float32),
    )


def test_family_config_and_parameter_count_are_inferred(tiny_checkpoint):
    for name, family in FAMILIES.items():
        model = load_model(tiny_checkpoint(name), dtype="fp32")
        assert model.variant.name == name
        assert model.config == family.config
        assert model.param_count == sum(v.size for v in random_tensors(family.config).values())
    assert load_model(tiny_checkpoint("sdxl"), dtype="fp32").latent_format.scale_factor == 0.13025


def test_prediction_defaults_to_eps_and_follows_v_pred_key_and_override(tmp_path, sd1_tensors):
    plain = write(tmp_path, sd1_tensors)
    assert load_model(plain).sampling.prediction == "eps"
    assert load_model(plain, prediction="v").sampling.prediction == "v"
    flagged = tmp_path / "vpred.safetensors"
    save_file({**{PREFIX + k: v for k, v in sd1_tensors.items()}, "v_pred": np.zeros(0)}, str(flagged))
    assert load_model(flagged).sampling.prediction == "v"
    assert load_model(flagged, prediction="eps").sampling.prediction == "eps"


# SD2 with real SD2's twelve output blocks, so that ComfyUI's 768-v test key
# (output_blocks.11.1.transformer_blocks.0.norm1.bias) exists.
SD2_FOUR_LEVELS = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=64,
    channel_mult=(1, 1, 1, 1),
    num_res_blocks=(2, 2, 2, 2),
    transformer_depth=(1, 1, 0, 0, 0, 0, 0, 0),
    transformer_depth_middle=1,
    transformer_depth_output=(0,) * 9 + (1, 1, 1),
    context_dim=1024,
    num_head_channels=64,
    use_linear_in_transformer=True,
)


@pytest.mark.parametrize(("spread", "expected"), [(0.02, "eps"), (0.2, "v")])
def test_sd2_v_prediction_is_detected_from_weight_statistics_like_comfyui(tmp_path, spread, expected):
    tensors = random_tensors(SD2_FOUR_LEVELS)
    key = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
    tensors[key] = (spread * np.random.default_rng(0).standard_normal(tensors[key].shape)).astype(np.float32)
    model = load_model(write(tmp_path, tensors))
    assert model.variant.name == "sd2"
    assert model.sampling.prediction == expected


def test_missing_key_is_named(tmp_path, sd1_tensors):
    key = "input_blocks.4.1.transformer_blocks.0.attn2.to_v.weight"
    tensors = {k: v for k, v in sd1_tensors.items() if k != key}
    with pytest.raises(
        KeyMismatchError, match=r"lacks 1 UNet keys: model\.diffusion_model\." + key.replace(".", r"\.")
    ):
        load_model(write(tmp_path, tensors))


def test_unexpected_key_is_named(tmp_path, sd1_tensors):
    tensors = {**sd1_tensors, "input_blocks.1.0.extra.weight": np.zeros((3,), np.float32)}
    with pytest.raises(
        KeyMismatchError, match=r"1 unexpected UNet keys: model\.diffusion_model\.input_blocks\.1\.0\.extra"
    ):
        load_model(write(tmp_path, tensors))


def test_misshaped_key_is_named_with_both_shapes(tmp_path, sd1_tensors):
    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    tensors = {**sd1_tensors, key: sd1_tensors[key].T.copy()}
    with pytest.raises(ShapeMismatchError, match=r"to_k\.weight: file \(768, 32\), model \(32, 768\)"):
        load_model(write(tmp_path, tensors))


def test_diffusers_layout_is_recognised_and_refused(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file(
        {"conv_in.weight": np.zeros((4, 4, 3, 3)), "down_blocks.0.resnets.0.conv1.weight": np.zeros(1)},
        str(path),
    )
    with pytest.raises(UnknownLayoutError, match="diffusers-format UNet"):
        load_model(path)


def test_file_without_a_unet_is_refused_with_its_keys(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"something.weight": np.zeros(2)}, str(path))
    with pytest.raises(UnknownLayoutError, match=r"no diffusion model found.*something\.weight"):
        load_model(path)


def test_unsupported_context_width_is_named(tmp_path, sd1_tensors):
    tensors = dict(sd1_tensors)
    for key in [k for k in tensors if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]:
        tensors[key] = np.zeros((tensors[key].shape[0], 1280), np.float32)
    with pytest.raises(UnknownLayoutError, match="context width 1280"):
        load_model(write(tmp_path, tensors))


def test_inconsistent_block_structure_is_named(tmp_path, sd1_tensors):
    tensors = {k: v for k, v in sd1_tensors.items() if not k.startswith("input_blocks.3.")}
    tensors["input_blocks.3.0.something.weight"] = np.zeros(2, np.float32)
    with pytest.raises(UnknownLayoutError, match="input_blocks.3 is neither a ResBlock nor a Downsample"):
        load_model(write(tmp_path, tensors))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_model(tmp_path / "nope.safetensors")


def test_corrupt_file_is_refused(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="not a readable .safetensors file"):
        load_model(path)


def test_pickled_checkpoint_is_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickled checkpoints are not loaded"):
        load_model(path)


def test_bad_dtype_and_prediction_arguments_are_named(tiny_checkpoint):
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        load_model(tiny_checkpoint("sd1"), dtype="fp8")
    with pytest.raises(ValueError, match="unknown prediction 'x0'"):
        load_model(tiny_checkpoint("sd1"), prediction="x0")
