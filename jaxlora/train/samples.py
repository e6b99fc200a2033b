"""Sample images during training: the prompts are encoded once before the model loads (the text encoders are
released before its weights are read), and every N steps one jitted function turns each prompt's seeded noise
into an image with the network carrying the current adapter, the way the train step applies it, then decodes it
with the VAE; PNG files and a grid go into the output folder.

Sampling takes what it needs as arguments: the adapters and the frozen base of the run (the same arrays the
train step uses, never copied or closed over), the VAE's weights (kept on the host between samplings and
copied to the device for the call only) and the prompt's conditioning. Its jitted function is made once and
reused, so sampling holds no device memory between samplings and leaves the training step as it was. It draws
no randomness from the run: the adapter trained with samples on is the one trained without them.
"""

from __future__ import annotations

import gc
import io
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from jaxlora.encoders.model_files import EncoderFiles
from jaxlora.encoders.vae import AutoencoderKL
from jaxlora.files import write_new_file
from jaxlora.models.diffusion import DiffusionModel
from jaxlora.models.family import TextConditioning
from jaxlora.models.samplers import FLOW_SAMPLERS, SAMPLERS, SCHEDULERS, guided
from jaxlora.models.sampling import ModelSampling
from jaxlora.parallel.placement import is_writer, to_host
from jaxlora.train.data import Dataset
from jaxlora.train.sample_prompts import SamplePrompt
from jaxlora.train.step import noise_key_data

if TYPE_CHECKING:
    from jaxlora.train.loop import PreparedRun

EPS_V_CFG = 8.0  # ComfyUI KSampler's default cfg
FLOW_CFG = 1.0  # the flow models here are guidance- or step-distilled: they sample without CFG
IMAGE_DTYPE = "fp32"  # the text encoders' and VAE's weights while they are in use


@dataclass(frozen=True)
class SampleSettings:
    """How samples are drawn: each prompt's noise seed, the sampler and sigma schedule (ComfyUI's names), the
    CFG scale (None: 1 for flow models, 8 for eps/v), a guidance-distilled model's guidance input (None: the
    family's default) and the size in pixels (0: the dataset's largest bucket)."""

    seed: int = 0
    steps: int = 20
    sampler: str = "euler"
    scheduler: str = "simple"
    cfg: float | None = None
    guidance: float | None = None
    width: int = 0
    height: int = 0

    def cfg_for(self, sampling: ModelSampling) -> float:
        if self.cfg is not None:
            return self.cfg
        return FLOW_CFG if sampling.prediction == "const" else EPS_V_CFG


def check_sampling(
    model: DiffusionModel, settings: SampleSettings, prompts: Sequence[SamplePrompt], sampling: ModelSampling
) -> TextConditioning:
    """Every check that needs no weights (works on a header-only model): the family has text encoders here, the
    sampler suits the parameterisation, a guidance value has an input to go to, negative prompts have a CFG
    scale to act through. Returns the family's text conditioning."""
    description = model.variant.description
    try:
        recipe = model.family.text_conditioning(model.variant, model.config)
    except ValueError:
        raise ValueError(
            f"sample images: jaxlora has no text encoders for {description} yet, so it cannot encode the prompts; "
            "train without sample_every"
        ) from None
    if settings.sampler not in SAMPLERS or settings.scheduler not in SCHEDULERS:
        raise ValueError(f"sample images: unknown sampler {settings.sampler!r} or scheduler {settings.scheduler!r}")
    if sampling.prediction == "const" and settings.sampler not in FLOW_SAMPLERS:
        raise ValueError(f"sample_sampler {settings.sampler}: {description} is a flow model; use {FLOW_SAMPLERS}")
    if settings.guidance is not None and "guidance" not in model.network_input_names:
        raise ValueError(f"sample_guidance applies to models with a guidance input, not {description}: use sample_cfg")
    if math.isclose(settings.cfg_for(sampling), 1.0) and any(p.negative for p in prompts):
        raise ValueError(
            "sample_prompts has negative prompts (--n), which act only through CFG: set sample_cfg above 1, or "
            "remove them"
        )
    return recipe


def sample_latent_hw(dataset: Dataset, settings: SampleSettings, downscale: int) -> tuple[int, int]:
    """The latent height and width of samples: the settings' pixels over the VAE's downscale, or the dataset's
    largest bucket."""
    if settings.width:
        return settings.height // downscale, settings.width // downscale
    largest = max(dataset.buckets, key=lambda bucket: bucket.shape[1] * bucket.shape[2])
    return largest.shape[1], largest.shape[2]


def sample_function(
    graph: nnx.GraphDef,
    sampling: ModelSampling,
    dtype: jnp.dtype,
    vae_graph: nnx.GraphDef,
    model: DiffusionModel,
    settings: SampleSettings,
) -> Callable:
    """The jitted (adapters, base, vae, inputs, negative, key data, sigmas, empty latent) -> uint8 NHWC images.

    The network is the train step's (`nnx.merge(graph, adapters, base)`, fed `calculate_input` in the compute
    dtype and `timestep(sigma)`); the sampler starts from ComfyUI's full-denoise noise on the empty latent and
    the VAE decodes the latent format's raw latents; ComfyUI's SaveImage rounding (x 255, truncated)."""
    sample = SAMPLERS[settings.sampler]
    cfg = settings.cfg_for(sampling)
    latent_format = model.latent_format

    def run(adapters, base, vae_state, inputs, negative, key_data, sigmas, empty):
        network = nnx.merge(graph, adapters, base)

        def denoiser(conditioning):
            def denoise(x, sigma):
                timestep = jnp.broadcast_to(sampling.timestep(sigma), (x.shape[0],))
                output = network(sampling.calculate_input(sigma, x).astype(dtype), timestep, **conditioning)
                return sampling.calculate_denoised(sigma, output.astype(jnp.float32), x)

            return denoise

        key = jax.random.wrap_key_data(key_data, impl="threefry2x32")
        noise = jax.random.normal(key, empty.shape, jnp.float32)
        latents = sample(
            guided(denoiser(inputs), denoiser(negative), cfg), sampling.start_noise(sigmas[0], noise, empty), sigmas
        )
        vae = nnx.merge(vae_graph, vae_state)
        images = vae.decode(latent_format.process_out(latents))
        return jnp.clip(images * 255.0, 0.0, 255.0).astype(jnp.uint8)

    return jax.jit(run)


class ImageSamples:
    """The `on_sample` hook of `run_training`: called with the total steps trained, the prepared run and the
    adapter to sample with; writes `<step>_<prompt>.png` and `<step>_grid.png` into `folder` (on several
    processes all compute, process 0 writes) and returns the images [prompts, H, W, 3] uint8."""

    def __init__(
        self,
        model: DiffusionModel,
        prompts: Sequence[SamplePrompt],
        positive: Sequence[dict[str, np.ndarray]],
        negative: Sequence[dict[str, np.ndarray]] | None,
        vae: AutoencoderKL,
        settings: SampleSettings,
        latent_hw: tuple[int, int],
        folder: str | Path,
        progress: Callable[[str], None] | None = None,
    ):
        self.model, self.prompts, self.settings, self.latent_hw = model, list(prompts), settings, latent_hw
        self.positive, self.negative = list(positive), None if negative is None else list(negative)
        self.vae_graph, vae_state = nnx.split(vae)
        self.vae_state = to_host(vae_state)  # copied to the device for each sampling only
        self.folder = Path(folder)
        self.progress = progress or (lambda line: print(line, file=sys.stderr))
        self.function = None  # made on the first call, with the run's graph, and reused
        self.written: list[Path] = []

    def _inputs(self, conditioning: dict[str, np.ndarray] | None, dtype) -> dict[str, jax.Array] | None:
        if conditioning is None:
            return None
        return self.model.network_inputs(conditioning, self.latent_hw, dtype, self.settings.guidance)

    def images(self, run: PreparedRun, adapters: nnx.State) -> np.ndarray:
        """Every prompt's image with `adapters` on the run's network: [prompts, H, W, 3] uint8."""
        dtype = run.settings.compute_dtype
        if self.function is None:
            self.function = sample_function(run.graph, run.sampling, dtype, self.vae_graph, self.model, self.settings)
        sigmas = jnp.asarray(SCHEDULERS[self.settings.scheduler](run.sampling, self.settings.steps))
        empty = self.model.latent_format.process_in(jnp.zeros((1, *self.latent_hw, self.model.latent_channels)))
        base_key = noise_key_data(self.settings.seed, 0, 1)[0]
        images = []
        for i in range(len(self.prompts)):
            key = jax.random.fold_in(jax.random.wrap_key_data(base_key, impl="threefry2x32"), i)
            negative = None if self.negative is None else self._inputs(self.negative[i], dtype)
            out = self.function(
                adapters,
                run.base,
                self.vae_state,
                self._inputs(self.positive[i], dtype),
                negative,
                jax.random.key_data(key),
                sigmas,
                empty,
            )
            images.append(to_host(out)[0])
        return np.stack(images)

    def __call__(self, steps: int, run: PreparedRun, adapters: nnx.State) -> np.ndarray:
        images = self.images(run, adapters)
        if is_writer():
            names = [f"{steps:06d}_{i:02d}.png" for i in range(len(images))] + [f"{steps:06d}_grid.png"]
            pictures = [*images, grid(images)]
            self.written += [
                write_unused(self.folder / name, png_bytes(p)) for name, p in zip(names, pictures, strict=True)
            ]
            self.progress(f"sampled {len(images)} image(s) at step {steps} into {self.folder}")
        return images


def grid(images: np.ndarray) -> np.ndarray:
    """Images [N, H, W, 3] side by side in rows of ceil(sqrt(N)), black where a row is short."""
    count, height, width, channels = images.shape
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    sheet = np.zeros((rows * height, columns * width, channels), np.uint8)
    for i, image in enumerate(images):
        row, column = divmod(i, columns)
        sheet[row * height : (row + 1) * height, column * width : (column + 1) * width] = image
    return sheet


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_unused(path: Path, data: bytes) -> Path:
    """Write a new file at `path`, or at `<stem>_2<suffix>` and on when a file is there (a resumed run sampling
    a step again): never over an existing file."""
    candidate, number = path, 1
    while True:
        try:
            return write_new_file(candidate, data)
        except FileExistsError:
            number += 1
            candidate = path.with_name(f"{path.stem}_{number}{path.suffix}")


def prepare_samples(
    model: DiffusionModel,
    dataset: Dataset,
    prompts: Sequence[SamplePrompt | str],
    files: EncoderFiles,
    settings: SampleSettings,
    folder: str | Path,
    sampling: ModelSampling | None = None,
    progress: Callable[[str], None] | None = None,
) -> ImageSamples:
    """The sample hook for `model` (a header-only model is enough: call it before the weights load): checks,
    then encodes the prompts (and negative prompts where CFG is on) with the text encoders of `files`, which are
    released before it returns, and loads the VAE. `sampling`: the run's (default: the model's own)."""
    prompts = [SamplePrompt(p) if isinstance(p, str) else p for p in prompts]
    sampling = sampling or model.sampling
    recipe = check_sampling(model, settings, prompts, sampling)
    tokenizers = files.check(recipe)
    vae = files.load_vae(IMAGE_DTYPE)
    latent_hw = sample_latent_hw(dataset, settings, vae.config.downscale)
    encoder = files.caption_encoder(recipe, tokenizers, IMAGE_DTYPE)
    with_cfg = not math.isclose(settings.cfg_for(sampling), 1.0)
    encoded = encoder.encode([p.text for p in prompts] + ([p.negative for p in prompts] if with_cfg else []))
    del encoder
    gc.collect()  # the text encoders' weights go before the model's load
    positive, negative = encoded[: len(prompts)], encoded[len(prompts) :] if with_cfg else None
    return ImageSamples(model, prompts, positive, negative, vae, settings, latent_hw, folder, progress)
