"""The header every adapter file carries: what was trained, on what, and how (safetensors metadata, strings).

ComfyUI loads by key names only; A1111/Forge read the kohya `ss_*` fields for display and version detection.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from jaxlora.adapters.attach import adapted_layers
from jaxlora.adapters.base import Diff
from jaxlora.adapters.lokr import LoKr
from jaxlora.adapters.oft import OFT
from jaxlora.dtypes import dtype_name
from jaxlora.models.diffusion import DiffusionModel
from jaxlora.models.registry import find_variant

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
    """What the metadata says about an adapter; `family` is the model variant's name (`Variant.name`),
    `settings` the training inputs, written as JSON."""

    family: str
    prediction: str
    algorithm: str
    rank: int
    alpha: float
    lora_dtype: str
    steps: int = 0
    training_dtype: str | None = None
    settings: Mapping = field(default_factory=dict)


def adapter_metadata(info: AdapterInfo, style: str) -> dict[str, str]:
    _, variant = find_variant(info.family)
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
        "modelspec.architecture": variant.modelspec_architecture,
        "modelspec.implementation": "jaxlora",
        "modelspec.prediction_type": PREDICTION_TYPES[info.prediction],
    }
    if style == "kohya":
        module, algo = KOHYA_NETWORKS[info.algorithm]
        version_suffix = "_v" if info.prediction == "v" and variant.kohya_v_suffix else ""
        metadata.update(
            {
                "ss_v2": str(variant.kohya_v2),
                "ss_base_model_version": variant.kohya_base_model + version_suffix,
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


def _rank_and_alpha(weight) -> tuple[int, float]:
    """What metadata calls rank and alpha for each algorithm: OFT's block size (ComfyUI's rank picks it), a
    LoKr's smaller w1 side (ComfyUI's factor), a LoRA/LoHa's rank and alpha."""
    if isinstance(weight, OFT):
        return weight.blocks.shape[1], weight.alpha
    if isinstance(weight, LoKr):
        return min(weight.w1.shape), 1.0
    return weight.rank, weight.alpha


def adapter_info(
    model: DiffusionModel,
    lora_dtype,
    steps: int = 0,
    training_dtype: str | None = None,
    settings: Mapping | None = None,
) -> AdapterInfo:
    """Metadata read off the adapters attached to `model.network`, the one source of what a file records: the
    most common algorithm among its weight adapters, and that algorithm's most common rank and alpha (an
    adapter continued from a file keeps the file's ranks and alphas, whatever a run's flags say)."""
    weights = [a.weight for _, _, a in adapted_layers(model.network) if not isinstance(a.weight, Diff | None)]
    if not weights:
        raise ValueError("the model carries no weight adapters to save")
    algorithm = Counter(type(w).__name__ for w in weights).most_common(1)[0][0]
    rank, alpha = Counter(_rank_and_alpha(w) for w in weights if type(w).__name__ == algorithm).most_common(1)[0][0]
    return AdapterInfo(
        family=model.variant.name,
        prediction=model.sampling.prediction,
        algorithm=algorithm,
        rank=int(rank),
        alpha=float(alpha),
        lora_dtype=dtype_name(lora_dtype),
        steps=steps,
        training_dtype=training_dtype,
        settings=settings or {},
    )


def parse_steps_from_name(filename: str | Path) -> int | None:
    """Steps already trained according to a file name, by ComfyUI's existing_lora rule: the `_`-separated token right
    before the first `_steps_`. None where there is no such integer (ComfyUI raises there)."""
    head, found, _ = Path(filename).name.partition("_steps_")
    token = head.rsplit("_", 1)[-1]
    return int(token) if found and re.fullmatch(r"[0-9]+", token) else None


def trained_steps(path: Path, metadata: Mapping[str, str]) -> int:
    """Steps an adapter file was trained for: its metadata, else the `_<int>_steps_` name pattern, else 0
    (warned)."""
    for key in ("steps", "ss_steps"):
        if metadata.get(key, "").isdigit():
            return int(metadata[key])
    from_name = parse_steps_from_name(path.name)
    if from_name is not None:
        return from_name
    warnings.warn(f"{path.name}: no step count in its metadata or name; counting from 0", stacklevel=2)
    return 0
