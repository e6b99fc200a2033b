"""The samplers against k-diffusion's published update rules, written here again in plain numpy loops, and against
diffusers' schedulers set to the same sigmas; the sigma schedules against ComfyUI's scheduler formulas.

The denoiser is analytic: for data x0 ~ N(mu, s^2) per element, the exact x0 prediction of x_t = x0 + sigma noise
is (s^2 x + sigma^2 mu) / (s^2 + sigma^2), so both sides see the same model function and any difference is the
update rule's.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from jaxlora.models.flux_family import flux_schedule
from jaxlora.models.samplers import SAMPLERS, guided, normal_sigmas, simple_sigmas
from jaxlora.models.sampling import ModelSampling, discrete_flow_schedule, scaled_linear_schedule

MU, SPREAD = 0.3, 0.7
EPS_SAMPLING = ModelSampling("eps", scaled_linear_schedule())
FLOW_SAMPLING = ModelSampling("const", discrete_flow_schedule(3.0))


def analytic_x0(x, sigma):
    return (SPREAD**2 * x + sigma**2 * MU) / (SPREAD**2 + sigma**2)


def reference_euler(x, sigmas):
    """k-diffusion sample_euler, s_churn 0."""
    for i in range(len(sigmas) - 1):
        denoised = analytic_x0(x, sigmas[i])
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def reference_dpmpp_2m(x, sigmas):
    """k-diffusion sample_dpmpp_2m."""
    t_fn = lambda s: -np.log(s)  # noqa: E731
    old = None
    for i in range(len(sigmas) - 1):
        denoised = analytic_x0(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised  # sigma_fn(inf) / sigma = 0, -expm1(-inf) = 1
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
            h = t_next - t
            if old is None:
                x = (sigmas[i + 1] / sigmas[i]) * x - np.expm1(-h) * denoised
            else:
                r = (t - t_fn(sigmas[i - 1])) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
                x = (sigmas[i + 1] / sigmas[i]) * x - np.expm1(-h) * d
        old = denoised
    return x


def run(sampler, x, sigmas):
    return np.asarray(jax.jit(lambda x, s: SAMPLERS[sampler](analytic_x0, x, s))(jnp.asarray(x), jnp.asarray(sigmas)))


@pytest.fixture(scope="module")
def start():
    return np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)


@pytest.mark.parametrize("sampler, reference", [("euler", reference_euler), ("dpmpp_2m", reference_dpmpp_2m)])
def test_samplers_follow_k_diffusion_rules(start, sampler, reference):
    """Float32 scan against a float64 loop: 2e-5 relative to the latent's scale over 20 and 6 steps."""
    for sampling, steps in ((EPS_SAMPLING, 20), (EPS_SAMPLING, 6), (FLOW_SAMPLING, 20)):
        sigmas = simple_sigmas(sampling, steps)
        x = start * float(np.sqrt(1 + sigmas[0] ** 2))
        expected = reference(x.astype(np.float64), sigmas.astype(np.float64))
        np.testing.assert_allclose(run(sampler, x, sigmas), expected, atol=2e-5 * np.abs(expected).max())


def test_euler_matches_diffusers_euler_and_flow_euler(start):
    """diffusers' EulerDiscreteScheduler (eps output, custom sigmas) and FlowMatchEulerDiscreteScheduler (velocity
    output, shift 1 so the given sigmas stay) step by step: 1e-5 relative."""
    sigmas = simple_sigmas(EPS_SAMPLING, 10)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.set_timesteps(sigmas=sigmas.tolist())  # the last (0) ends the list, as ComfyUI's
    np.testing.assert_allclose(scheduler.sigmas.numpy(), sigmas, rtol=1e-6)
    x = torch.from_numpy(start * float(sigmas[0]))
    ours = run("euler", x.numpy(), sigmas)
    for sigma, timestep in zip(sigmas[:-1], scheduler.timesteps, strict=True):
        eps = (x - analytic_x0(x, float(sigma))) / float(sigma)
        x = scheduler.step(eps, timestep, x).prev_sample
    np.testing.assert_allclose(ours, x.numpy(), atol=1e-5 * np.abs(ours).max())

    sigmas = simple_sigmas(FLOW_SAMPLING, 10)
    flow = FlowMatchEulerDiscreteScheduler(shift=1.0)
    flow.set_timesteps(sigmas=sigmas[:-1].tolist())
    np.testing.assert_allclose(flow.sigmas.numpy(), sigmas, rtol=1e-6)
    x = torch.from_numpy(start)
    ours = run("euler", start, sigmas)
    for sigma, timestep in zip(sigmas[:-1], flow.timesteps, strict=True):
        velocity = (x - analytic_x0(x, float(sigma))) / float(sigma)
        x = flow.step(velocity, timestep, x).prev_sample
    np.testing.assert_allclose(ours, x.numpy(), atol=1e-5 * np.abs(ours).max())


def test_dpmpp_2m_matches_diffusers_dpm_solver_multistep(start):
    """DPMSolverMultistepScheduler (dpmsolver++, midpoint, second order, final sigma 0) on the same sigmas, in its
    variance-preserving space x / sqrt(sigma^2 + 1): 1e-4 relative (diffusers steps in float32 in another
    space)."""
    sigmas = normal_sigmas(EPS_SAMPLING, 12)
    scheduler = DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, final_sigmas_type="zero"
    )
    scheduler.set_timesteps(12)
    scheduler.sigmas = torch.from_numpy(sigmas)  # the same sigmas: the step reads only these and the step index
    x = start * float(np.sqrt(1 + sigmas[0] ** 2))
    ours = run("dpmpp_2m", x, sigmas)
    sample = torch.from_numpy(x / math.sqrt(1 + sigmas[0] ** 2))
    for i, timestep in enumerate(scheduler.timesteps):
        sigma = float(sigmas[i])
        ve = sample * math.sqrt(1 + sigma**2)
        eps = (ve - analytic_x0(ve, sigma)) / sigma
        sample = scheduler.step(eps, timestep, sample).prev_sample
    np.testing.assert_allclose(ours, sample.numpy(), atol=1e-4 * np.abs(ours).max())


def test_schedules_follow_comfyui_scheduler_formulas():
    """simple: the table's entries -(1 + int(i * 1000 / steps)); normal: sigma(linspace(999, 0, steps)) for the
    discrete schedule, sigma(linspace(1, sigma_min)) for flow (ComfyUI feeds timestep(sigma_min) back as a
    timestep); Flux dev's table has 10000 entries."""
    table = EPS_SAMPLING.schedule.sigmas
    simple = simple_sigmas(EPS_SAMPLING, 7)
    assert simple[-1] == 0 and len(simple) == 8
    np.testing.assert_array_equal(simple[:-1], [table[-(1 + int(i * 1000 / 7))] for i in range(7)])
    normal = normal_sigmas(EPS_SAMPLING, 5)
    log = np.log(table.astype(np.float64))
    expected = [np.exp(np.interp(t, np.arange(1000), log)) for t in np.linspace(999, 0, 5)]
    np.testing.assert_allclose(normal[:-1], expected, rtol=1e-5)
    assert normal[0] == pytest.approx(14.6146, rel=1e-4) and normal[-2] == pytest.approx(0.0292, rel=1e-2)

    flux = ModelSampling("const", flux_schedule())
    shifted = lambda t: math.exp(1.15) / (math.exp(1.15) + 1 / t - 1)  # noqa: E731
    assert len(flux.schedule.table()) == 10000
    np.testing.assert_allclose(simple_sigmas(flux, 4)[:-1], [shifted(1 - i / 4) for i in range(4)], rtol=1e-6)
    low = shifted(1e-4)
    expected = [shifted(t) for t in np.linspace(1.0, low, 4)]
    np.testing.assert_allclose(normal_sigmas(flux, 4), [*expected, 0.0], rtol=1e-5)


def test_guidance_mixes_predictions_and_skips_the_unconditional_pass_at_1():
    calls = []
    conditional = lambda x, s: x + 1.0  # noqa: E731

    def unconditional(x, s):
        calls.append(s)
        return x

    assert float(guided(conditional, unconditional, 4.0)(jnp.float32(2.0), 1.0)) == 2.0 + 4.0
    assert guided(conditional, unconditional, 1.0) is conditional
    assert len(calls) == 1
