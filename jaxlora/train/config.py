"""The training settings: the Train LoRA node's inputs with its names, ranges and defaults, plus the options
jaxlora adds. Validated once, before any data is read or anything compiled."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from jaxlora.adapters.attach import ALGORITHMS, BYPASS_ALGORITHMS
from jaxlora.dtypes import PREDICTIONS, TRAINING_DTYPES
from jaxlora.parallel.mesh import parse_mesh
from jaxlora.train.optim import LOSSES, OPTIMIZERS

# field -> (lowest, highest), the node's ranges (spec section 1)
RANGES = {
    "batch_size": (1, 10000),
    "grad_accumulation_steps": (1, 1024),
    "steps": (1, 100000),
    "learning_rate": (1e-7, 1.0),
    "rank": (1, 128),
    "seed": (0, 2**64 - 1),
}
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable")
CHOICES = {
    "optimizer": tuple(OPTIMIZERS),
    "loss_function": tuple(LOSSES),
    "training_dtype": TRAINING_DTYPES,
    "lora_dtype": TRAINING_DTYPES,
    "algorithm": tuple(ALGORITHMS),
    "remat_policy": REMAT_POLICIES,
    "prediction": PREDICTIONS,
}


@dataclass(frozen=True)
class TrainConfig:
    """The node's inputs (same names and defaults) and jaxlora's additions below them."""

    batch_size: int = 1
    grad_accumulation_steps: int = 1
    steps: int = 16
    learning_rate: float = 0.0005
    rank: int = 8
    optimizer: str = "AdamW"
    loss_function: str = "MSE"
    seed: int = 0
    training_dtype: str = "bf16"
    lora_dtype: str = "bf16"
    algorithm: str = "LoRA"
    gradient_checkpointing: bool = True
    existing_lora: str | None = None
    # jaxlora's additions
    remat_policy: str = "nothing_saveable"  # what a rematerialised block keeps (jax.checkpoint_policies)
    bypass: bool | None = None  # LoRA in activation form; None: on for LoRA (faster, see BENCHMARKS.md)
    prediction: str = "auto"  # eps / v override for checkpoints whose type cannot be read from the weights
    mesh: str | None = None  # device mesh, e.g. "data=2,fsdp=4" (-1: the rest); None: one device
    guidance: float | None = None  # models with a guidance input: for samples whose data carries none
    flow_shift: float | None = None  # flow models: the sampling shift (None: the family's default)

    def __post_init__(self) -> None:
        for name, (low, high) in RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                raise ValueError(f"{name} must be between {low} and {high}, got {value!r}")
        for name in ("batch_size", "grad_accumulation_steps", "steps", "rank", "seed"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        for name in ("guidance", "flow_shift"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
                raise ValueError(f"{name} must be a number of at least 0, got {value!r}")
        if self.bypass is not None and not isinstance(self.bypass, bool):
            raise ValueError(f"bypass must be true or false, got {self.bypass!r}")
        if self.mesh is not None:
            parse_mesh(self.mesh)
        if self.bypass and self.algorithm not in BYPASS_ALGORITHMS:
            raise ValueError(f"bypass is available for {sorted(BYPASS_ALGORITHMS)}, not {self.algorithm}")

    @property
    def uses_bypass(self) -> bool:
        return self.algorithm in BYPASS_ALGORITHMS if self.bypass is None else self.bypass

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)
