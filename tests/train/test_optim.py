"""Optimizers and losses against torch: identical gradients give identical parameters (fp32, atol 1e-6), and
every loss equals torch.nn.functional's with its default arguments (rtol 1e-6)."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxlora.train.optim import LOSSES, make_optimizer

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
    with pytest.raises(ValueError, match="unknown optimizer 'Lion'"):
        make_optimizer("Lion", 1e-3)
