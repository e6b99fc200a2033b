"""What a short seeded training writes, pinned: the exported tensors of every family and algorithm, in every key
style that can name them. A refactor must leave them unchanged; a deliberate change of what is trained or written
re-pins them in the same commit (`python -m tests.test_pinned_exports FAMILY/ALGORITHM ...`, or no argument for
all), with the reason in its message.

Each style is pinned by a fingerprint of its tensors (`tensors_fingerprint`), not by a hash of their bytes: the
bytes of a float computation depend on the CPU that compiled it (XLA:CPU generates code for the host's vector
units, so an AVX2 and an AVX-only machine train bitwise different adapters), and a pin must hold on any machine.
Key names, dtypes and shapes are pinned exactly; values within a tolerance four times the cross-machine noise
measured, which still catches a 2e-3 relative change in any one tensor. The metadata is left out: its software
version and settings may change without changing the adapter.

The run trains with SGD: the tiny UNets' 32-channel levels have one channel per GroupNorm group, so a few biases have a
gradient that is zero in exact arithmetic and rounding noise in floats, which Adam's normalised update would turn
into full-size, machine-dependent steps. SGD keeps those tensors at the noise's own size, where the fingerprint's
floor ignores them."""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlora import load_model
from jaxlora.adapters.formats import AdapterFileError, export_adapter
from jaxlora.models.chroma_family import TINY_CHROMA
from jaxlora.models.demo import demo_dataset, write_random_checkpoint
from jaxlora.models.family import STYLES
from jaxlora.models.flux2_family import TINY_FLUX2_KLEIN
from jaxlora.models.flux_family import TINY_FLUX_DEV, TINY_FLUX_SCHNELL
from jaxlora.models.nextdit_family import TINY_LUMINA2, TINY_Z_IMAGE
from jaxlora.models.qwen_image_family import TINY_QWEN_IMAGE
from jaxlora.models.unet_family import DEMO_UNET
from jaxlora.models.wan_family import TINY_WAN21
from jaxlora.train.config import TrainConfig
from jaxlora.train.data import make_dataset
from jaxlora.train.loop import run_training
from tests.models.tiny_unets import SD2, SDXL
from tests.train.test_chroma_train import chroma_data
from tests.train.test_flux2_train import flux2_data
from tests.train.test_flux_train import flux_data
from tests.train.test_nextdit_train import nextdit_data
from tests.train.test_qwen_image_train import qwen_image_data
from tests.train.test_wan_train import video_data

ALGORITHMS = ("LoRA", "LoHa", "LoKr", "OFT")
CONFIGS = {
    "sd1": DEMO_UNET,
    "sd2": SD2.config,
    "sdxl": SDXL.config,
    "flux-dev": TINY_FLUX_DEV,
    "flux-schnell": TINY_FLUX_SCHNELL,
    "chroma": TINY_CHROMA,
    "flux2-klein": TINY_FLUX2_KLEIN,
}

# Wan 2.1 runs on 2-frame video latents; NextDiT is Z-Image and Lumina 2.
CONFIGS |= {
    "z-image": TINY_Z_IMAGE,
    "lumina2": TINY_LUMINA2,
    "qwen-image": TINY_QWEN_IMAGE,
    "wan2.1": TINY_WAN21,
}
# In CI: every algorithm on the cheapest UNet and LoRA on SDXL and Flux dev; the rest with `pytest -m slow`
# (each family's LoRA training test runs in CI, so its code paths are exercised there; the tensors are pinned here).
IN_CI = {*(("sd1", a) for a in ALGORITHMS), ("sdxl", "LoRA"), ("flux-dev", "LoRA")}

# "family/algorithm" -> {style: fingerprint, or "refused" where the style cannot name the adapter}
PINNED_FILE = Path(__file__).with_name("pinned_exports.json")
FEATURES = 8  # random projections per fingerprint part
# Tensors whose RMS is below this fraction of the median tensor's are rounding noise (see the module docstring):
# their shape is pinned, their values barely weigh.
NOISE_FLOOR = 1e-2
# Cross-machine noise, measured as the difference between code generated for AVX and for SSE4.2
# (`--xla_cpu_max_isa`, full LLVM optimisation) over 11 cases: at most 9.1e-6 in any feature (SDXL LoRA). A 2e-3
# relative change of any one tensor moves some feature by 5e-5 or more (the weakest: one alpha scalar among SDXL's
# 1144 tensors); most tensors, and any change spread over many, by far more.
FEATURE_TOLERANCE = 4e-5


def tensors_fingerprint(tensors: dict[str, np.ndarray]) -> dict:
    """Exact layout (sha256 of key names, dtypes, shapes) and value features that are stable across machines.

    Every tensor is scaled to unit RMS (floored at `NOISE_FLOOR` times the median tensor's RMS), so a small tensor
    weighs as much as a big one. `directions` are seeded random projections of all scaled values (one number sees
    every value of every tensor); `magnitudes` are seeded random combinations of the tensors' log RMS."""
    keys = sorted(tensors)
    layout = hashlib.sha256()
    for key in keys:
        layout.update(f"{key}|{tensors[key].dtype.str}|{tensors[key].shape}\n".encode())
    values = [np.asarray(tensors[key], np.float64).ravel() for key in keys]
    rms = np.array([np.sqrt(np.mean(v * v)) if v.size else 0.0 for v in values])
    scale = np.maximum(rms, max(NOISE_FLOOR * float(np.median(rms)), 1e-30))
    rng = np.random.default_rng(0)
    total = sum(v.size for v in values)
    directions = sum(rng.standard_normal((FEATURES, v.size)) @ (v / s) for v, s in zip(values, scale, strict=True))
    magnitudes = rng.standard_normal((FEATURES, len(keys))) @ np.log(scale)
    return {
        "layout": layout.hexdigest(),
        "directions": (directions / np.sqrt(total)).tolist(),
        "magnitudes": (magnitudes / np.sqrt(len(keys))).tolist(),
    }


def family_data(family: str):
    if family == "qwen-image":
        return make_dataset(*qwen_image_data(count=2, size=4))
    if family.startswith("flux2"):
        return make_dataset(*flux2_data(count=2, size=4))
    if family == "chroma":
        return make_dataset(*chroma_data(count=2, size=4))
    if family.startswith("wan"):
        return make_dataset(*video_data(count=2, frames=2, size=(4, 4)))
    if family in ("z-image", "lumina2"):
        latents, conditioning = nextdit_data(CONFIGS[family].cap_feat_dim, count=2, size=4)
        return make_dataset(latents, conditioning)
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


def exported_fingerprints(family: str, algorithm: str, folder: Path) -> dict[str, dict | str]:
    """Train two SGD steps (batch 2, rank 2, fp32) and fingerprint the adapter in each style ("refused" where the
    style cannot name it)."""
    path = write_random_checkpoint(CONFIGS[family], folder / f"{family}.safetensors", seed=7)
    model = load_model(path, dtype="fp32")
    config = TrainConfig(
        steps=2,
        batch_size=2,
        rank=2,
        algorithm=algorithm,
        optimizer="SGD",
        learning_rate=0.01,
        seed=11,
        training_dtype="fp32",
        lora_dtype="fp32",
        gradient_checkpointing=False,
    )
    result = run_training(model, family_data(family), config, progress=lambda line: None)
    fingerprints = {}
    for style in STYLES:
        try:
            tensors = export_adapter(result.model_with_lora, style, np.float32)
        except AdapterFileError:
            fingerprints[style] = "refused"
        else:
            fingerprints[style] = tensors_fingerprint(tensors)
    return fingerprints


@pytest.mark.parametrize(
    "family,algorithm",
    [(f, a) if (f, a) in IN_CI else pytest.param(f, a, marks=pytest.mark.slow) for f in CONFIGS for a in ALGORITHMS],
)
def test_exported_tensors_are_pinned(family, algorithm, tmp_path):
    case = f"{family}/{algorithm}"
    pinned = json.loads(PINNED_FILE.read_text()).get(case)
    if pinned is None:
        pytest.fail(f"{case} is not pinned: run `python -m tests.test_pinned_exports {case}` and commit the result")
    trained = exported_fingerprints(family, algorithm, tmp_path)
    refused = {s: f == "refused" for s, f in trained.items()}
    assert refused == {s: f == "refused" for s, f in pinned.items()}, "the styles that can name the adapter changed"
    for style, fingerprint in trained.items():
        if fingerprint == "refused":
            continue
        assert fingerprint["layout"] == pinned[style]["layout"], f"{style}: key names, dtypes or shapes changed"
        for part in ("directions", "magnitudes"):
            np.testing.assert_allclose(
                fingerprint[part], pinned[style][part], rtol=0, atol=FEATURE_TOLERANCE, err_msg=f"{style} {part}"
            )


def repin(cases: list[str]) -> None:
    """Train the named "family/algorithm" cases (all when none is named) and write their fingerprints."""
    known = [f"{f}/{a}" for f in CONFIGS for a in ALGORITHMS]
    if unknown := [case for case in cases if case not in known]:
        raise SystemExit(f"unknown cases {unknown}: name them FAMILY/ALGORITHM, from {known}")
    pinned = json.loads(PINNED_FILE.read_text()) if PINNED_FILE.exists() else {}
    for case in cases or known:
        family, algorithm = case.split("/")
        with tempfile.TemporaryDirectory() as folder:
            pinned[case] = exported_fingerprints(family, algorithm, Path(folder))
        print(case, flush=True)
        staged = PINNED_FILE.with_suffix(".json.partial")
        staged.write_text(json.dumps(pinned, indent=1, sort_keys=True) + "\n")
        staged.replace(PINNED_FILE)


if __name__ == "__main__":
    import tests.conftest  # noqa: F401  the tests' XLA flags, set before JAX starts its backend

    jax.config.update("jax_platforms", "cpu")  # as in the tests: pins are made on the CPU
    repin(sys.argv[1:])
