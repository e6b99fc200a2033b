"""The node's optimizers and losses with torch's defaults (spec section 5), as optax transformations and pure
functions. Parameters and optimizer state are float32 whatever `lora_dtype` is: bf16 moments and masters would
round most Adam updates away."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
    # torch.optim.AdamW: decoupled weight decay 0.01 on every trainable (optax's default is 1e-4).
    "AdamW": lambda lr: optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, weight_decay=0.01),
    "Adam": lambda lr: optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0),
    # torch.optim.SGD: no momentum, no dampening, no weight decay.
    "SGD": lambda lr: optax.sgd(lr),
    # torch.optim.RMSprop: alpha 0.99, eps added after the square root, square average starting at 0.
    "RMSprop": lambda lr: optax.rmsprop(lr, decay=0.99, eps=1e-8, initial_scale=0.0, eps_in_sqrt=False),
}


def huber(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """torch's HuberLoss(delta=1) and SmoothL1Loss(beta=1), identical at 1: 0.5 e^2 below 1, |e| - 0.5 above."""
    error = jnp.abs(prediction - target)
    return jnp.mean(jnp.where(error < 1.0, 0.5 * error * error, error - 0.5))


LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "MSE": lambda prediction, target: jnp.mean(jnp.square(prediction - target)),
    "L1": lambda prediction, target: jnp.mean(jnp.abs(prediction - target)),
    "Huber": huber,
    "SmoothL1": huber,
}


def make_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; use one of {list(OPTIMIZERS)}")
    return OPTIMIZERS[name](learning_rate)


def loss_function(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    if name not in LOSSES:
        raise ValueError(f"unknown loss_function {name!r}; use one of {list(LOSSES)}")
    return LOSSES[name]
