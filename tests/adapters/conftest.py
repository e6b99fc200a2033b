import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jaxlora import load_model
from jaxlora.adapters.base import AdapterParam
from jaxlora.models.checkpoint import torch_parameters


def randomize_adapters(network, seed: int = 0, scale: float = 0.05) -> None:
    """Give every adapter tensor random values, so that each factor and each layer shows in the result."""
    rng = np.random.default_rng(seed)
    for _, variable in nnx.to_flat_state(nnx.state(network, AdapterParam)):
        variable.set_value(jax.numpy.asarray(scale * rng.standard_normal(variable.shape), jax.numpy.float32))


def effective_state_dict(network) -> dict[str, np.ndarray]:
    """The weights the adapted network computes with, in torch layout under `diffusion_model.`."""
    return {
        f"diffusion_model.{key}": layer.to_torch(name, np.asarray(getattr(layer, f"{name}_as")(np.float32)))
        for key, layer, name in torch_parameters(network)
    }


@pytest.fixture
def tiny_model(tiny_checkpoint):
    """A freshly loaded fp32 tiny model of a family, with its base state dict in torch layout."""

    def make(family: str):
        path = tiny_checkpoint(family)
        base = {k[len("model.") :]: v for k, v in load_file(str(path)).items()}
        return load_model(path, dtype="fp32"), base

    return make
