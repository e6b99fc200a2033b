"""Optimizers and losses against torch: identical gradients give identical parameters (fp32, atol 1e-6), and
every loss equals torch.nn.functional's with its default arguments (rtol 1e-6). The optimizers beyond the node's
four are checked the same way against their reference implementations: torch.optim.Adafactor, lion-pytorch's Lion,
prodigyopt's Prodigy and schedulefree's AdamWScheduleFree (the adapter compared is its evaluation iterate x)."""

import jax
import jax.numpy as jnp
import lion_pytorch
import numpy as np
import optax
import prodigyopt
import pytest
import schedulefree
import torch

from jaxlora.train import config as config_module
from jaxlora.train.config import SettingsError, TrainConfig
from jaxlora.train.loop import own_buffers
from jaxlora.train.optim import (
    LOSSES,
    OPTIMIZERS,
    OptimizerSettings,
    ema_params,
    eval_params,
    make_optimizer,
    with_ema,
)

TORCH_OPTIMIZERS = {
    "AdamW": torch.optim.AdamW,
    "Adam": torch.optim.Adam,
    "SGD": torch.optim.SGD,
    "RMSprop": torch.optim.RMSprop,
}
TORCH_LOSSES = {
    "MSE": torch.nn.functional.mse_loss,
    "L1": torch.nn.functional.l1_loss,
    "Huber": torch.nn.functional.huber_loss,
    "SmoothL1": torch.nn.functional.smooth_l1_loss,
}


@pytest.mark.parametrize("name", list(TORCH_OPTIMIZERS))
def test_optimizer_steps_match_torch_optim_with_its_defaults(name):
    rng = np.random.default_rng(0)
    start = rng.standard_normal((5, 3)).astype(np.float32)
    grads = [rng.standard_normal((5, 3)).astype(np.float32) for _ in range(6)]
    learning_rate = 0.01

    optimizer = make_optimizer(name, learning_rate)
    params = {"w": jnp.asarray(start)}
    state = optimizer.init(params)
    parameter = torch.nn.Parameter(torch.from_numpy(start.copy()))
    reference = TORCH_OPTIMIZERS[name]([parameter], lr=learning_rate)
    for grad in grads:
        updates, state = optimizer.update({"w": jnp.asarray(grad)}, state, params)
        params = optax.apply_updates(params, updates)
        parameter.grad = torch.from_numpy(grad.copy())
        reference.step()
        np.testing.assert_allclose(np.asarray(params["w"]), parameter.detach().numpy(), atol=1e-6, rtol=0)
    assert not np.allclose(np.asarray(params["w"]), start)


@pytest.mark.parametrize("name", list(TORCH_LOSSES))
def test_loss_matches_torch_with_mean_reduction(name):
    rng = np.random.default_rng(1)
    prediction = (3 * rng.standard_normal((2, 4, 5, 5))).astype(np.float32)  # errors on both sides of 1
    target = rng.standard_normal((2, 4, 5, 5)).astype(np.float32)
    expected = TORCH_LOSSES[name](torch.from_numpy(prediction), torch.from_numpy(target)).item()
    actual = float(LOSSES[name](jnp.asarray(prediction), jnp.asarray(target)))
    assert actual == pytest.approx(expected, rel=1e-6)


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="unknown optimizer 'Muon'"):
        make_optimizer("Muon", 1e-3)


TUNED = OptimizerSettings(weight_decay=0.1, beta1=0.8, beta2=0.95, eps=1e-6)
# name -> (the reference optimizer over torch parameters, learning rate, settings), each with every setting the
# optimizer takes moved off its default (and once at its defaults where they differ from the node's four)
REFERENCES = {
    "AdamW tuned": (lambda p: torch.optim.AdamW(p, 0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1), 0.01, TUNED),
    "Adam tuned": (lambda p: torch.optim.Adam(p, 0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1), 0.01, TUNED),
    "SGD tuned": (lambda p: torch.optim.SGD(p, 0.01, weight_decay=0.1), 0.01, OptimizerSettings(weight_decay=0.1)),
    "RMSprop tuned": (
        lambda p: torch.optim.RMSprop(p, 0.01, alpha=0.95, eps=1e-6, weight_decay=0.1),
        0.01,
        OptimizerSettings(weight_decay=0.1, beta2=0.95, eps=1e-6),
    ),
    # torch caps Adafactor's rate at 1/sqrt(t) (>= lr for these six steps) and clamps the factored estimate at
    # eps^2 = 1.4e-14 where optax adds 1e-30 to g^2: neither binds on these gradients.
    "Adafactor": (lambda p: torch.optim.Adafactor(p, 0.01), 0.01, OptimizerSettings()),
    "Adafactor tuned": (
        lambda p: torch.optim.Adafactor(p, 0.01, weight_decay=0.1),
        0.01,
        OptimizerSettings(weight_decay=0.1),
    ),
    "Lion": (lambda p: lion_pytorch.Lion(p, 1e-3), 1e-3, OptimizerSettings()),
    "Lion tuned": (
        lambda p: lion_pytorch.Lion(p, 1e-3, betas=(0.8, 0.95), weight_decay=0.1),
        1e-3,
        OptimizerSettings(weight_decay=0.1, beta1=0.8, beta2=0.95),
    ),
    # optax's Prodigy always bias-corrects the step (prodigyopt's use_bias_correction=True); a large multiplier
    # makes its estimate d (from 1e-6) move the parameters well past float32 rounding in six steps.
    "Prodigy": (lambda p: prodigyopt.Prodigy(p, 100.0, use_bias_correction=True), 100.0, OptimizerSettings()),
    "Prodigy tuned": (
        lambda p: prodigyopt.Prodigy(p, 100.0, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, use_bias_correction=True),
        100.0,
        TUNED,
    ),
    "ScheduleFreeAdamW": (lambda p: schedulefree.AdamWScheduleFree(p, 0.01), 0.01, OptimizerSettings()),
    "ScheduleFreeAdamW tuned": (
        lambda p: schedulefree.AdamWScheduleFree(p, 0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
        0.01,
        TUNED,
    ),
}


@pytest.mark.parametrize("case", list(REFERENCES))
def test_optimizer_with_its_settings_matches_the_reference_implementation(case):
    """Six steps on a matrix and a vector (Adafactor factors the one, not the other); fp32, atol 1e-6 plus rtol 2e-6
    (prodigyopt computes its estimate d in float64, optax in float32), and every case moves the parameters by far
    more than that."""
    name = case.split()[0]
    reference_of, learning_rate, settings = REFERENCES[case]
    rng = np.random.default_rng(0)
    start = {"w": rng.standard_normal((5, 3)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in start.items()} for _ in range(6)]

    optimizer = make_optimizer(name, learning_rate, settings)
    params = {key: jnp.asarray(value) for key, value in start.items()}
    state = optimizer.init(params)
    torch_params = {key: torch.nn.Parameter(torch.from_numpy(value.copy())) for key, value in start.items()}
    reference = reference_of(list(torch_params.values()))
    if name == "ScheduleFreeAdamW":
        reference.train()  # the mode gradients are taken in: parameters hold y
    for grad in grads:
        updates, state = optimizer.update({k: jnp.asarray(v) for k, v in grad.items()}, state, params)
        params = optax.apply_updates(params, updates)
        for key, parameter in torch_params.items():
            parameter.grad = torch.from_numpy(grad[key].copy())
        reference.step()
    if name == "ScheduleFreeAdamW":
        reference.eval()  # parameters hold the averaged iterate x
    exported = eval_params(name, state, params)
    for key, parameter in torch_params.items():
        np.testing.assert_allclose(np.asarray(exported[key]), parameter.detach().numpy(), atol=1e-6, rtol=2e-6)
        assert np.abs(np.asarray(exported[key]) - start[key]).max() > 1e-4


def test_gradient_clipping_scales_the_gradient_to_the_norm():
    """SGD with max_grad_norm: the step is -lr * g * min(1, max / |g|) over the whole tree's norm (3-4-12: 13)."""
    optimizer = make_optimizer("SGD", 1.0, OptimizerSettings(max_grad_norm=2.6))
    params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    updates, _ = optimizer.update({"a": jnp.array([3.0, 4.0]), "b": jnp.array([12.0])}, optimizer.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["a"]), [-0.6, -0.8], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(updates["b"]), [-2.4], rtol=1e-6)
    small, _ = optimizer.update({"a": jnp.array([0.3, 0.4]), "b": jnp.array([1.2])}, optimizer.init(params), params)
    np.testing.assert_allclose(np.asarray(small["a"]), [-0.3, -0.4], rtol=1e-6)  # under the norm: unchanged


def test_default_settings_are_the_plain_transformation():
    """The node's defaults build the very optimizer they did before settings existed (no extra chained state)."""
    state = make_optimizer("AdamW", 1e-3).init({"w": jnp.zeros(2)})
    reference = optax.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, weight_decay=0.01).init({"w": jnp.zeros(2)})
    assert jax.tree.structure(state) == jax.tree.structure(reference)


def test_settings_check_knows_each_optimizers_hyper_parameters():
    assert {name: tuple(defaults) for name, (_, defaults) in OPTIMIZERS.items()} == config_module.OPTIMIZER_KNOBS


@pytest.mark.parametrize(
    ("settings", "key", "message"),
    [
        ({"optimizer": "SGD", "beta1": 0.5}, "beta1", "SGD has no beta1"),
        ({"optimizer": "Lion", "eps": 1e-6}, "eps", "Lion has no eps"),
        ({"optimizer": "ScheduleFreeAdamW", "lr_scheduler": "cosine"}, "lr_scheduler", "constant_with_warmup"),
        ({"beta2": 1.0}, "beta2", "between"),
        ({"max_grad_norm": 0.0}, "max_grad_norm", "between"),
    ],
)
def test_settings_an_optimizer_cannot_use_are_refused(settings, key, message):
    with pytest.raises(SettingsError, match=message) as error:
        TrainConfig(**settings)
    assert error.value.key == key


def test_ema_follows_the_numpy_reference():
    """with_ema over SGD: the average starts at the first updated parameters, then decays by
    min(decay, (1 + k) / (10 + k)) at update k (diffusers' EMAModel); the updates themselves are SGD's (fp32,
    rtol 1e-6)."""
    rng = np.random.default_rng(3)
    start = rng.standard_normal(4).astype(np.float32)
    grads = [rng.standard_normal(4).astype(np.float32) for _ in range(40)]
    optimizer = with_ema(make_optimizer("SGD", 0.1), 0.8)
    params = {"w": jnp.asarray(start)}
    state = optimizer.init(params)
    expected_params, expected_ema = start.astype(np.float64), None
    for k, grad in enumerate(grads):
        updates, state = optimizer.update({"w": jnp.asarray(grad)}, state, params)
        params = optax.apply_updates(params, updates)
        expected_params = expected_params - 0.1 * grad
        decay = 0.0 if k == 0 else min(0.8, (1 + k) / (10 + k))
        expected_ema = expected_params if k == 0 else decay * expected_ema + (1 - decay) * expected_params
        np.testing.assert_allclose(np.asarray(params["w"]), expected_params, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(ema_params(state)["w"]), expected_ema, rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(ema_params(state)["w"]), np.asarray(params["w"]), atol=1e-3)


def test_ema_holds_its_own_buffers():
    """The average is a copy, not the parameters' buffers: the step donates both, and a buffer donated twice is
    an error."""
    params = {"w": jnp.ones(3)}
    state = with_ema(make_optimizer("SGD", 0.1), 0.9).init(params)
    assert ema_params(state)["w"] is not params["w"]
    assert ema_params(state)["w"].unsafe_buffer_pointer() != params["w"].unsafe_buffer_pointer()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizers_state_is_donated_with_the_parameters(name):
    """The trainer's step donates the adapter and the optimizer state. Prodigy keeps the starting point x0 as the
    parameters' own arrays after `init`; `own_buffers` copies such leaves, so every optimizer's state can be
    donated together with the parameters (a buffer donated twice is an error)."""
    params = {"w": jnp.ones((3, 2))}
    optimizer = make_optimizer(name, 1e-3)
    state = own_buffers(optimizer.init(params), params)
    pointers = {leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(state)}
    assert params["w"].unsafe_buffer_pointer() not in pointers

    def step(params, state, grads):
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, state = jax.jit(step, donate_argnums=(0, 1))(params, state, {"w": jnp.full((3, 2), 0.5)})
    assert np.isfinite(np.asarray(params["w"])).all()


def test_prodigy_under_a_warmup_matches_prodigyopt_under_lambdalr():
    """A warmup starts the rate at 0: prodigyopt then skips the step (no moment, estimate or count update) while
    torch's LambdaLR moves on, where optax's own prodigy would divide 0 by 0. Against prodigyopt over the same
    rates (0, 50, 100, 100, ...): fp32, atol 1e-6 plus rtol 2e-6."""
    schedule = optax.linear_schedule(0.0, 100.0, 2)
    rng = np.random.default_rng(1)
    start = rng.standard_normal((5, 3)).astype(np.float32)
    params, parameter = {"w": jnp.asarray(start)}, torch.nn.Parameter(torch.from_numpy(start.copy()))
    optimizer = make_optimizer("Prodigy", schedule)
    state = optimizer.init(params)
    reference = prodigyopt.Prodigy([parameter], 100.0, use_bias_correction=True)
    rates = torch.optim.lr_scheduler.LambdaLR(reference, lambda step: float(schedule(step)) / 100.0)
    for _ in range(6):
        grad = rng.standard_normal((5, 3)).astype(np.float32)
        updates, state = optimizer.update({"w": jnp.asarray(grad)}, state, params)
        params = optax.apply_updates(params, updates)
        parameter.grad = torch.from_numpy(grad.copy())
        reference.step()
        rates.step()
    np.testing.assert_allclose(np.asarray(params["w"]), parameter.detach().numpy(), atol=1e-6, rtol=2e-6)
    assert np.isfinite(np.asarray(params["w"])).all() and np.abs(np.asarray(params["w"]) - start).max() > 1e-4
