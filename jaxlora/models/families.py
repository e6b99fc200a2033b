"""What tells the model families apart, as data: detection keys, head rule, latent format, parameterisation.

Head counts are not stored in the weights: SD1.x uses 8 heads in every block, SD2.x and SDXL a head width of
64 (ComfyUI's `unet_extra_config`). The context width and the presence of `label_emb` identify the family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from jaxlora.models.sampling import (
    FLUX_LATENT,
    FLUX_SHIFT,
    SD15_LATENT,
    SDXL_LATENT,
    FlowSchedule,
    LatentFormat,
    ModelSampling,
    discrete_flow_schedule,
    flux_schedule,
)


@dataclass(frozen=True)
class UNetFamily:
    name: str
    description: str
    context_dim: int
    adm_in_channels: int | None
    num_heads: int | None
    num_head_channels: int | None
    latent_format: LatentFormat


UNET_FAMILIES = (
    UNetFamily("sd1", "Stable Diffusion 1.x", 768, None, 8, None, SD15_LATENT),
    UNetFamily("sd2", "Stable Diffusion 2.x", 1024, None, None, 64, SD15_LATENT),
    UNetFamily("sdxl", "Stable Diffusion XL", 2048, 2816, None, 64, SDXL_LATENT),
)


def find_unet_family(context_dim: int, adm_in_channels: int | None) -> UNetFamily | None:
    """The family with this context width and `y` width, or None when no supported family matches."""
    for family in UNET_FAMILIES:
        if family.context_dim == context_dim and family.adm_in_channels == adm_in_channels:
            return family
    return None


@dataclass(frozen=True)
class FluxFamily:
    """Flux.1 dev (guidance-distilled: a guidance embedding, ModelSamplingFlux with mu 1.15) or schnell (no
    guidance input, discrete flow with shift 1). Both predict a flow velocity (CONST)."""

    name: str
    description: str
    guidance: bool
    schedule: Callable[[float], FlowSchedule]
    shift: float
    latent_format: LatentFormat = FLUX_LATENT

    def sampling_with_shift(self, shift: float | None = None) -> ModelSampling:
        """The family's model sampling, with another shift if given (e.g. `flux_resolution_shift(w, h)`)."""
        return ModelSampling("const", self.schedule(self.shift if shift is None else shift))

    @property
    def sampling(self) -> ModelSampling:
        return self.sampling_with_shift()


FLUX_DEV_FAMILY = FluxFamily("flux-dev", "Flux.1 dev", True, flux_schedule, FLUX_SHIFT)
FLUX_SCHNELL_FAMILY = FluxFamily("flux-schnell", "Flux.1 schnell", False, discrete_flow_schedule, 1.0)
# guidance embedding present -> family
FLUX_FAMILIES = {True: FLUX_DEV_FAMILY, False: FLUX_SCHNELL_FAMILY}
