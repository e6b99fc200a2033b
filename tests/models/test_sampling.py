import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.models.sampling import LatentFormat, ModelSampling, scaled_linear_schedule
from jaxlora.models.unet_family import SD15_LATENT, SDXL_LATENT, sdxl_vector

SCHEDULE = scaled_linear_schedule()


def test_schedule_matches_comfyui_sigma_values_to_every_printed_digit():
    # ComfyUI's float32 values as printed. sigma_0 = 0.029167159 is 1.4e-6 from its rounded print, so compare
    # digits, not a relative tolerance. diffusers' float32 schedule gives 0.0291675 here and would fail.
    expected = {0: "0.0291672", 1: "0.0413144", 499: "1.6128862", 998: "14.526276", 999: "14.614641"}
    for t, printed in expected.items():
        decimals = len(printed.split(".")[1])
        assert f"{SCHEDULE.sigmas[t]:.{decimals}f}" == printed, t
    assert SCHEDULE.sigmas.dtype == np.float32 and SCHEDULE.sigmas.shape == (1000,)
    assert SCHEDULE.sigma_min == SCHEDULE.sigmas[0] and SCHEDULE.sigma_max == SCHEDULE.sigmas[999]


def test_schedule_agrees_with_diffusers_float32_scaled_linear_schedule():
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    alphas_cumprod = scheduler.alphas_cumprod.numpy()
    diffusers_sigmas = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
    np.testing.assert_allclose(SCHEDULE.sigmas, diffusers_sigmas, rtol=5e-5)
    # The scheduler's own (descending, zero-terminated) sigma table is the same curve.
    np.testing.assert_allclose(SCHEDULE.sigmas[::-1], scheduler.sigmas.numpy()[:-1], rtol=5e-5)


def test_schedule_arrays_are_read_only():
    with pytest.raises(ValueError):
        SCHEDULE.sigmas[0] = 1.0


def test_timestep_inverts_every_table_sigma():
    np.testing.assert_array_equal(SCHEDULE.timestep(SCHEDULE.sigmas), np.arange(1000, dtype=np.float32))
    assert SCHEDULE.timestep(SCHEDULE.sigmas).dtype == jnp.float32


def test_timestep_picks_nearest_index_in_log_space_not_linear_space():
    k = 0
    low, high = SCHEDULE.sigmas[k], SCHEDULE.sigmas[k + 1]
    # Just above the geometric mean but below the arithmetic mean: log-nearest is k+1, linear-nearest is k.
    between = np.float32(np.sqrt(low * high) * 1.005)
    assert between < (low + high) / 2
    assert SCHEDULE.timestep(between) == k + 1
    assert SCHEDULE.timestep(np.float32(np.sqrt(low * high) * 0.995)) == k


def test_timestep_keeps_the_shape_of_sigma():
    sigmas = jnp.asarray(SCHEDULE.sigmas[[3, 500, 999]])
    assert SCHEDULE.timestep(sigmas).shape == (3,)
    assert SCHEDULE.timestep(sigmas[0]).shape == ()


def test_sigma_interpolates_log_sigma_for_fractional_timesteps():
    log_sigmas = np.log(SCHEDULE.sigmas.astype(np.float64))
    expected = np.exp(0.75 * log_sigmas[10] + 0.25 * log_sigmas[11])
    np.testing.assert_allclose(SCHEDULE.sigma(10.25), expected, rtol=1e-6)
    linear = 0.75 * SCHEDULE.sigmas[10] + 0.25 * SCHEDULE.sigmas[11]
    assert abs(float(SCHEDULE.sigma(10.25)) - linear) > 1e-6
    np.testing.assert_allclose(SCHEDULE.sigma(jnp.arange(1000.0)), SCHEDULE.sigmas, rtol=1e-6)


def test_sigma_clamps_timesteps_outside_the_table():
    np.testing.assert_allclose(SCHEDULE.sigma(-5.0), SCHEDULE.sigmas[0], rtol=1e-6)
    np.testing.assert_allclose(SCHEDULE.sigma(2000.0), SCHEDULE.sigmas[999], rtol=1e-6)


def test_percent_to_sigma_edge_cases_match_comfyui():
    assert SCHEDULE.percent_to_sigma(0.0) == np.float32(999999999.9)
    assert SCHEDULE.percent_to_sigma(-0.1) == np.float32(999999999.9)
    assert SCHEDULE.percent_to_sigma(1.0) == 0.0
    np.testing.assert_allclose(SCHEDULE.percent_to_sigma(0.5), SCHEDULE.sigma(499.5), rtol=1e-6)


def test_percent_to_sigma_is_per_sample_under_jit():
    percents = jnp.array([0.0, 0.25, 0.5, 1.0], jnp.float32)
    sigmas = jax.jit(SCHEDULE.percent_to_sigma)(percents)
    expected = [np.float32(999999999.9), SCHEDULE.sigma(0.75 * 999), SCHEDULE.sigma(499.5), 0.0]
    np.testing.assert_allclose(sigmas, np.array(expected, np.float32), rtol=1e-6)


def _numpy_v_denoised(sigma, out, x):
    return x / (sigma**2 + 1) - out * sigma / np.sqrt(sigma**2 + 1)


@pytest.mark.parametrize(
    ("prediction", "numpy_denoised"),
    [("eps", lambda sigma, out, x: x - sigma * out), ("v", _numpy_v_denoised)],
)
def test_model_sampling_formulas_match_numpy(prediction, numpy_denoised):
    sampling = ModelSampling(prediction, SCHEDULE)
    rng = np.random.default_rng(0)
    x, out, noise = (rng.standard_normal((3, 4, 8, 8)).astype(np.float32) for _ in range(3))
    sigma = np.array([0.03, 1.6, 14.6], np.float32)
    per_sample = sigma[:, None, None, None].astype(np.float64)

    np.testing.assert_allclose(sampling.calculate_input(sigma, x), x / np.sqrt(per_sample**2 + 1), rtol=1e-5)
    np.testing.assert_allclose(
        sampling.calculate_denoised(sigma, out, x), numpy_denoised(per_sample, out, x), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(sampling.noise_scaling(sigma, noise, x), x + per_sample * noise, rtol=1e-5)


def test_sigma_broadcasts_per_sample_in_both_layouts_and_scalar_stays_scalar():
    sampling = ModelSampling("eps", SCHEDULE)
    sigma = jnp.array([1.0, 3.0])
    for shape in [(2, 4, 6, 6), (2, 6, 6, 4)]:  # NCHW, NHWC
        scaled = sampling.calculate_input(sigma, jnp.ones(shape))
        np.testing.assert_allclose(scaled[0], 1 / np.sqrt(2), rtol=1e-6)
        np.testing.assert_allclose(scaled[1], 1 / np.sqrt(10), rtol=1e-6)
    scaled = sampling.calculate_input(jnp.float32(3.0), jnp.ones((2, 4, 6, 6)))
    np.testing.assert_allclose(scaled, 1 / np.sqrt(10), rtol=1e-6)


def test_eps_denoised_recovers_x0_from_the_true_noise():
    sampling = ModelSampling("eps", SCHEDULE)
    rng = np.random.default_rng(1)
    x0, noise = (rng.standard_normal((3, 4, 8, 8)).astype(np.float32) for _ in range(2))
    sigma = jnp.array([0.03, 1.6, 14.6])
    x_t = sampling.noise_scaling(sigma, noise, x0)
    np.testing.assert_allclose(sampling.calculate_denoised(sigma, noise, x_t), x0, atol=1e-5)


def test_v_denoised_recovers_x0_from_the_true_velocity():
    sampling = ModelSampling("v", SCHEDULE)
    rng = np.random.default_rng(2)
    x0, noise = (rng.standard_normal((3, 4, 8, 8)).astype(np.float32) for _ in range(2))
    sigma = np.array([0.03, 1.6, 14.6], np.float32)
    # In the variance-preserving variable x_vp = alpha * x0 + s * noise, with alpha = 1/sqrt(sigma^2+1) and
    # s = sigma/sqrt(sigma^2+1), which is exactly calculate_input(x_t), the v target is alpha*noise - s*x0.
    alpha = (1 / np.sqrt(sigma**2 + 1))[:, None, None, None]
    s = (sigma / np.sqrt(sigma**2 + 1))[:, None, None, None]
    v = alpha * noise - s * x0
    x_t = sampling.noise_scaling(sigma, noise, x0)
    np.testing.assert_allclose(sampling.calculate_input(sigma, x_t), alpha * x0 + s * noise, atol=1e-5)
    np.testing.assert_allclose(sampling.calculate_denoised(sigma, v, x_t), x0, atol=1e-5)


def test_model_sampling_delegates_timestep_and_percent_to_the_schedule_under_jit():
    sampling = ModelSampling("v", SCHEDULE)

    @jax.jit
    def timesteps(percents):
        return sampling.timestep(sampling.percent_to_sigma(percents))

    np.testing.assert_array_equal(timesteps(jnp.array([0.0, 0.5, 0.999, 1.0])), [999.0, 500.0, 1.0, 0.0])


def test_unknown_prediction_type_is_rejected_by_name():
    with pytest.raises(ValueError, match=r"'x0'.*\['const', 'eps', 'v'\]"):
        ModelSampling("x0", SCHEDULE)


def test_latent_format_round_trips_and_has_comfyui_constants():
    assert SD15_LATENT == LatentFormat(0.18215, 0.0)
    assert SDXL_LATENT == LatentFormat(0.13025, 0.0)
    shifted = LatentFormat(scale_factor=0.3611, shift=0.1159)
    x = jnp.linspace(-3.0, 3.0, 24).reshape(1, 2, 3, 4)
    np.testing.assert_allclose(shifted.process_out(shifted.process_in(x)), x, atol=1e-6)
    np.testing.assert_allclose(shifted.process_in(x), (x - 0.1159) * 0.3611, rtol=1e-6)
    np.testing.assert_allclose(SD15_LATENT.process_in(x), x * 0.18215, rtol=1e-6)


# torch's and XLA's float32 exp round a few of the 128 frequencies one ulp apart; times a pixel size of ~2000
# that moves the phase, and so the embedding, by up to 6e-5. Any ordering or layout bug is O(1).
SIZE_EMBEDDING_ATOL = 1e-4


def _diffusers_sdxl_vector(pooled, time_ids):
    torch = pytest.importorskip("torch")
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    add_time_proj = embeddings.Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
    # As UNet2DConditionModel's "text_time" add-embedding: embed the flattened ids, then concat after pooled.
    time_ids = torch.tensor(time_ids, dtype=torch.float32)
    time_embeds = add_time_proj(time_ids.flatten()).reshape(time_ids.shape[0], -1)
    return torch.cat([torch.from_numpy(pooled), time_embeds], dim=-1).numpy()


def test_sdxl_vector_matches_diffusers_text_time_embedding_with_default_targets():
    pooled = np.random.default_rng(3).standard_normal((2, 1280)).astype(np.float32)
    y = sdxl_vector(jnp.asarray(pooled), height=1024, width=768)
    assert y.shape == (2, 2816)
    expected = _diffusers_sdxl_vector(pooled, [[1024, 768, 0, 0, 1024, 768]] * 2)
    np.testing.assert_allclose(y, expected, atol=SIZE_EMBEDDING_ATOL)


def test_sdxl_vector_accepts_per_sample_sizes_in_comfyui_order():
    pooled = np.random.default_rng(4).standard_normal((2, 1280)).astype(np.float32)
    y = sdxl_vector(
        jnp.asarray(pooled),
        height=jnp.array([1024, 832]),
        width=jnp.array([1024, 1216]),
        crop_h=jnp.array([0, 16]),
        crop_w=32,
        target_height=jnp.array([2048, 832]),
        target_width=1536,
    )
    expected = _diffusers_sdxl_vector(pooled, [[1024, 1024, 0, 32, 2048, 1536], [832, 1216, 16, 32, 832, 1536]])
    np.testing.assert_allclose(y, expected, atol=SIZE_EMBEDDING_ATOL)
