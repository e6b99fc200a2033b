"""The noise and loss controls against their formulas: noise-level distributions (SD3's logit-normal and mode
densities), native targets (each parameterisation's output that denoises to x0 exactly), min-SNR-gamma weights
(Hang et al. 2023, the same objective in every target), offset noise, caption dropout; the default draws are the
node's, and refusals name the setting."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora import load_model
from jaxlora.models.demo import demo_dataset, write_random_checkpoint
from jaxlora.models.flux_family import TINY_FLUX_DEV
from jaxlora.models.sampling import ModelSampling, discrete_flow_schedule, scaled_linear_schedule
from jaxlora.models.unet_family import DEMO_UNET
from jaxlora.train import config as config_module
from jaxlora.train.config import SettingsError, TrainConfig
from jaxlora.train.data import DatasetError, load_dataset, make_dataset, save_dataset
from jaxlora.train.loop import preflight
from jaxlora.train.objective import (
    LOSS_TARGETS,
    TIMESTEP_SAMPLINGS,
    Objective,
    draw_percent,
    drop_captions,
    offset_noise,
    prediction_and_target,
    weighted_loss,
)
from jaxlora.train.optim import LOSSES
from tests.train.test_flux_train import flux_data

KEY = jax.random.key(7)
MSE = LOSSES["MSE"]
SAMPLINGS = {
    "eps": ModelSampling("eps", scaled_linear_schedule()),
    "v": ModelSampling("v", scaled_linear_schedule()),
    "const": ModelSampling("const", discrete_flow_schedule(3.0)),
}


def test_uniform_draws_are_the_nodes():
    """The default is the draw the step always made (bit for bit), so default runs are unchanged."""
    expected = jax.random.uniform(KEY, (64,), minval=jnp.finfo(jnp.float32).tiny)
    np.testing.assert_array_equal(np.asarray(draw_percent(KEY, 64, Objective())), np.asarray(expected))


def test_logit_normal_noise_fractions_follow_the_distribution():
    """logit(t) of 200k draws has the asked mean and standard deviation (tolerance 0.01, about 4 standard errors of
    the mean), and mean > 0 makes noisier samples (t = 1 - percent is the noise fraction)."""
    objective = Objective("logit_normal", logit_mean=0.5, logit_std=0.8)
    t = 1.0 - np.asarray(draw_percent(KEY, 200_000, objective), np.float64)
    logits = np.log(t / (1 - t))
    assert abs(logits.mean() - 0.5) < 0.01 and abs(logits.std() - 0.8) < 0.01
    assert np.median(t) > 0.6


def test_mode_sampling_is_sd3s_density():
    """t = f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u) (Esser et al. 2024, eq. 20) of the step's uniform draw."""
    u = np.asarray(jax.random.uniform(KEY, (1000,)), np.float64)
    expected = 1 - u - 1.29 * (np.cos(np.pi * u / 2) ** 2 - 1 + u)
    t = 1.0 - np.asarray(draw_percent(KEY, 1000, Objective("mode")), np.float64)
    np.testing.assert_allclose(t, expected, atol=2e-7)
    assert ((0 < 1 - t) & (1 - t < 1)).all()


@pytest.mark.parametrize("prediction", list(SAMPLINGS))
def test_native_target_denoises_to_x0(prediction):
    sampling = SAMPLINGS[prediction]
    rng = np.random.default_rng(0)
    x0, noise = (jnp.asarray(rng.standard_normal((3, 4, 4, 2)), jnp.float32) for _ in range(2))
    sigma = sampling.percent_to_sigma(jnp.array([0.1, 0.5, 0.9]))
    noisy = sampling.noise_scaling(sigma, noise, x0)
    denoised = sampling.calculate_denoised(sigma, sampling.target(sigma, noise, x0), noisy)
    np.testing.assert_allclose(np.asarray(denoised), np.asarray(x0), atol=2e-5)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weighting_is_one_objective_in_every_target(prediction):
    """With MSE, the native-target loss weighted by min(SNR, 5)/SNR (eps) or /(SNR + 1) (v) equals the x0 loss
    weighted by min(SNR, 5), itself the per-sample formula written out (rtol 1e-5); without gamma the native eps
    loss is SNR times the x0 error."""
    sampling = SAMPLINGS[prediction]
    rng = np.random.default_rng(1)
    x0, noise, output = (jnp.asarray(rng.standard_normal((4, 4, 4, 2)), jnp.float32) for _ in range(3))
    sigma = sampling.percent_to_sigma(jnp.array([0.05, 0.3, 0.6, 0.95]))
    noisy = sampling.noise_scaling(sigma, noise, x0)
    losses = {}
    for target in LOSS_TARGETS:
        objective = Objective(min_snr_gamma=5.0, loss_target=target)
        pair = prediction_and_target(sampling, objective, sigma, output, noisy, noise, x0)
        losses[target] = float(weighted_loss(MSE, *pair, sigma, sampling, objective))
    denoised = np.asarray(sampling.calculate_denoised(sigma, output, noisy))
    snr = 1 / np.asarray(sigma, np.float64) ** 2
    per_sample = ((denoised - np.asarray(x0)) ** 2).mean(axis=(1, 2, 3))
    expected = np.mean(np.minimum(snr, 5.0) * per_sample)
    assert losses["x0"] == pytest.approx(expected, rel=1e-5)
    assert losses["native"] == pytest.approx(expected, rel=1e-5)
    assert not np.allclose(np.minimum(snr, 5.0), 1.0)  # the weights do differ from the node's
    if prediction == "eps":
        unweighted = Objective(loss_target="native")
        pair = prediction_and_target(sampling, unweighted, sigma, output, noisy, noise, x0)
        native = float(weighted_loss(MSE, *pair, sigma, sampling, unweighted))
        assert native == pytest.approx(np.mean(snr * per_sample), rel=1e-5)


def test_default_objective_compares_the_denoised_latents_with_x0():
    sampling = SAMPLINGS["eps"]
    rng = np.random.default_rng(2)
    x0, noise, output = (jnp.asarray(rng.standard_normal((2, 4, 4, 2)), jnp.float32) for _ in range(3))
    sigma = jnp.array([0.5, 3.0])
    noisy = sampling.noise_scaling(sigma, noise, x0)
    pair = prediction_and_target(sampling, Objective(), sigma, output, noisy, noise, x0)
    loss = weighted_loss(MSE, *pair, sigma, sampling, Objective())
    assert float(loss) == float(MSE(sampling.calculate_denoised(sigma, output, noisy), x0))


def test_offset_noise_is_constant_over_space_per_sample_and_channel():
    offset = np.asarray(offset_noise(KEY, (3, 5, 6, 4), 0.1))
    assert offset.shape == (3, 1, 1, 4)
    assert 0.01 < np.abs(offset).mean() < 0.3  # about 0.1 * sqrt(2 / pi)


def test_caption_dropout_swaps_whole_samples_at_the_rate():
    batch = 4000
    inputs = {"context": jnp.ones((batch, 3, 2)), "y": jnp.ones((batch, 5))}
    empty = {"context": jnp.zeros((batch, 3, 2)), "y": jnp.zeros((batch, 5))}
    dropped = drop_captions(KEY, inputs, empty, 0.25)
    context_gone = np.asarray(dropped["context"]).max(axis=(1, 2)) == 0
    assert (context_gone == (np.asarray(dropped["y"]).max(axis=1) == 0)).all()  # all fields together
    assert (np.asarray(dropped["context"]).min(axis=(1, 2))[~context_gone] == 1).all()
    assert abs(context_gone.mean() - 0.25) < 0.03  # 4.5 standard errors


def test_names_match_the_settings_check():
    assert config_module.CHOICES["timestep_sampling"] == TIMESTEP_SAMPLINGS
    assert config_module.CHOICES["loss_target"] == LOSS_TARGETS


@pytest.fixture(scope="module")
def headers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("headers")
    unet = load_model(write_random_checkpoint(DEMO_UNET, folder / "unet.safetensors"), weights=False)
    flux = load_model(write_random_checkpoint(TINY_FLUX_DEV, folder / "flux.safetensors"), weights=False)
    return unet, flux


@pytest.mark.parametrize("setting", [{"min_snr_gamma": 5.0}, {"noise_offset": 0.05}])
def test_eps_only_controls_are_refused_for_flow_models(headers, setting):
    _, flux = headers
    with pytest.raises(ValueError, match=f"{next(iter(setting))} applies to eps and v models"):
        preflight(flux, make_dataset(*flux_data()), TrainConfig(**setting))


def test_caption_dropout_needs_the_empty_caption(headers, tmp_path):
    unet, _ = headers
    latents, context = demo_dataset(4, 8)
    with pytest.raises(ValueError, match="empty.c_crossattn"):
        preflight(unet, make_dataset(latents, context), TrainConfig(caption_dropout=0.1))
    path = save_dataset(tmp_path / "data.safetensors", latents, context, empty={"c_crossattn": context[:1] * 0})
    dataset = load_dataset(path)
    np.testing.assert_array_equal(dataset.buckets[0].empty["c_crossattn"], context[:1] * 0)
    preflight(unet, dataset, TrainConfig(caption_dropout=0.1))  # carried: accepted


def test_an_empty_caption_of_another_width_is_refused():
    latents, context = demo_dataset(4, 8)
    with pytest.raises(DatasetError, match="empty caption's `c_crossattn`"):
        make_dataset(latents, context, empty={"c_crossattn": np.zeros((1, 77, 1024), np.float32)})


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"timestep_sampling": "sigmoid"}, "timestep_sampling"),
        ({"logit_std": 0.0}, "logit_std"),
        ({"mode_scale": 2.0}, "mode_scale"),
        ({"caption_dropout": 1.0}, "caption_dropout"),
        ({"loss_target": "eps"}, "loss_target"),
    ],
)
def test_impossible_noise_settings_are_refused(settings, key):
    with pytest.raises(SettingsError) as error:
        TrainConfig(**settings)
    assert error.value.key == key


def test_mode_scale_range_keeps_the_map_monotone():
    """f'(u) = -1 - s (-pi/2 sin(pi u) + 1) stays <= 0 on [0, 1] for s in [-1, 2 / (pi - 2)] (1.75 within it)."""
    low, high = config_module.CONTROL_RANGES["mode_scale"]
    u = np.linspace(0, 1, 1001)
    for s in (low, high):
        assert (-1 - s * (-math.pi / 2 * np.sin(math.pi * u) + 1) <= 1e-9).all()
