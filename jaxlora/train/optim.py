"""The optimizers (the node's four with torch's defaults, and Adafactor, Lion, Prodigy, schedule-free AdamW) and the
node's losses, as optax transformations and pure functions. Parameters and optimizer state are float32 whatever
`lora_dtype` is: bf16 moments and masters would round most Adam updates away.

Each optimizer is a builder over its hyper-parameters and a table of their defaults; a hyper-parameter not in its
table does not apply to it (the settings check refuses it). `learning_rate` is a float or an optax schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import contrib

Rate = float | optax.Schedule


@dataclass(frozen=True)
class OptimizerSettings:
    """Hyper-parameters beyond the rate; None: the optimizer's default (`DEFAULTS`). `max_grad_norm` clips the
    gradients' global norm before the optimizer sees them (None: no clipping, as the node)."""

    weight_decay: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    eps: float | None = None
    max_grad_norm: float | None = None


def _with_l2(weight_decay: float, optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """torch's coupled weight decay (Adam, SGD, RMSprop): weight_decay * p added to the gradient first. Left out at
    0, so the default optimizer is the plain transformation."""
    return optimizer if weight_decay == 0 else optax.chain(optax.add_decayed_weights(weight_decay), optimizer)


def _adafactor(lr: Rate, weight_decay: float, eps: float) -> optax.GradientTransformation:
    """torch.optim.Adafactor's defaults: every tensor of 2+ dimensions factored, second-moment decay 1 - t^-0.8,
    updates clipped to RMS 1 and scaled by max(1e-3, RMS(p)), no momentum; weight decay decoupled,
    p <- p - lr * weight_decay * p. (torch also caps the rate at 1/sqrt(t), which binds only past step 1/lr^2.)"""
    base = optax.adafactor(lr, min_dim_size_to_factor=1, decay_rate=0.8, clipping_threshold=1.0, eps=eps)
    if weight_decay == 0:
        return base
    decay = (lambda count: -weight_decay * lr(count)) if callable(lr) else -weight_decay * lr
    return optax.chain(base, optax.add_decayed_weights(decay))


def _schedule_free_adamw(lr: Rate, weight_decay: float, beta1: float, beta2: float, eps: float):
    """schedule-free AdamW (Defazio et al. 2024); its averaged iterate x, not the trained y, is the adapter to use
    (`eval_params`). Warmup comes with the rate (constant_with_warmup)."""
    return contrib.schedule_free_adamw(lr, b1=beta1, b2=beta2, eps=eps, weight_decay=weight_decay)


class RateGatedState(NamedTuple):
    """The wrapped optimizer's state (its learning rate an injected hyper-parameter) and the schedule's step."""

    inner: optax.OptState
    step: jax.Array


def _prodigy(lr: Rate, weight_decay: float, beta1: float, beta2: float, eps: float) -> optax.GradientTransformation:
    """Prodigy (Mishchenko & Defazio 2023) as prodigyopt: learning_rate scales its own estimate (1.0 is usual).

    prodigyopt skips a step whose rate is 0 (the first step of a warmup): no moment, estimate or step-count update,
    while the rate schedule moves on. optax's prodigy would divide 0 by 0 there, and counts the schedule and its
    bias correction with one counter. So the rate is injected per step from the schedule's own counter, and a
    zero-rate step leaves the state as it was."""
    inner = optax.inject_hyperparams(contrib.prodigy)(learning_rate=1.0, betas=(beta1, beta2), eps=eps,
                                                      weight_decay=weight_decay)  # fmt: skip

    def init(params):
        return RateGatedState(inner.init(params), jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        rate = lr(state.step) if callable(lr) else lr
        hyperparams = dict(state.inner.hyperparams)
        hyperparams["learning_rate"] = jnp.asarray(rate, hyperparams["learning_rate"].dtype)
        updates, stepped = inner.update(updates, state.inner._replace(hyperparams=hyperparams), params)
        skip = jnp.asarray(rate) == 0
        updates = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), updates)
        kept = jax.tree.map(lambda new, old: jnp.where(skip, old, new), stepped, state.inner)
        return updates, RateGatedState(kept, state.step + 1)

    return optax.GradientTransformation(init, update)


# name -> (builder(learning_rate, **hyper-parameters), the hyper-parameters' defaults)
OPTIMIZERS: dict[str, tuple[Callable[..., optax.GradientTransformation], dict[str, float]]] = {
    # torch.optim.AdamW: decoupled weight decay 0.01 on every trainable (optax's default is 1e-4).
    "AdamW": (
        lambda lr, weight_decay, beta1, beta2, eps: optax.adamw(
            lr, b1=beta1, b2=beta2, eps=eps, eps_root=0.0, weight_decay=weight_decay
        ),
        {"weight_decay": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
    ),
    "Adam": (
        lambda lr, weight_decay, beta1, beta2, eps: _with_l2(
            weight_decay, optax.adam(lr, b1=beta1, b2=beta2, eps=eps, eps_root=0.0)
        ),
        {"weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
    ),
    # torch.optim.SGD: no momentum, no dampening, no weight decay.
    "SGD": (lambda lr, weight_decay: _with_l2(weight_decay, optax.sgd(lr)), {"weight_decay": 0.0}),
    # torch.optim.RMSprop: alpha (beta2 here) 0.99, eps added after the square root, square average starting at 0.
    "RMSprop": (
        lambda lr, weight_decay, beta2, eps: _with_l2(
            weight_decay, optax.rmsprop(lr, decay=beta2, eps=eps, initial_scale=0.0, eps_in_sqrt=False)
        ),
        {"weight_decay": 0.0, "beta2": 0.99, "eps": 1e-8},
    ),
    "Adafactor": (_adafactor, {"weight_decay": 0.0, "eps": 1e-30}),
    # Lion (Chen et al. 2023) as lion-pytorch: p <- p - lr * (sign(b1 m + (1 - b1) g) + weight_decay * p).
    "Lion": (
        lambda lr, weight_decay, beta1, beta2: optax.lion(lr, b1=beta1, b2=beta2, weight_decay=weight_decay),
        {"weight_decay": 0.0, "beta1": 0.9, "beta2": 0.99},
    ),
    "Prodigy": (_prodigy, {"weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}),
    "ScheduleFreeAdamW": (_schedule_free_adamw, {"weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}),
}
AVERAGING = ("ScheduleFreeAdamW",)  # optimizers whose adapter to use is an average kept in their state


def make_optimizer(
    name: str, learning_rate: Rate, settings: OptimizerSettings = OptimizerSettings()
) -> optax.GradientTransformation:
    """The optimizer `name` at `learning_rate`, its hyper-parameters from `settings` over its defaults."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; use one of {list(OPTIMIZERS)}")
    build, defaults = OPTIMIZERS[name]
    given = {key: getattr(settings, key) for key in ("weight_decay", "beta1", "beta2", "eps")}
    if unused := [key for key, value in given.items() if value is not None and key not in defaults]:
        raise ValueError(f"{unused[0]} does not apply to {name}; it takes {list(defaults)}")
    optimizer = build(
        learning_rate, **{key: given[key] if given[key] is not None else defaults[key] for key in defaults}
    )
    if settings.max_grad_norm is None:
        return optimizer
    return optax.chain(optax.clip_by_global_norm(settings.max_grad_norm), optimizer)


class EmaState(NamedTuple):
    """The wrapped optimizer's state, the moving average of the parameters, and how many updates it has seen."""

    inner: optax.OptState
    ema: optax.Params
    count: jax.Array


def ema_decay_at(decay: float, count: jax.Array) -> jax.Array:
    """The decay of EMA update `count` (from 0), as diffusers' EMAModel: 0 first (the average starts at the
    first updated parameters), then min(decay, (1 + count) / (10 + count))."""
    count = count.astype(jnp.float32)
    return jnp.where(count == 0, 0.0, jnp.minimum(decay, (1.0 + count) / (10.0 + count)))


def with_ema(optimizer: optax.GradientTransformation, decay: float) -> optax.GradientTransformation:
    """`optimizer`, also keeping an exponential moving average of the parameters it produces (float32, in its
    state, so checkpoints hold it): ema <- d ema + (1 - d) p_new with d = `ema_decay_at(decay, count)`."""

    def init(params):
        average = jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params)  # its own buffers (donated)
        return EmaState(optimizer.init(params), average, jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        updates, inner = optimizer.update(updates, state.inner, params)
        current = optax.apply_updates(params, updates)
        d = ema_decay_at(decay, state.count)
        average = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p.astype(jnp.float32), state.ema, current)
        return updates, EmaState(inner, average, state.count + 1)

    return optax.GradientTransformation(init, update)


def ema_params(opt_state):
    """The moving average of a `with_ema` optimizer's state."""
    return opt_state.ema


def eval_params(name: str, opt_state, params):
    """The adapter a run exports: the trained parameters, or for schedule-free AdamW the averaged iterate x kept in
    its state (the trained y is an interpolation that only the next gradient uses)."""
    if name not in AVERAGING:
        return params
    is_state = lambda node: isinstance(node, contrib.ScheduleFreeState)  # noqa: E731
    (state,) = [node for node in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(node)]
    return contrib.schedule_free_eval_params(state, params)


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


def loss_function(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    if name not in LOSSES:
        raise ValueError(f"unknown loss_function {name!r}; use one of {list(LOSSES)}")
    return LOSSES[name]
