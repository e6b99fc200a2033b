"""The header every adapter file carries: what was trained, on what, and how (safetensors metadata, strings).

ComfyUI loads by key names only; A1111/Forge read the kohya `ss_*` fields for display and version detection.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

from jaxlora.models.checkpoint import resolve_dtype

# jaxlora family -> (kohya ss_base_model_version, modelspec architecture)
FAMILY_NAMES = {
    "sd1": ("sd_v1", "stable-diffusion-v1/lora"),
    "sd2": ("sd_v2", "stable-diffusion-v2-512/lora"),
    "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
    "flux-dev": ("flux1", "flux-1-dev/lora"),
    "flux-schnell": ("flux1", "flux-1-schnell/lora"),
}
# prediction -> modelspec prediction_type
PREDICTION_TYPES = {"eps": "epsilon", "v": "v", "const": "flow"}
# algorithm -> (ss_network_module, LyCORIS algo name for ss_network_args)
KOHYA_NETWORKS = {
    "LoRA": ("networks.lora", None),
    "LoHa": ("lycoris.kohya", "loha"),
    "LoKr": ("lycoris.kohya", "lokr"),
    "OFT": ("lycoris.kohya", "diag-oft"),
}


def _version() -> str:
    try:
        return version("jaxlora")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class AdapterInfo:
    """What the metadata says about an adapter; `settings` are the training inputs, written as JSON."""

    family: str
    prediction: str
    algorithm: str
    rank: int
    alpha: float
    lora_dtype: str
    steps: int = 0
    training_dtype: str | None = None
    settings: Mapping = field(default_factory=dict)


def dtype_name(dtype) -> str:
    """ "bf16", "fp32" or "fp16" for a dtype or any of its accepted names."""
    name = resolve_dtype(dtype).name
    return {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}.get(name, name)


def adapter_metadata(info: AdapterInfo, style: str) -> dict[str, str]:
    base_version, architecture = FAMILY_NAMES[info.family]
    metadata = {
        "software": f"jaxlora {_version()}",
        "format": style,
        "steps": str(info.steps),
        "algorithm": info.algorithm,
        "rank": str(info.rank),
        "alpha": repr(float(info.alpha)),
        "base_model": info.family,
        "prediction": info.prediction,
        "lora_dtype": info.lora_dtype,
        "training_dtype": str(info.training_dtype),
        "training_settings": json.dumps(dict(info.settings), sort_keys=True, default=str),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "jaxlora",
        "modelspec.prediction_type": PREDICTION_TYPES[info.prediction],
    }
    if style == "kohya":
        module, algo = KOHYA_NETWORKS[info.algorithm]
        version_suffix = "_v" if info.prediction == "v" and info.family in ("sd1", "sd2") else ""
        metadata.update(
            {
                "ss_v2": str(info.family == "sd2"),
                "ss_base_model_version": base_version + version_suffix,
                "ss_network_module": module,
                "ss_network_dim": str(info.rank),
                "ss_network_alpha": repr(float(info.alpha)),
                "ss_network_args": json.dumps({"algo": algo} if algo else {}),
                "ss_steps": str(info.steps),
                "ss_mixed_precision": str(info.training_dtype),
                "ss_training_comment": "trained with jaxlora",
                **{f"ss_{k}": str(v) for k, v in info.settings.items() if k in ("learning_rate", "optimizer", "seed")},
            }
        )
    return metadata
