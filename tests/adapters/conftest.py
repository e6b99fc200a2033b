import jax
import numpy as np
from flax import nnx

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
        f"diffusion_model.{key}": site.to_torch(name, np.asarray(getattr(site, f"{name}_as")(np.float32)))
        for key, site, name in torch_parameters(network)
    }
