"""A run's settings: the Train LoRA node's inputs with its names, ranges and defaults plus the training options
jaxlora adds (`TrainConfig`), and where a run reads and writes (`RunOptions`). Validated once, before any data is
read or anything compiled.

This module imports no JAX, so that a bad flag, TOML value or output folder is refused in a fraction of a second.
The registries' names are therefore spelled out here (tests check them against `adapters.attach.ALGORITHMS`,
`train.optim.OPTIMIZERS` and `LOSSES`, `train.schedule.SCHEDULES` and `models.family.STYLES`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path, PurePath

from jaxlora.dtypes import PREDICTIONS, TRAINING_DTYPES

# field -> (lowest, highest), the node's ranges (spec section 1)
RANGES = {
    "batch_size": (1, 10000),
    "grad_accumulation_steps": (1, 1024),
    "steps": (1, 100000),
    "learning_rate": (1e-7, 1.0),
    "rank": (1, 128),
    "seed": (0, 2**64 - 1),
    "checkpoint_depth": (1, 5),
}
# jaxlora's numeric training controls -> (lowest, highest); None (where allowed) is never out of range
CONTROL_RANGES = {
    "warmup_steps": (0, 100000),
    "lr_cycles": (1, 1000),
    "lr_power": (1e-6, 100.0),
    "lr_min_ratio": (0.0, 1.0),
    "weight_decay": (0.0, 10.0),
    "beta1": (0.0, 0.999999),
    "beta2": (0.0, 0.999999),
    "eps": (1e-38, 1.0),
    "max_grad_norm": (1e-8, 1e8),
    "logit_mean": (-10.0, 10.0),
    "logit_std": (1e-3, 10.0),
    "mode_scale": (-1.0, 1.75),  # where SD3's mode density stays a monotone map of u
    "noise_offset": (0.0, 1.0),
    "min_snr_gamma": (1e-3, 1e6),
    "caption_dropout": (0.0, 0.99),
    "min_sigma": (0.0, 1.0),
    "max_sigma": (0.0, 1.0),
    "ema_decay": (0.5, 0.999999),
    "validation_split": (0.0, 0.9),
}
# a knob -> (the setting that chooses its owner, the owners it applies to); set elsewhere it would do nothing
KNOB_OWNERS = {
    "lr_cycles": ("lr_scheduler", ("cosine_with_restarts",)),
    "lr_power": ("lr_scheduler", ("polynomial",)),
    "lr_min_ratio": ("lr_scheduler", ("linear", "cosine", "cosine_with_restarts", "polynomial")),
    "logit_mean": ("timestep_sampling", ("logit_normal",)),
    "logit_std": ("timestep_sampling", ("logit_normal",)),
    "mode_scale": ("timestep_sampling", ("mode",)),
}
# optimizer -> the hyper-parameters it takes (the others are refused), as in train.optim.OPTIMIZERS
OPTIMIZER_KNOBS = {
    "AdamW": ("weight_decay", "beta1", "beta2", "eps"),
    "Adam": ("weight_decay", "beta1", "beta2", "eps"),
    "SGD": ("weight_decay",),
    "RMSprop": ("weight_decay", "beta2", "eps"),
    "Adafactor": ("weight_decay", "eps"),
    "Lion": ("weight_decay", "beta1", "beta2"),
    "Prodigy": ("weight_decay", "beta1", "beta2", "eps"),
    "ScheduleFreeAdamW": ("weight_decay", "beta1", "beta2", "eps"),
}
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
REMAT_POLICIES = (
    "nothing_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "everything_saveable",
    "offload_dots_with_no_batch_dims",  # dots_with_no_batch_dims kept in host memory (models.stack)
    "offload_block_inputs",  # each stacked block's input kept in host memory, the rest recomputed (models.stack)
)
BYPASS_BY_DEFAULT = ("LoRA",)  # algorithms whose activation form is on unless bypass is false (it is faster)
QUANTIZATIONS = ("none", "int8", "fp8", "fp8_channel")  # as models.quantize.QUANTIZATIONS
# checkpoint_depth -> the per-block remat policy it maps onto (see TrainConfig.remat)
DEPTH_POLICIES = {1: "nothing_saveable", 2: "nothing_saveable", 3: "dots_with_no_batch_dims_saveable"}
STYLES = ("comfyui", "kohya", "peft")  # adapter key styles
CHOICES = {
    "optimizer": tuple(OPTIMIZER_KNOBS),
    "loss_function": ("MSE", "L1", "Huber", "SmoothL1"),
    "training_dtype": (*TRAINING_DTYPES, "none"),
    "lora_dtype": TRAINING_DTYPES,
    "algorithm": ("LoRA", "LoHa", "LoKr", "OFT"),
    "remat_policy": REMAT_POLICIES,
    "base_quantization": QUANTIZATIONS,
    "prediction": PREDICTIONS,
    "format": STYLES,
    "ema_export": ("beside", "instead"),
    "lr_scheduler": SCHEDULES,
    "timestep_sampling": ("uniform", "logit_normal", "mode"),
    "loss_target": ("x0", "native"),
    "sample_sampler": ("euler", "dpmpp_2m"),  # models.samplers.SAMPLERS
    "sample_scheduler": ("simple", "normal"),  # models.samplers.SCHEDULERS
}

# One line of meaning per setting, for --help and the notebook's form.
MEANINGS = {
    "model": ".safetensors checkpoint of a supported model (the README lists them; jaxlora.inspect checks one)",
    "dataset": "SaveTrainingDataset folder, or a .safetensors dataset file or folder of them",
    "images": "folder of captioned images to encode into the dataset (instead of --dataset)",
    "resolution": "images: bucket side in pixels, area resolution^2 (0: the model's, 512 or 1024)",
    "vae": "images and samples: VAE file, when the checkpoint has none (ComfyUI's models/vae/)",
    "text_encoders": "images and samples: text-encoder files, comma-separated (ComfyUI's models/text_encoders/)",
    "tokenizers": "images and samples: folder of tokenizer files, e.g. ComfyUI's comfy/ (none: fetched once from "
    "the hub)",
    "batch_size": "samples per micro-step",
    "grad_accumulation_steps": "micro-steps whose gradients make one optimizer step",
    "steps": "optimizer steps to train in this run",
    "learning_rate": "the optimizer's step size",
    "rank": "adapter rank (OFT: block size)",
    "optimizer": "the node's four with torch's defaults, or Adafactor, Lion, Prodigy (learning_rate ~1), "
    "ScheduleFreeAdamW",
    "loss_function": "loss between the denoised and the clean latents",
    "seed": "seeds noise, timesteps, batches and adapter initialisation",
    "training_dtype": "dtype of the frozen weights and activations (none: keep the stored dtypes, fp8 included; "
    "compute in fp16 for fp16 models, else bf16)",
    "quantized_backward": "on a quantized base (base_quantization, or fp8 stored with training_dtype none): the "
    "backward pass multiplies by the int8/fp8 weights directly, the gradient quantized per row (adapters in "
    "activation form)",
    "checkpoint_depth": "the node's checkpoint depth: 1-2 remat each block keeping nothing, 3-5 keep the "
    "projections' outputs (dots_with_no_batch_dims_saveable)",
    "offloading": "keep the repeated blocks' frozen weights and saved inputs in host memory, fetched one block at "
    "a time (remat_policy offload_block_inputs)",
    "bucket_mode": "the node's pre-bucketed input: accepted; jaxlora always buckets by resolution",
    "bypass_mode": "every adapter in activation form (ComfyUI's bypass), for LoRA, LoHa, LoKr and OFT",
    "base_quantization": "store the frozen weights quantized: int8 (per channel), fp8 (e4m3, per tensor), "
    "fp8_channel; dequantized per layer in the step. An fp8 file's weights (a scaled-fp8 file's with its scales) "
    "are kept as stored under fp8",
    "lora_dtype": "adapter compute rounding and file dtype (optimizer state stays fp32)",
    "algorithm": "adapter algorithm",
    "gradient_checkpointing": "recompute each block's activations in the backward pass (saves memory)",
    "existing_lora": "adapter file to continue training (any key style ComfyUI loads)",
    "remat_policy": "what a recomputed block keeps (jax.checkpoint_policies)",
    "bypass": "adapters in activation form (on for LoRA unless --no-bypass; bypass_mode: on for all)",
    "prediction": "eps or v for checkpoints whose prediction type the weights do not show",
    "mesh": "device mesh such as data=2,fsdp=4 (-1: the devices left); none: one device",
    "guidance": "models with a guidance input (guidance-distilled): guidance for samples whose data carries none",
    "flow_shift": "flow-matching models: the sampling shift (none: the model's own)",
    "lr_scheduler": "learning-rate shape after the warmup (constant: the node's fixed rate)",
    "warmup_steps": "steps of linear warmup from 0 to learning_rate (not with constant)",
    "lr_cycles": "cosine_with_restarts: the number of cosine cycles",
    "lr_power": "polynomial: the decay's power (1: linear)",
    "lr_min_ratio": "decaying schedules: the final rate as a fraction of learning_rate",
    "weight_decay": "the optimizer's weight decay (none: its default, AdamW 0.01, others 0)",
    "beta1": "first-moment decay where the optimizer has one (none: its default, 0.9)",
    "beta2": "second-moment decay (RMSprop: alpha) where the optimizer has one (none: its default)",
    "eps": "the optimizer's epsilon where it has one (none: its default)",
    "max_grad_norm": "clip the gradients' global norm to this before the update (none: no clipping)",
    "timestep_sampling": "noise-level distribution: uniform (the node's), logit_normal or mode (SD3)",
    "logit_mean": "logit_normal: mean of the normal whose sigmoid is the noise fraction t (t = 1: pure noise)",
    "logit_std": "logit_normal: standard deviation of that normal",
    "mode_scale": "mode: SD3's scale s of f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u)",
    "noise_offset": "eps/v models: scale of per-channel constant noise added to the noise (0: none)",
    "min_snr_gamma": "eps/v models: weight samples by min(SNR, gamma) in x0 terms (none: unweighted)",
    "loss_target": "x0 (the node's x0-space loss) or native (the model's own target: eps, v or flow velocity)",
    "caption_dropout": "probability of training a sample on the empty caption (the dataset must carry it)",
    "min_sigma": "flow models: lowest noise level trained; each drawn sigma is rescaled onto [min_sigma, max_sigma] "
    "(a high-noise expert of a two-expert model, e.g. 0.875)",
    "max_sigma": "flow models: highest noise level trained (a low-noise expert, e.g. 0.875)",
    "ema_decay": "keep an exponential moving average of the adapter with this decay, e.g. 0.999 (none: no EMA)",
    "validation_split": "fraction of the dataset held out for the validation loss, chosen from the seed (0: none)",
    "output_dir": "folder for the adapter, loss history and plot",
    "prefix": "file name prefix inside the output folder, may include sub-folders",
    "format": "adapter key style: comfyui, kohya (A1111/Forge) or peft (LoRA only)",
    "checkpoint_every": "write a resumable checkpoint every N steps (0: only at the end)",
    "resume": "continue the latest unfinished run of this output folder and prefix, or the run named (run_00002)",
    "ema_export": "with ema_decay: write the EMA adapter beside the trained one (<name>ema.safetensors) or instead",
    "save_every": "write a ComfyUI-loadable adapter into <prefix>_saves/ every N steps (0: only the final one)",
    "save_last": "keep only the last K adapters saved during the run (0: all)",
    "keep_checkpoints": "keep a finished run's checkpoints (by default deleted once the adapter is written)",
    "validation_dataset": "dataset of held-out samples for the validation loss (same formats as --dataset)",
    "validate_every": "validation loss every N steps as well as after the last (0: only after the last)",
    "log_dir": "folder for TensorBoard event files (needs tensorboardX: pip install 'jaxlora[tensorboard]')",
    "wandb_project": "log to this Weights & Biases project (needs wandb installed and logged in)",
    "sample_every": "sample images into <prefix>_samples/ every N steps and at the end (0: no samples)",
    "sample_prompts": "samples: text file, one prompt per line ('# ' comments; ' --n TEXT' a negative prompt)",
    "sample_seed": "samples: seed of each prompt's starting noise (the same at every sampled step)",
    "sample_steps": "samples: sampler steps (KSampler's default 20)",
    "sample_sampler": "samples: euler, or dpmpp_2m (eps/v models)",
    "sample_scheduler": "samples: ComfyUI's sigma schedule, simple or normal",
    "sample_cfg": "samples: classifier-free guidance scale (none: 1 for flow models, whose distilled guidance goes "
    "in the guidance input; KSampler's 8 for eps/v)",
    "sample_guidance": "samples: the guidance input of guidance-distilled models (none: the model's default, 3.5)",
    "sample_width": "samples: width in pixels, a multiple of 64 (0: the dataset's largest bucket)",
    "sample_height": "samples: height in pixels, a multiple of 64 (0: the dataset's largest bucket)",
}
# sample-image settings -> (lowest, highest)
SAMPLE_RANGES = {
    "sample_every": (0, 100000),
    "sample_seed": (0, 2**64 - 1),
    "sample_steps": (1, 1000),
    "sample_cfg": (0.0, 100.0),
    "sample_guidance": (0.0, 100.0),
    "sample_width": (0, 16384),
    "sample_height": (0, 16384),
}


class SettingsError(ValueError):
    """A setting out of its range, not among its choices, or unknown; `key` names it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class SettingTypeError(SettingsError, TypeError):
    """A setting of the wrong type, e.g. `learning_rate = "1e-4"` in a TOML file (a string, not a number)."""


_KINDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}
_FOUND = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", dict: "a table", list: "an array"}


def _fits(value: object, kind: str) -> bool:
    """Python's types as TOML and flags give them: a bool is no number, an int is a valid float."""
    if isinstance(value, bool):
        return kind == "bool"
    accepted = {"int": int, "float": int | float, "str": str}.get(kind)
    return accepted is not None and isinstance(value, accepted)


def check_types(settings: object) -> None:
    """Refuse a dataclass field whose value does not fit its annotation, before any range is checked, so that a
    string where a number belongs reads as a type error naming the key."""
    for spec in fields(settings):
        value = getattr(settings, spec.name)
        kinds = spec.type.split(" | ")
        if value is None and "None" in kinds:
            continue
        if not any(_fits(value, kind) for kind in kinds):
            expected = " or ".join(_KINDS[kind] if kind != "None" else "unset" for kind in kinds)
            found = _FOUND.get(type(value), type(value).__name__)
            raise SettingTypeError(spec.name, f"{spec.name} must be {expected}, got {value!r} ({found})")


def check_choices(settings: object) -> None:
    """Refuse a value that is not among its field's CHOICES."""
    for spec in fields(settings):
        value = getattr(settings, spec.name)
        if spec.name in CHOICES and value not in CHOICES[spec.name]:
            raise SettingsError(spec.name, f"{spec.name} must be one of {list(CHOICES[spec.name])}, got {value!r}")


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
    # the node's newer inputs (2026)
    quantized_backward: bool = False
    checkpoint_depth: int = 1
    offloading: bool = False
    bucket_mode: bool = False
    bypass_mode: bool = False
    # jaxlora's additions
    remat_policy: str = "nothing_saveable"  # what a rematerialised block keeps (jax.checkpoint_policies)
    bypass: bool | None = None  # adapters in activation form; None: on for LoRA (faster, see BENCHMARKS.md)
    base_quantization: str = "none"  # frozen weights stored int8 / fp8 (models.quantize)
    prediction: str = "auto"  # eps / v override for checkpoints whose type cannot be read from the weights
    mesh: str | None = None  # device mesh, e.g. "data=2,fsdp=4" (-1: the rest); None: one device
    guidance: float | None = None  # models with a guidance input: for samples whose data carries none
    flow_shift: float | None = None  # flow models: the sampling shift (None: the family's default)
    # learning-rate schedule (train.schedule)
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    lr_cycles: int = 1
    lr_power: float = 1.0
    lr_min_ratio: float = 0.0
    # optimizer hyper-parameters (train.optim; None: the optimizer's default)
    weight_decay: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    eps: float | None = None
    max_grad_norm: float | None = None
    # noise and loss (train.objective)
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    loss_target: str = "x0"
    caption_dropout: float = 0.0
    min_sigma: float = 0.0
    max_sigma: float = 1.0
    ema_decay: float | None = None  # moving average of the adapter (train.optim.with_ema)
    validation_split: float = 0.0  # held-out fraction of the dataset (train.validation): not trained on

    def __post_init__(self) -> None:
        check_types(self)
        for name, (low, high) in {**RANGES, **CONTROL_RANGES}.items():
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise SettingsError(name, f"{name} must be between {low} and {high}, got {value!r}")
        check_choices(self)
        check_schedule(self)
        check_optimizer(self)
        for name in ("guidance", "flow_shift"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise SettingsError(name, f"{name} must be a number of at least 0, got {value!r}")
        if self.min_sigma >= self.max_sigma:
            raise SettingsError("min_sigma", f"min_sigma ({self.min_sigma}) must be below max_sigma ({self.max_sigma})")
        if self.mesh is not None:
            from jaxlora.parallel.mesh import parse_mesh  # imports JAX: only when a mesh is asked for

            parse_mesh(self.mesh)
        check_memory_settings(self)

    @property
    def uses_bypass(self) -> bool:
        """bypass_mode (the node's) puts every algorithm in activation form; bypass (jaxlora's) chooses per run."""
        if self.bypass is not None:
            return self.bypass
        return self.bypass_mode or self.algorithm in BYPASS_BY_DEFAULT

    @property
    def remat(self) -> str | None:
        """The per-block remat policy, None without gradient checkpointing. jaxlora always rematerialises per
        block (a DiT/ResBlock/transformer block); the node's checkpoint_depth picks what a block keeps: depth 1
        (the node's whole network in one checkpoint) and 2 (each block, ComfyUI's former default) keep nothing
        but the block input; depths 3-5 (sub-modules inside blocks) keep the projections' outputs between them.
        offloading keeps the block inputs in host memory and recomputes the rest (its frozen weights also stay
        there: `loop.prepare_run`). An explicit remat_policy wins."""
        if not self.gradient_checkpointing:
            return None
        if self.remat_policy != "nothing_saveable":
            return self.remat_policy
        if self.offloading:
            return "offload_block_inputs"
        return DEPTH_POLICIES[min(self.checkpoint_depth, 3)]

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, object]) -> TrainConfig:
        return cls(**_known(cls, values, "training settings"))


_TRAINING_FIELDS = [spec.name for spec in fields(TrainConfig)]
TRAINING_CONTROLS = tuple(_TRAINING_FIELDS[_TRAINING_FIELDS.index("lr_scheduler") :])  # schedules, optimizer, ...


def check_memory_settings(config: TrainConfig) -> None:
    """The node's newer inputs where jaxlora cannot honour them, and settings that contradict each other."""
    if config.quantized_backward and not config.uses_bypass:
        raise SettingsError(
            "quantized_backward",
            f"quantized_backward runs the backward pass of the product with the quantized base weight, which stands "
            f"apart from the adapter only in activation form; {config.algorithm} patches the weight here: set "
            "bypass_mode (or bypass true)",
        )
    if config.quantized_backward and config.base_quantization == "none" and config.training_dtype != "none":
        raise SettingsError(
            "quantized_backward",
            "quantized_backward needs a quantized base: base_quantization int8, fp8 or fp8_channel (or training_dtype "
            "none on a checkpoint stored in fp8)",
        )
    if config.bypass_mode and config.bypass is False:
        raise SettingsError("bypass", "bypass_mode puts adapters in activation form; it contradicts bypass false")
    explicit = config.remat_policy != "nothing_saveable"
    if explicit and (config.offloading or config.checkpoint_depth > 2):
        raise SettingsError(
            "remat_policy",
            f"remat_policy {config.remat_policy} is chosen explicitly; checkpoint_depth and offloading choose one "
            "too: set one or the other",
        )
    if config.offloading and not config.gradient_checkpointing:
        raise SettingsError("offloading", "offloading applies to gradient checkpointing, which is off")


def check_schedule(config: TrainConfig) -> None:
    """A warmup needs a schedule that has one, a decaying schedule needs steps after its warmup, and a knob moved
    off its default needs the schedule or noise distribution it belongs to (it would be ignored otherwise)."""
    defaults = {spec.name: spec.default for spec in fields(config)}
    for name, (owner, owners) in KNOB_OWNERS.items():
        if getattr(config, name) != defaults[name] and getattr(config, owner) not in owners:
            raise SettingsError(name, f"{name} applies to {owner} {' or '.join(owners)}, not {getattr(config, owner)}")
    if config.warmup_steps and config.lr_scheduler == "constant":
        raise SettingsError(
            "warmup_steps", "warmup_steps needs a schedule with a warmup: lr_scheduler constant_with_warmup, or another"
        )
    if config.lr_scheduler not in ("constant", "constant_with_warmup") and config.warmup_steps >= config.steps:
        raise SettingsError(
            "warmup_steps",
            f"lr_scheduler {config.lr_scheduler} decays after its warmup: warmup_steps ({config.warmup_steps}) must "
            f"be less than steps ({config.steps})",
        )


def check_optimizer(config: TrainConfig) -> None:
    """A hyper-parameter the optimizer does not have is refused (it would be silently ignored); schedule-free
    AdamW replaces a decaying schedule by its averaging, so it takes only constant rates (with warmup)."""
    knobs = OPTIMIZER_KNOBS[config.optimizer]
    for name in ("weight_decay", "beta1", "beta2", "eps"):
        if getattr(config, name) is not None and name not in knobs:
            raise SettingsError(name, f"optimizer {config.optimizer} has no {name}; it takes {list(knobs)}")
    if config.optimizer == "ScheduleFreeAdamW" and config.ema_decay is not None:
        raise SettingsError(
            "ema_decay", "ScheduleFreeAdamW exports an average of its iterates already: leave ema_decay unset"
        )
    if config.optimizer == "ScheduleFreeAdamW" and config.lr_scheduler not in ("constant", "constant_with_warmup"):
        raise SettingsError(
            "lr_scheduler",
            f"ScheduleFreeAdamW needs no decaying schedule (it averages instead), got lr_scheduler "
            f"{config.lr_scheduler}: use constant or constant_with_warmup",
        )


@dataclass(frozen=True)
class RunOptions:
    """Where a run reads and writes: the command line's and TOML file's keys that are not training settings."""

    model: str | None = None
    dataset: str | None = None
    images: str | None = None
    resolution: int = 0
    vae: str | None = None
    text_encoders: str | None = None
    tokenizers: str | None = None
    output_dir: str = "output"
    prefix: str = "loras/jaxlora_trained_lora"
    format: str = "comfyui"
    checkpoint_every: int = 0
    resume: bool | str = False  # True: the latest unfinished run; a name: that run
    keep_checkpoints: bool = False
    ema_export: str = "beside"
    save_every: int = 0
    save_last: int = 0
    validation_dataset: str | None = None
    validate_every: int = 0
    log_dir: str | None = None
    wandb_project: str | None = None
    # sample images (train.samples): outputs only, they never change the adapter
    sample_every: int = 0
    sample_prompts: str | None = None
    sample_seed: int = 0
    sample_steps: int = 20
    sample_sampler: str = "euler"
    sample_scheduler: str = "simple"
    sample_cfg: float | None = None
    sample_guidance: float | None = None
    sample_width: int = 0
    sample_height: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        check_choices(self)
        check_samples(self)
        if self.resolution < 0 or self.resolution % 8:
            raise SettingsError(
                "resolution", f"resolution must be 0 (the model's) or a multiple of 8, got {self.resolution}"
            )
        for name in ("checkpoint_every", "save_every", "save_last", "validate_every"):
            if getattr(self, name) < 0:
                raise SettingsError(name, f"{name} must be 0 or more, got {getattr(self, name)}")
        check_prefix(self.prefix)

    @classmethod
    def from_dict(cls, values: Mapping[str, object]) -> RunOptions:
        return cls(**_known(cls, values, "run options"))


def check_run(run: RunOptions, config: TrainConfig) -> None:
    """The run options against the training settings: `ema_export` needs an EMA, held-out samples come from one
    source at most and `validate_every` needs one, and the log destinations' packages are installed."""
    from jaxlora.train.tracking import LoggerUnavailableError, check_packages  # numpy only, no JAX

    if run.ema_export != "beside" and config.ema_decay is None:
        raise SettingsError("ema_export", f"ema_export {run.ema_export} needs an EMA: set ema_decay (e.g. 0.999)")
    if run.validation_dataset is not None and config.validation_split:
        raise SettingsError("validation_dataset", "give validation_dataset or validation_split, not both")
    if run.validate_every and run.validation_dataset is None and not config.validation_split:
        raise SettingsError(
            "validate_every", "validate_every needs held-out samples: set validation_split or validation_dataset"
        )
    for key, value in (("log_dir", run.log_dir), ("wandb_project", run.wandb_project)):
        try:
            check_packages(**{key: value})
        except LoggerUnavailableError as error:
            raise SettingsError(key, str(error)) from None


def check_samples(run: RunOptions) -> None:
    """Sample settings in range, sizes that every family's latents divide, and a prompts file when sampling is on
    (the file itself is read by `train.sample_prompts.read_sample_prompts`)."""
    for name, (low, high) in SAMPLE_RANGES.items():
        value = getattr(run, name)
        if value is not None and not low <= value <= high:
            raise SettingsError(name, f"{name} must be between {low} and {high}, got {value!r}")
    for name in ("sample_width", "sample_height"):
        if getattr(run, name) % 64:
            raise SettingsError(name, f"{name} must be 0 (the dataset's) or a multiple of 64, got {getattr(run, name)}")
    if (run.sample_width == 0) != (run.sample_height == 0):
        raise SettingsError("sample_width", "give both sample_width and sample_height, or neither")
    if run.sample_every and not run.sample_prompts:
        raise SettingsError("sample_prompts", "sample_every needs sample_prompts: a text file with one prompt per line")


def _known(cls: type, values: Mapping[str, object], what: str) -> dict[str, object]:
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SettingsError(unknown[0], f"unknown {what} {unknown}; known: {known}")
    return dict(values)


def check_prefix(prefix: str) -> None:
    """A prefix names a file inside the output folder, as ComfyUI's does: sub-folders (`loras/x`) are fine, an
    absolute path or `..` (which would write outside it) are not."""
    path = PurePath(prefix)
    if path.is_absolute() or ".." in path.parts or not path.name or prefix.endswith(("/", os.sep)):
        raise SettingsError(
            "prefix", f"prefix {prefix!r} must name a file inside the output folder, like 'loras/my_lora' (no '..')"
        )


def check_output_folder(output_dir: str | Path, prefix: str) -> None:
    """Refuse, before anything is loaded, an output folder the run could not write into: one that is a file,
    lies under a file, or is not writable (probed by creating and removing a temporary file in the nearest
    folder that exists, which also catches read-only file systems)."""
    folder = Path(output_dir) / PurePath(prefix).parent
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SettingsError("output_dir", f"cannot write into {folder}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise SettingsError("output_dir", f"cannot write into {existing}: {error.strerror}") from error
