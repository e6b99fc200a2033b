"""Flux's flow parameterisation against the spec's formulas (section 6): CONST, ModelSamplingFlux with its
default and resolution-dependent shift, discrete flow with shift 1 for schnell, and the Flux latent format."""

import math

import jax.numpy as jnp
import numpy as np

from jaxlora.models.flux_family import (
    FLUX_DEV,
    FLUX_LATENT,
    FLUX_SCHNELL,
    flux_resolution_shift,
    flux_sampling,
    flux_schedule,
)
from jaxlora.models.sampling import ModelSampling, discrete_flow_schedule


def flux_time_shift(mu, t):
    """ComfyUI's flux_time_shift(mu, 1, t), written as in the spec."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def test_const_parameterisation_formulas():
    sampling = ModelSampling("const", flux_schedule())
    rng = np.random.default_rng(0)
    x, out, noise = (rng.standard_normal((2, 4, 4, 16)).astype(np.float32) for _ in range(3))
    sigma = np.array([0.2, 0.7], np.float32)
    s = sigma[:, None, None, None]
    np.testing.assert_array_equal(sampling.calculate_input(sigma, jnp.asarray(x)), x)
    np.testing.assert_allclose(sampling.calculate_denoised(sigma, jnp.asarray(out), jnp.asarray(x)), x - s * out, 1e-6)
    np.testing.assert_allclose(
        sampling.noise_scaling(sigma, jnp.asarray(noise), jnp.asarray(x)), s * noise + (1 - s) * x, 1e-6
    )
    # the true velocity noise - x0 denoises back to x0
    x_t = sampling.noise_scaling(sigma, jnp.asarray(noise), jnp.asarray(x))
    np.testing.assert_allclose(sampling.calculate_denoised(sigma, jnp.asarray(noise - x), x_t), x, atol=1e-5)


def test_flux_dev_sampling_is_model_sampling_flux_with_shift_1_15():
    sampling = flux_sampling(FLUX_DEV)
    percents = np.array([1e-6, 0.1, 0.5, 0.9, 0.999], np.float32)
    expected = [flux_time_shift(1.15, 1 - p) for p in percents.astype(np.float64)]
    np.testing.assert_allclose(sampling.percent_to_sigma(percents), expected, rtol=1e-6)
    assert abs(float(sampling.percent_to_sigma(0.5)) - 0.7595109) < 1e-6  # e^1.15 / (e^1.15 + 1)
    assert float(sampling.percent_to_sigma(0.0)) == 1.0 and float(sampling.percent_to_sigma(1.0)) == 0.0
    np.testing.assert_array_equal(sampling.timestep(jnp.asarray(percents)), percents)  # timestep = sigma
    np.testing.assert_allclose(sampling.schedule.sigma(0.3), flux_time_shift(1.15, 0.3), rtol=1e-6)


def test_schnell_sampling_is_discrete_flow_with_shift_1():
    sampling = flux_sampling(FLUX_SCHNELL)
    percents = np.array([0.01, 0.25, 0.8], np.float32)
    np.testing.assert_allclose(sampling.percent_to_sigma(percents), 1 - percents, rtol=1e-6)
    np.testing.assert_array_equal(sampling.timestep(jnp.asarray(percents)), percents)
    sd3 = discrete_flow_schedule(shift=3.0, multiplier=1000.0)
    np.testing.assert_allclose(sd3.sigma(500.0), 3 * 0.5 / (1 + 2 * 0.5), rtol=1e-6)
    np.testing.assert_allclose(sd3.timestep(0.75), 750.0, rtol=1e-6)


def test_resolution_dependent_shift_matches_the_node_defaults():
    assert math.isclose(flux_resolution_shift(1024, 1024), 1.15)  # 4096 patches: max_shift
    assert math.isclose(flux_resolution_shift(256, 256), 0.5)  # 256 patches: base_shift
    assert math.isclose(flux_resolution_shift(512, 512), 0.5 + 0.65 * (1024 - 256) / 3840)
    shifted = ModelSampling("const", flux_schedule(flux_resolution_shift(512, 512)))
    np.testing.assert_allclose(shifted.percent_to_sigma(0.5), flux_time_shift(0.63, 0.5), rtol=1e-6)


def test_flux_latent_format():
    x = np.array([0.0, 1.0, -2.0], np.float32)
    np.testing.assert_allclose(FLUX_LATENT.process_in(x), (x - 0.1159) * 0.3611, rtol=1e-6)
    np.testing.assert_allclose(FLUX_LATENT.process_out(FLUX_LATENT.process_in(x)), x, rtol=1e-6, atol=1e-6)


def test_family_sampling_with_another_shift():
    shifted = flux_sampling(FLUX_DEV, 0.5)
    np.testing.assert_allclose(shifted.percent_to_sigma(0.3), flux_time_shift(0.5, 0.7), rtol=1e-6)
    schnell = flux_sampling(FLUX_SCHNELL, 3.0)
    np.testing.assert_allclose(schnell.percent_to_sigma(0.5), 3 * 0.5 / (1 + 2 * 0.5), rtol=1e-6)
