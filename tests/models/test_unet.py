"""Structure, parameter counts and remat of the UNet, independent of any checkpoint file."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlora.models.checkpoint import torch_parameters
from jaxlora.models.unet import SD15, SD21, SDXL, UNet
from jaxlora.models.unet_family import infer_unet_config
from tests.models.tiny_unets import FAMILIES, MINIMAL, loaded_unet


def parameter_count(config) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(UNet(config), nnx.Param)))


@pytest.mark.parametrize(
    ("config", "published"),
    [(SD15, 859_520_964), (SD21, 865_910_724), (SDXL, 2_567_463_684)],
    ids=["sd15", "sd21", "sdxl"],
)
def test_full_size_unet_has_published_parameter_count(config, published):
    assert parameter_count(config) == published


@pytest.mark.parametrize("config", [SD15, SD21, SDXL], ids=["sd15", "sd21", "sdxl"])
def test_config_is_inferred_back_from_full_size_key_shapes(config):
    network = UNet(config)
    shapes = {
        key: layer.torch_shape(name, getattr(layer, name).shape) for key, layer, name in torch_parameters(network)
    }
    inferred, _ = infer_unet_config(shapes)
    assert inferred == config


def test_parameter_paths_are_the_ldm_checkpoint_keys():
    keys = {key for key, _, _ in torch_parameters(UNet(SDXL))}
    for key in [
        "time_embed.0.weight",
        "label_emb.0.2.bias",
        "input_blocks.0.0.weight",
        "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
        "input_blocks.6.0.op.weight",
        "middle_block.1.transformer_blocks.9.ff.net.0.proj.weight",
        "output_blocks.2.2.conv.weight",
        "output_blocks.5.1.proj_out.weight",
        "out.2.bias",
    ]:
        assert key in keys
    assert not any(key.endswith("to_q.bias") for key in keys)  # attention q/k/v carry no bias


def test_remat_gives_identical_outputs_and_gradients():
    network = loaded_unet(MINIMAL)
    graph, params = nnx.split(network)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 8, 8, 4)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((1, 5, 768)), jnp.float32)
    t = jnp.array([250.0])

    def loss(params, policy):
        model = nnx.merge(graph, params)
        model.remat_policy = policy
        return jnp.mean(model(x, t, context) ** 2)

    plain = jax.jit(jax.value_and_grad(lambda p: loss(p, None)))(params)
    remat = jax.jit(jax.value_and_grad(lambda p: loss(p, "nothing_saveable")))(params)
    assert float(plain[0]) == pytest.approx(float(remat[0]), rel=1e-6)
    # Recomputation may fuse and round differently: equal up to fp32 rounding, measured against the largest
    # gradient (some gradients, e.g. of biases right before a GroupNorm, are zero up to rounding noise).
    scale = max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(plain[1]))
    for a, b in zip(jax.tree.leaves(plain[1]), jax.tree.leaves(remat[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6 * scale)


def test_sdxl_unet_requires_y_and_sd1_rejects_it():
    with pytest.raises(ValueError, match="needs a `y`"):
        UNet(FAMILIES["sdxl"].config)(jnp.zeros((1, 8, 8, 4)), jnp.zeros(1), jnp.zeros((1, 2, 2048)))
    with pytest.raises(ValueError, match="takes no `y`"):
        UNet(FAMILIES["sd1"].config)(jnp.zeros((1, 8, 8, 4)), jnp.zeros(1), jnp.zeros((1, 2, 768)), jnp.zeros((1, 8)))
