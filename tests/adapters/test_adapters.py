"""The adapters on a network: identity at init, seeded, the only differentiated tree, and bypass == patching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlora.adapters.attach import adapted_layers, attach_adapters
from jaxlora.adapters.base import AdapterParam, Target
from jaxlora.adapters.lokr import LoKr
from jaxlora.models.layers import Conv2d, Linear
from tests.adapters.conftest import randomize_adapters
from tests.models.tiny_unets import MINIMAL, loaded_unet


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((1, 8, 8, 4)), jnp.float32)
    return x, jnp.array([300.0]), jnp.asarray(rng.standard_normal((1, 6, 768)), jnp.float32)


def adapter_values(network) -> dict:
    return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(network, AdapterParam))}


@pytest.mark.parametrize("algorithm", ["LoRA", "LoHa", "LoKr", "OFT"])
def test_fresh_adapters_leave_the_output_unchanged(tiny_model, algorithm):
    model, _ = tiny_model("sd1")
    before = np.asarray(model.network(*inputs()))
    count = attach_adapters(model.network, algorithm, rank=4, seed=0, lora_dtype=jnp.float32)
    assert count == len(list(adapted_layers(model.network))) > 0
    np.testing.assert_allclose(np.asarray(model.network(*inputs())), before, rtol=1e-6, atol=1e-6)


# LoRA in CI; the other forms on the whole network with `pytest -m slow` (LoKr's is checked per layer below).
@pytest.mark.parametrize(
    "algorithm", ["LoRA", *(pytest.param(a, marks=pytest.mark.slow) for a in ("LoHa", "LoKr", "OFT"))]
)
def test_bypass_equals_weight_patching(tiny_model, algorithm):
    """The activation forms (LoRA and LoKr factored, LoHa through the formed delta, OFT rotating the output) give
    the weight-patched network's output, on linear and conv layers alike (fp32: 1e-5 of the output scale)."""
    outputs = []
    for bypass in (False, True):
        model, _ = tiny_model("sd1")
        attach_adapters(model.network, algorithm, rank=4, seed=0, lora_dtype=jnp.float32, bypass=bypass)
        randomize_adapters(model.network, seed=5, scale=0.2)
        outputs.append(np.asarray(model.network(*inputs())))
    patched, bypassed = outputs
    assert np.abs(patched - bypassed).max() <= 1e-5 * np.abs(patched).max()


def test_same_seed_gives_the_same_adapter_and_another_seed_a_different_one(tiny_model):
    values = []
    for seed in (7, 7, 8):
        model, _ = tiny_model("sd1")
        attach_adapters(model.network, "LoHa", rank=4, seed=seed, lora_dtype=jnp.float32)
        values.append(adapter_values(model.network))
    first, again, other = values
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not np.array_equal(first[next(k for k in first if "w1a" in k)], other[next(k for k in other if "w1a" in k)])


def test_initialisation_follows_comfyui(tiny_model):
    model, _ = tiny_model("sd1")
    attach_adapters(model.network, "LoRA", rank=4, seed=0, lora_dtype=jnp.float32)
    layer = dict((p, a) for p, _, a in adapted_layers(model.network))["input_blocks.1.0.in_layers.2"]
    up, down = np.asarray(layer.weight.up[...]), np.asarray(layer.weight.down[...])
    assert up.shape == (32, 4) and down.shape == (4, 32 * 3 * 3)
    assert np.all(down == 0) and np.abs(up).max() <= 0.5 and np.abs(up).max() > 0.4  # U(-1/sqrt(4), 1/sqrt(4))
    assert layer.weight.alpha == 1.0
    norm = dict((p, a) for p, _, a in adapted_layers(model.network))["input_blocks.1.0.in_layers.0"]
    assert norm.weight.diff.shape == (32,) and norm.bias.diff.shape == (32,)


@pytest.mark.parametrize(
    "target, rank, w1_shape, w2_shape",
    [
        (Target((64, 64, 3, 3), Conv2d.torch_to_flax), 3, (2, 2), (32, 32, 3, 3)),
        (Target((32, 4, 3, 3), Conv2d.torch_to_flax), 4, (4, 2), (8, 2, 3, 3)),
        (Target((320, 768), Linear.torch_to_flax), 8, (8, 8), (40, 96)),
    ],
    ids=["conv64", "first-conv", "linear"],
)
def test_lokr_factors_have_the_shapes_and_init_of_comfyui_create_train(target, rank, w1_shape, w2_shape):
    """ComfyUI's `LoKrAdapter.create_train` (comfy/weight_adapter/lokr.py, Dec 2025 on) factorises the output
    channels and the input channels, `factorization(dim, rank)` each, and keeps the kernel on w2: w1 zeros,
    w2 kaiming_uniform(a=sqrt(5)), bound 1/sqrt(in_n * kh * kw). ComfyUI up to Oct 2025 factorised in*kh*kw
    instead ([64, 64, 3, 3] at rank 3: w1 (2, 3), w2 (32, 192)); such files still load (test_import_styles)."""
    lokr = LoKr.create(target, rank, np.random.default_rng(0), jnp.float32)
    w1, w2 = np.asarray(lokr.w1[...]), np.asarray(lokr.w2[...])
    assert (w1.shape, w2.shape) == (w1_shape, w2_shape)
    bound = 1 / np.sqrt(np.prod(w2_shape[1:]))
    assert np.all(w1 == 0) and 0.9 * bound < np.abs(w2).max() <= bound


@pytest.mark.parametrize(("layer", "shape"), [(Linear(24, 36), (3, 24)), (Conv2d(8, 12, 3, padding=1), (1, 5, 5, 8))])
def test_lokr_bypass_equals_the_kronecker_weight_patch(layer, shape):
    """LoKr's factored activation form (linear: the two factors applied to x split as [in_m, in_n]; conv: the delta
    through the conv) against W + kron(w1, w2); both factors non-trivial (w1 [6, 4] or [3, 2] at rank 4)."""
    rng = np.random.default_rng(0)
    for name in ("weight", "bias"):
        getattr(layer, name).set_value(jnp.asarray(rng.standard_normal(getattr(layer, name).shape), jnp.float32))
    lokr = LoKr.create(Target.of(layer), 4, rng, jnp.float32)
    lokr.w1.set_value(jnp.asarray(rng.standard_normal(lokr.w1.shape), jnp.float32))
    assert min(lokr.w1.shape) > 1 and min(lokr.w2.shape[:2]) > 1
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    y = layer.apply_kernel(x, layer.weight[...])
    patched = layer.apply_kernel(x, lokr.patch(layer.weight[...]))
    np.testing.assert_allclose(lokr.bypass(x, y, layer), patched, rtol=1e-5, atol=1e-5)
    assert not np.allclose(patched, y)


def test_gradients_reach_only_the_adapter_tree():
    network = loaded_unet(MINIMAL)
    attach_adapters(network, "LoRA", rank=4, seed=0, lora_dtype=jnp.float32)
    graph, adapters, base = nnx.split(network, AdapterParam, ...)
    assert not any(isinstance(v, AdapterParam) for _, v in nnx.to_flat_state(base))

    def loss(adapters, base):
        return jnp.mean(nnx.merge(graph, adapters, base)(*inputs()) ** 2)

    grads = jax.jit(jax.grad(loss))(adapters, base)
    flat = dict(nnx.to_flat_state(grads))
    assert flat.keys() == dict(nnx.to_flat_state(adapters)).keys()
    downs = [np.abs(np.asarray(v[...])).max() for path, v in flat.items() if path[-1] == "down"]
    ups = [np.abs(np.asarray(v[...])).max() for path, v in flat.items() if path[-1] == "up"]
    assert min(downs) > 0  # ComfyUI's init: up random, down zero, so only down has a gradient at step 0
    assert max(ups) == 0


def test_bad_algorithm_rank_and_bypass_requests_are_refused(tiny_model):
    model, _ = tiny_model("sd1")
    with pytest.raises(ValueError, match="unknown algorithm 'GLoRA'"):
        attach_adapters(model.network, "GLoRA")
    with pytest.raises(ValueError, match="rank must be at least 1"):
        attach_adapters(model.network, "LoRA", rank=0)
