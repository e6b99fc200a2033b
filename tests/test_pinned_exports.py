"""What a short seeded training writes, pinned by hash: the exported tensors of every family and algorithm, in
every key style that can name them. A refactor must leave these bytes unchanged; a deliberate change of what is
trained or written updates the pinned digest in the same commit, with the reason in its message.

The digest covers key names, dtypes, shapes and raw bytes of the tensors (not the metadata, whose software
version and settings may change without changing the adapter)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from jaxlora import load_model
from jaxlora.adapters.formats import AdapterFileError, export_adapter
from jaxlora.models.demo import demo_dataset, write_random_checkpoint
from jaxlora.models.family import STYLES
from jaxlora.models.flux_family import TINY_FLUX_DEV, TINY_FLUX_SCHNELL
from jaxlora.models.unet_family import DEMO_UNET
from jaxlora.train.config import TrainConfig
from jaxlora.train.data import make_dataset
from jaxlora.train.loop import run_training
from tests.models.tiny_unets import SD2, SDXL
from tests.train.test_flux_train import flux_data

ALGORITHMS = ("LoRA", "LoHa", "LoKr", "OFT")
CONFIGS = {
    "sd1": DEMO_UNET,
    "sd2": SD2.config,
    "sdxl": SDXL.config,
    "flux-dev": TINY_FLUX_DEV,
    "flux-schnell": TINY_FLUX_SCHNELL,
}
# (family, algorithm) -> {style: sha256 of the exported tensors}
PINNED = {}
# In CI: every algorithm on the cheapest UNet and LoRA on SDXL and Flux dev; the rest with `pytest -m slow`.
IN_CI = {*(("sd1", a) for a in ALGORITHMS), ("sdxl", "LoRA"), ("flux-dev", "LoRA")}


def tensors_digest(tensors: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        value = np.ascontiguousarray(tensors[key])
        digest.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def family_data(family: str):
    if family.startswith("flux"):
        latents, conditioning = flux_data(count=2, size=4)
        return make_dataset(latents, conditioning)
    latents, context = demo_dataset(count=2, size=8)
    if family == "sdxl":
        rng = np.random.default_rng(5)
        return make_dataset(
            latents, {"c_crossattn": rng.standard_normal((1, 8, 2048)), "pooled_output": rng.standard_normal((1, 1280))}
        )
    if family == "sd2":
        return make_dataset(latents, np.random.default_rng(6).standard_normal((1, 8, 1024)).astype(np.float32))
    return make_dataset(latents, context)


def exported_digests(family: str, algorithm: str, folder) -> dict[str, str]:
    """Train two AdamW steps (batch 2, rank 2, fp32) and hash the adapter in each style ("refused" where the
    style cannot name it)."""
    path = write_random_checkpoint(CONFIGS[family], folder / f"{family}.safetensors", seed=7)
    model = load_model(path, dtype="fp32")
    config = TrainConfig(
        steps=2,
        batch_size=2,
        rank=2,
        algorithm=algorithm,
        learning_rate=0.01,
        seed=11,
        training_dtype="fp32",
        lora_dtype="fp32",
        gradient_checkpointing=False,
    )
    result = run_training(model, family_data(family), config, progress=lambda line: None)
    digests = {}
    for style in STYLES:
        try:
            tensors = export_adapter(result.model_with_lora, style, np.float32)
        except AdapterFileError:
            digests[style] = "refused"
        else:
            digests[style] = tensors_digest(tensors)
    return digests


@pytest.mark.parametrize(
    "family,algorithm",
    [
        (f, a) if (f, a) in IN_CI else pytest.param(f, a, marks=pytest.mark.slow)
        for f in CONFIGS
        for a in ALGORITHMS
    ],
)
def test_exported_bytes_are_pinned(family, algorithm, tmp_path):
    assert exported_digests(family, algorithm, tmp_path) == PINNED[(family, algorithm)]
