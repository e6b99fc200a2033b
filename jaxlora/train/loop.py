"""The training run around the compiled step: set-up and checks, compilation per resolution bucket, the step
loop with asynchronous loss fetching, checkpoints, and the result. `train_lora` mirrors ComfyUI's node."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding

from jaxlora.adapters.attach import attach_adapters, attach_imported
from jaxlora.adapters.base import AdapterParam
from jaxlora.adapters.formats import export_adapter, import_adapter
from jaxlora.adapters.lora_files import read_lora_file
from jaxlora.adapters.metadata import trained_steps
from jaxlora.dtypes import resolve_dtype
from jaxlora.models.diffusion import DiffusionModel
from jaxlora.models.layers import Linear
from jaxlora.models.quantize import WeightScale, is_quantized
from jaxlora.models.sampling import ModelSampling
from jaxlora.models.stack import checkpoint_policy, host_streamable
from jaxlora.parallel.mesh import MeshLayout, check_batch, make_mesh
from jaxlora.parallel.placement import in_host_memory, is_writer, place_tree, to_host
from jaxlora.train.checkpoints import Checkpoints, open_run
from jaxlora.train.config import TRAINING_CONTROLS, TrainConfig
from jaxlora.train.data import Dataset, check_dataset, device_arrays, load_dataset, make_dataset
from jaxlora.train.memory_plan import DeviceMemory, StepMemory, check_step_fits, compile_within_memory
from jaxlora.train.objective import Objective
from jaxlora.train.optim import OptimizerSettings, ema_params, eval_params, loss_function, make_optimizer, with_ema
from jaxlora.train.perf import device_peak, matmul_flops
from jaxlora.train.schedule import DECAYING, learning_rate_schedule, rate_at, rates
from jaxlora.train.step import StepSettings, compile_step, noise_key_data, permutation_key
from jaxlora.train.tracking import RunLog, known
from jaxlora.train.validation import Validation, split_dataset


class NonFiniteLossError(RuntimeError):
    """Training diverged; the message names the step. Checkpoints hold only steps before it."""


@dataclass
class RunStats:
    compile_seconds: float = 0.0
    train_seconds: float = 0.0
    steps_run: int = 0
    samples: int = 0
    peak_memory_bytes: int | None = None
    interrupted: bool = False
    flops: float = 0.0  # matrix-product FLOPs (`perf.matmul_flops`), summed over the steps run
    peak_flops: float | None = None  # the device's peak FLOP/s (see `perf.device_peak`)
    peak_source: str = ""
    sample_seconds: float = 0.0  # spent sampling images, left out of train_seconds

    @property
    def seconds_per_step(self) -> float:
        return self.train_seconds / max(self.steps_run, 1)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.train_seconds if self.train_seconds else 0.0

    def mfu(self, seconds: float) -> float | None:
        """Model FLOP utilisation over `seconds` of training: achieved FLOP/s over the device's peak."""
        if not (self.flops and self.peak_flops and seconds > 0):
            return None
        return self.flops / seconds / self.peak_flops


@dataclass
class TrainResult:
    """The node's outputs, plus what the run measured."""

    model_with_lora: DiffusionModel
    lora: dict[str, np.ndarray]
    loss_map: dict[str, list[float]]
    steps: int
    stats: RunStats = field(default_factory=RunStats)
    checkpoints: Checkpoints | None = None  # the run's folder, marked finished once its outputs are written
    ema_model: DiffusionModel | None = None  # with ema_decay: the model carrying the averaged adapter
    validation: dict[str, list] | None = None  # with validation: {"step", "loss"[, "ema_loss"]}, one entry each


@dataclass(frozen=True)
class ExistingAdapter:
    """An `existing_lora` file, read once: its tensors, metadata and the steps it was trained for."""

    path: Path
    tensors: dict[str, np.ndarray]
    metadata: dict[str, str]
    steps: int


def read_existing(config: TrainConfig) -> ExistingAdapter | None:
    """The run's `existing_lora` file (None without one)."""
    if not config.existing_lora:
        return None
    path = Path(config.existing_lora)
    tensors, metadata = read_lora_file(path)
    return ExistingAdapter(path, tensors, metadata, trained_steps(path, metadata))


def compute_dtype(config: TrainConfig, model: DiffusionModel) -> jnp.dtype:
    """The dtype activations run in: the training dtype, or with the node's "none" the model's own, as ComfyUI
    autocasts it: fp16 for fp16 models, bf16 for every other (fp32, bf16, and fp8 or int8 stored ones)."""
    if config.training_dtype != "none":
        return jnp.dtype(resolve_dtype(config.training_dtype))
    return jnp.dtype(jnp.float16) if model.dtype == jnp.float16 else jnp.dtype(jnp.bfloat16)


def cast_frozen(network: nnx.Module, dtype: jnp.dtype | None) -> nnx.Module:
    """A network sharing the frozen weights, those in another wide float dtype cast once to `dtype` (None: kept as
    stored). Quantized weights (int8, fp8) and their float32 scales are never cast."""
    graph, scales, state = nnx.split(network, WeightScale, ...)
    keep = lambda a: dtype is None or is_quantized(a.dtype) or a.dtype == dtype  # noqa: E731
    return nnx.merge(graph, scales, jax.tree.map(lambda a: a if keep(a) else a.astype(dtype), state))


def use_narrow_backward(network: nnx.Module) -> None:
    """The node's quantized_backward: every linear layer with a quantized weight computes its input gradient on
    the narrow operands (`jaxlora.models.narrow_backward`) wherever no adapter patches its weight. Convolutions
    keep the wide backward pass: ComfyUI quantizes only linear layers, so its flag never reaches one, and a
    convolution's input gradient is a transposed convolution (3x3 kernels run it as col2im, see
    `layers._conv_same_stride`), not one matrix product."""
    layers = [
        node for _, node in nnx.iter_graph(network) if isinstance(node, Linear) and is_quantized(node.weight.dtype)
    ]
    if not layers:
        raise ValueError(
            "quantized_backward needs linear layers with quantized weights, and this model has none: load it with "
            "base_quantization int8, fp8 or fp8_channel (or with training_dtype none from a checkpoint stored in fp8)"
        )
    for layer in layers:
        layer.narrow_backward = True


def adapted_network(
    model: DiffusionModel, config: TrainConfig, dtype: jnp.dtype | None, existing: ExistingAdapter | None = None
):
    """A network sharing the model's weight arrays (cast once if the training dtype differs; `dtype` None keeps
    them as stored), with the existing adapter attached where it has layers and fresh adapters everywhere else;
    and the steps the existing adapter was trained for. `existing` is the file as `read_existing` read it (read
    here when not given). The input model is not modified."""
    network = cast_frozen(model.network, dtype)
    existing = existing or read_existing(config)
    if existing is not None:
        attach_imported(network, import_adapter(model, existing.tensors, resolve_dtype(config.lora_dtype)))
    attach_adapters(
        network,
        config.algorithm,
        config.rank,
        config.seed,
        resolve_dtype(config.lora_dtype),
        bypass=config.uses_bypass,
    )
    if config.quantized_backward:
        use_narrow_backward(network)
    network.remat_policy = config.remat
    return network, 0 if existing is None else existing.steps


def with_host_adapters(model: DiffusionModel) -> DiffusionModel:
    """The model with its adapter tensors gathered to the host once, for export (on any mesh, any process)."""
    graph, adapters, base = nnx.split(model.network, AdapterParam, ...)
    return replace(model, network=nnx.merge(graph, to_host(adapters), base))


def preflight(
    model: DiffusionModel, dataset: Dataset, config: TrainConfig, existing: ExistingAdapter | None = None
) -> ExistingAdapter | None:
    """Every check that needs no weights: the data against the model, the settings against the model's family,
    the batch against the mesh, and the existing adapter's keys and shapes. Works on a model loaded with
    `weights=False`, before the checkpoint's tensors are read. Returns the existing adapter file, read and
    checked once (pass it on to `prepare_run`, which then does not check it again)."""
    check_dataset(dataset, model)
    check_base(model, config)
    if config.mesh is not None:
        check_batch(config.mesh, config.batch_size, [b.size for b in dataset.buckets], jax.device_count())
    if config.guidance is not None and "guidance" not in model.network_input_names:
        raise ValueError(f"guidance applies to models with a guidance input, not {model.variant.description}")
    sampling = model.run_sampling(config.prediction, config.flow_shift)
    if sampling.prediction == "const":
        for name in ("noise_offset", "min_snr_gamma"):
            if getattr(config, name):
                raise ValueError(
                    f"{name} applies to eps and v models; {model.variant.description} is a flow model (its noise "
                    "levels span sigma 0 to 1, so offset noise and SNR weighting do not carry over): leave it unset"
                )
    elif (config.min_sigma, config.max_sigma) != (0.0, 1.0):
        raise ValueError(
            f"min_sigma/max_sigma apply to flow models (sigma 0 to 1); {model.variant.description} is an "
            f"{sampling.prediction} model: leave them unset"
        )
    if config.caption_dropout and any(bucket.empty is None for bucket in dataset.buckets):
        raise ValueError(
            "caption_dropout needs the empty caption's conditioning, which this dataset does not carry: add it to "
            "the dataset file as `empty.c_crossattn` (and `empty.pooled_output` where the model takes one), e.g. "
            "with jaxlora.save_dataset(..., empty=...)"
        )
    if existing is None and (existing := read_existing(config)) is not None:
        import_adapter(model, existing.tensors)  # checked once, where the file is read
    return existing


def check_base(model: DiffusionModel, config: TrainConfig) -> None:
    """The model's storage fits the settings: a base_quantization asked for is the one the model was loaded with
    (quantizing happens while loading, `load_model(..., quantization=...)`, never on a wide copy), and a remat
    policy that offloads to host memory has a backend that offers it."""
    asked = config.base_quantization
    if asked != "none" and model.quantization != asked:
        raise ValueError(
            f"base_quantization {asked}: the model was loaded with quantization {model.quantization}; load it with "
            f"load_model(path, quantization={asked!r}) (the weights are quantized as they are read)"
        )
    if config.remat is not None:
        checkpoint_policy(config.remat)


@dataclass
class PreparedRun:
    """Everything the step loop needs, set up once: the network split into its graph, the trainable adapters
    and the frozen base; the optimizer state; each bucket's arrays on the device; the step's static settings;
    the mesh layout (None: one device); and the steps an existing adapter brings."""

    graph: nnx.GraphDef
    adapters: nnx.State
    opt_state: object
    base: nnx.State
    data: list[dict[str, jax.Array]]
    perm_key: jax.Array
    settings: StepSettings
    layout: MeshLayout | None
    sampling: ModelSampling
    previous_steps: int
    existing: ExistingAdapter | None
    schedule: float | Callable[[int], object]  # the learning rate of each optimizer step
    validation: Validation | None = None  # the held-out samples' loss, on the device
    # which frozen weights (by dotted path and shape) stay in host memory (offloading; None: all on the device)
    streamed: Callable[[str, tuple[int, ...]], bool] | None = None


def settings_of(kind: type, config: TrainConfig):
    """The `kind` dataclass (Objective, OptimizerSettings) of a run: its fields are TrainConfig fields by name."""
    return kind(**{spec.name: getattr(config, spec.name) for spec in fields(kind)})


def own_buffers(opt_state, adapters):
    """`opt_state` with its own buffer in every leaf: a leaf that is one of the `adapters` arrays, or an array met
    earlier in the state, is copied. Optimizers keep such aliases after `init` (Prodigy's x0 is the parameters,
    its estimate starts as the very array of its initial value); the step donates both trees, and XLA refuses a
    buffer donated twice."""
    seen = {id(leaf) for leaf in jax.tree.leaves(adapters)}

    def own(leaf):
        if id(leaf) in seen:
            return jnp.copy(leaf)
        seen.add(id(leaf))
        return leaf

    return jax.tree.map(own, opt_state)


def prepare_run(
    model: DiffusionModel,
    dataset: Dataset,
    config: TrainConfig,
    existing: ExistingAdapter | None = None,
    validation: Dataset | None = None,
) -> PreparedRun:
    """Check the run (`preflight`), attach the adapters, split and place the trees on the mesh, initialise the
    optimizer and put the data (and the `validation` samples, if any) on the device: the set-up of
    `run_training`, shared with the benchmarks so they time the trainer's own step."""
    existing = preflight(model, dataset, config, existing)
    if validation is not None:
        check_dataset(validation, model)
    dtype = compute_dtype(config, model)
    stored = None if config.training_dtype == "none" else dtype  # "none": the frozen weights stay as stored
    network, previous_steps = adapted_network(model, config, stored, existing)
    graph, adapters, base = nnx.split(network, AdapterParam, ...)
    layout = None if config.mesh is None else MeshLayout.of(make_mesh(config.mesh), base)
    streamed = host_streamable(network) if config.offloading else None
    if layout is not None and streamed:
        layout = replace(layout, base=in_host_memory(base, layout.base, streamed))
    elif streamed:
        base = place_tree(base, in_host_memory(base, SingleDeviceSharding(jax.devices()[0]), streamed))
    schedule = learning_rate_schedule(config)
    optimizer = make_optimizer(config.optimizer, schedule, settings_of(OptimizerSettings, config))
    if config.ema_decay is not None:
        optimizer = with_ema(optimizer, config.ema_decay)
    opt_state = own_buffers(optimizer.init(adapters), adapters)
    sampling = model.run_sampling(config.prediction, config.flow_shift)
    settings = StepSettings(
        config.batch_size,
        config.grad_accumulation_steps,
        dtype,
        loss_function(config.loss_function),
        optimizer,
        sampling,
        None if layout is None else layout.batch,
        settings_of(Objective, config),
        streamed is not None,
    )
    dropout = config.caption_dropout > 0
    data = [device_arrays(bucket, model, dtype, config.guidance, dropout) for bucket in dataset.buckets]
    perm_key = permutation_key(config.seed)
    if layout is not None:
        adapters, opt_state, base = (
            place_tree(adapters, layout.replicated),
            place_tree(opt_state, layout.replicated),
            place_tree(base, layout.base),
        )
        data, perm_key = place_tree((data, perm_key), layout.replicated)
    held_out = None
    if validation is not None:
        arrays = [device_arrays(bucket, model, dtype, config.guidance) for bucket in validation.buckets]
        arrays = arrays if layout is None else place_tree(arrays, layout.replicated)
        held_out = Validation(graph, settings, arrays, config.seed)
    return PreparedRun(
        graph,
        adapters,
        opt_state,
        base,
        data,
        perm_key,
        settings,
        layout,
        sampling,
        previous_steps,
        existing,
        schedule,
        held_out,
        streamed,
    )


def choose_bucket(sizes: list[int], seed: int, step: int) -> int:
    """A bucket per optimizer step with probability proportional to its size, from (seed, step) alone."""
    if len(sizes) == 1:
        return 0
    rng = np.random.default_rng([seed % 2**63, step, 0xB0C])
    return int(rng.choice(len(sizes), p=np.asarray(sizes) / sum(sizes)))


@contextmanager
def stop_requests():
    """Ctrl-C asks the loop to stop after the current step (and checkpoint) instead of killing it mid-update."""
    requested = []
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if requested:  # a second Ctrl-C stops at once
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        requested.append(True)
        print("\nstopping after this step (Ctrl-C again to abort)", file=sys.stderr)

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not in the main thread: no handler, plain KeyboardInterrupt
        pass
    try:
        yield requested
    finally:
        try:
            signal.signal(signal.SIGINT, previous)
        except ValueError:
            pass


def progress_line(
    done: int,
    total: int,
    loss: float,
    rate: float,
    samples_rate: float,
    mfu: float | None,
    learning_rate: float,
    width: int = 24,
) -> str:
    """One line of progress; `loss` is the mean over the micro-steps since the previous line, `learning_rate` the
    rate of the last step taken."""
    filled = round(width * done / total)
    eta = (total - done) / rate if rate > 0 else 0.0
    bar = "#" * filled + "." * (width - filled)
    utilisation = "" if mfu is None else f"  MFU {mfu:.1%}"
    return (
        f"step {done}/{total} [{bar}] mean loss {loss:.4f}  lr {learning_rate:.3g}  {rate:.2f} steps/s  "
        f"{samples_rate:.2f} samples/s"
        f"{utilisation}  eta {eta:.0f} s"
    )


def peak_memory() -> int | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


# Settings that move values between memories (or recompute them) without changing them.
MEMORY_ONLY = ("checkpoint_depth", "offloading", "bucket_mode")
# Results-altering settings added after runs were first checkpointed: recorded only when not at their default.
NEWER_SETTINGS = ("quantized_backward", "bypass_mode", "base_quantization")


def fingerprint(config: TrainConfig, model: DiffusionModel, dataset: Dataset) -> dict:
    settings = config.as_dict()
    settings.pop("steps")  # a run may be resumed to train longer
    settings.pop("mesh")  # and on other devices: checkpoints are restored onto the new layout
    for name in MEMORY_ONLY:  # with any memory settings: they change where values live, not what they are
        settings.pop(name)
    settings["base_quantization"] = model.quantization  # what the base is stored as, however it was asked for
    # controls at their defaults are left out, so runs from before a control existed resume as they were
    defaults = TrainConfig()
    for name in TRAINING_CONTROLS:
        if settings[name] == getattr(defaults, name):
            del settings[name]
    for name in NEWER_SETTINGS:  # likewise the node's newer inputs and the base's storage at their defaults
        if settings[name] == getattr(defaults, name):
            del settings[name]
    if config.lr_scheduler in DECAYING:  # a decaying rate is shaped by the run's length: the steps must match
        settings["schedule_steps"] = config.steps
    return {**settings, "family": model.variant.name, "dataset": [[b.size, *b.shape] for b in dataset.buckets]}


def run_training(
    model: DiffusionModel,
    dataset: Dataset,
    config: TrainConfig,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: bool | str = False,
    progress: Callable[[str], None] | None = None,
    log_every_seconds: float = 2.0,
    existing: ExistingAdapter | None = None,
    save_every: int = 0,
    on_save: SaveHook | None = None,
    validation_dataset: Dataset | None = None,
    validate_every: int = 0,
    logger: RunLog | None = None,
    sample_every: int = 0,
    on_sample: SampleHook | None = None,
) -> TrainResult:
    """Train `config.steps` optimizer steps and return the node's outputs, with checkpoints in a new run folder
    under `checkpoint_dir` (every `checkpoint_every` steps, at the end and on Ctrl-C), or continuing a run there:
    `resume=True` takes the latest unfinished one, a string names it. `existing` is the `existing_lora` file as
    `preflight` read it, so it is read once. Every `save_every` steps before the last, `on_save` (e.g.
    `report.AdapterSaves`) gets the total steps and the models carrying the adapter and its EMA (or None),
    gathered to the host; on several processes only process 0 calls it. Every `sample_every` steps and after the
    last, `on_sample` (e.g. `samples.ImageSamples`) gets the total steps, the prepared run and the adapter a save
    would export, on the device (every process calls it); images it returns go to `logger` as `samples/<i>`.

    Validation (`train.validation`) scores the held-out samples, `validation_dataset` or the
    `config.validation_split` of `dataset`, every `validate_every` steps (0: only) and after the last; `logger`
    (`train.tracking.RunLog`) receives the numbers the progress line fetches. None of these change what is
    trained."""
    for name, value in (
        ("checkpoint_every", checkpoint_every),
        ("save_every", save_every),
        ("validate_every", validate_every),
        ("sample_every", sample_every),
    ):
        if value < 0:
            raise ValueError(f"{name} must be 0 or more, got {value}")
    if config.validation_split and validation_dataset is not None:
        raise ValueError("give validation_split or a validation dataset, not both")
    if config.validation_split:
        dataset, validation_dataset = split_dataset(dataset, config.validation_split, config.seed)
    if validate_every and validation_dataset is None:
        raise ValueError("validate_every needs held-out samples: set validation_split or validation_dataset")
    progress = progress or (lambda line: print(line, file=sys.stderr))
    run = prepare_run(model, dataset, config, existing, validation_dataset)
    saves = (save_every, on_save) if save_every and on_save is not None else None
    samples = (sample_every, on_sample) if sample_every and on_sample is not None else None
    observe = Observers(progress, log_every_seconds, saves, validate_every, logger, samples)
    if checkpoint_dir is None:
        return _train(model, dataset, config, run, None, checkpoint_every, observe)
    checkpoints = open_run(checkpoint_dir, fingerprint(config, model, dataset), resume, config.steps)
    with checkpoints.in_use():
        return _train(model, dataset, config, run, checkpoints, checkpoint_every, observe)


@dataclass(frozen=True)
class Observers:
    """What a run reports along the way and how often; none of it changes what is trained."""

    progress: Callable[[str], None]
    log_every_seconds: float = 2.0
    saves: tuple[int, SaveHook] | None = None  # (every N steps, hook)
    validate_every: int = 0
    logger: RunLog | None = None
    samples: tuple[int, SampleHook] | None = None  # (every N steps and after the last, hook)


def _train(
    model: DiffusionModel,
    dataset: Dataset,
    config: TrainConfig,
    run: PreparedRun,
    checkpoints: Checkpoints | None,
    checkpoint_every: int,
    observe: Observers,
) -> TrainResult:
    graph, adapters, opt_state, base = run.graph, run.adapters, run.opt_state, run.base
    data, perm_key, settings, layout = run.data, run.perm_key, run.settings, run.layout
    progress, saves, logger = observe.progress, observe.saves, observe.logger

    start, history, validated = 0, [], []
    if checkpoints is not None and checkpoints.latest_step() is not None:
        start, adapters, opt_state, history, validated = checkpoints.restore(adapters, opt_state)
        progress(f"resumed from step {start} of {checkpoints.name} ({checkpoints.directory})")

    micro = config.grad_accumulation_steps
    stats = RunStats()
    compiled, flops = [], []
    for shape, bucket in zip([b.shape for b in dataset.buckets], data, strict=True):
        progress(
            f"compiling the train step for latents {list(shape)}, batch {config.batch_size} x {micro} micro-step(s) "
            "(once per latent shape; seconds to minutes)"
        )
        begin = time.perf_counter()
        traced = compile_step(graph, settings, layout).trace(
            adapters, opt_state, base, bucket, noise_key_data(config.seed, 0, micro), perm_key, 0
        )
        flops.append(matmul_flops(traced.jaxpr))
        what = f"the train step for latents {list(shape)}, batch {config.batch_size}"
        compiled.append(compile_within_memory(traced.lower(), what))
        stats.compile_seconds += time.perf_counter() - begin
        progress(check_step_fits(StepMemory.of(compiled[-1]), DeviceMemory.of(jax.local_devices()[0]), what))
    progress(f"compiled {len(compiled)} step shape(s) in {stats.compile_seconds:.1f} s")
    stats.peak_flops, stats.peak_source = device_peak()

    sizes = [bucket.size for bucket in dataset.buckets]
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    pending_validation: list[tuple[int, jax.Array, jax.Array | None]] = []
    learning_rates = rates(run.schedule, config.steps) if logger is not None else None

    def collect() -> None:
        """Fetch the losses (and validation losses) computed so far, the only host sync, log them, and stop at
        the first non-finite training loss."""
        for step, metrics in pending:
            metrics = to_host(metrics)
            values = [float(v) for v in metrics["loss"]]
            if not all(np.isfinite(values)):
                raise NonFiniteLossError(
                    f"loss became {values} at step {step + 1}; the last checkpoint holds the adapter before it"
                )
            history.extend(values)
            if logger is not None:
                logger.scalars(
                    step + 1,
                    {
                        "train/loss": float(np.mean(values)),
                        "train/grad_norm": float(metrics["grad_norm"]),
                        "train/learning_rate": float(learning_rates[step]),
                    },
                )
        pending.clear()
        for step, loss, ema_loss in pending_validation:
            loss, ema_loss = to_host((loss, ema_loss))
            validated.append((step, float(loss), None if ema_loss is None else float(ema_loss)))
            if logger is not None:
                logger.scalars(step, known({"validation/loss": loss, "validation/ema_loss": ema_loss}))
        pending_validation.clear()

    def validate(done: int) -> None:
        """Dispatch the held-out losses of the adapter to export (schedule-free: its average) and of its EMA."""
        trained = run.validation(eval_params(config.optimizer, opt_state, adapters), base)
        ema = None if config.ema_decay is None else run.validation(ema_params(opt_state), base)
        pending_validation.append((done, trained, ema))

    done, logged = start, len(history)
    began, last_log = time.perf_counter(), time.perf_counter()
    with stop_requests() as stop:
        for step in range(start, config.steps):
            bucket = choose_bucket(sizes, config.seed, step)
            adapters, opt_state, metrics = compiled[bucket](
                adapters,
                opt_state,
                base,
                data[bucket],
                noise_key_data(config.seed, step * micro, micro),
                perm_key,
                step * micro,
            )
            pending.append((step, metrics))
            stats.steps_run += 1
            stats.samples += micro * min(config.batch_size, sizes[bucket])
            stats.flops += flops[bucket]
            done = step + 1
            every = observe.validate_every
            if run.validation is not None and ((every and done % every == 0) or done == config.steps):
                validate(done)
            if checkpoints is not None and checkpoint_every and done % checkpoint_every == 0 and done < config.steps:
                collect()
                checkpoints.save(done, adapters, opt_state, history, validated)
            if saves is not None and done % saves[0] == 0 and done < config.steps:
                trained, ema = host_models(model, config, run, adapters, opt_state)
                if is_writer():
                    saves[1](done + run.previous_steps, trained, ema)
            if observe.samples is not None and (done % observe.samples[0] == 0 or done == config.steps):
                begin = time.perf_counter()
                adapter = eval_params(config.optimizer, opt_state, adapters)
                images = observe.samples[1](done + run.previous_steps, run, adapter)
                if logger is not None and images is not None:
                    for i, image in enumerate(images):
                        logger.image(f"samples/{i:02d}", done, image)
                stats.sample_seconds += time.perf_counter() - begin
            if time.perf_counter() - last_log >= observe.log_every_seconds or done == config.steps or stop:
                collect()
                last_log = time.perf_counter()
                elapsed = last_log - began - stats.sample_seconds
                rate, samples_rate = stats.steps_run / elapsed, stats.samples / elapsed
                interval_loss = float(np.mean(history[logged:]))  # every micro-step since the last line
                logged = len(history)
                mfu, learning_rate = stats.mfu(elapsed), rate_at(run.schedule, done - 1)
                progress(progress_line(done, config.steps, interval_loss, rate, samples_rate, mfu, learning_rate))
                if logger is not None:
                    speeds = {"perf/steps_per_second": rate, "perf/samples_per_second": samples_rate, "perf/mfu": mfu}
                    logger.scalars(done, known(speeds))
            if stop:
                stats.interrupted = done < config.steps  # Ctrl-C during the last step stops nothing
                break
    collect()
    jax.block_until_ready(adapters)
    stats.train_seconds = time.perf_counter() - began - stats.sample_seconds
    stats.peak_memory_bytes = peak_memory()
    if checkpoints is not None and done > start:
        checkpoints.save(done, adapters, opt_state, history, validated)

    adapted, ema = trained_models(model, config, run, adapters, opt_state)
    lora = export_adapter(with_host_adapters(adapted), "comfyui", resolve_dtype(config.lora_dtype))
    steps = done + run.previous_steps
    curves = validation_curves(validated, config.ema_decay is not None) if run.validation is not None else None
    return TrainResult(adapted, lora, {"loss": history}, steps, stats, checkpoints, ema, curves)


def validation_curves(validated: list[tuple[int, float, float | None]], with_ema: bool) -> dict[str, list]:
    """{"step": [...], "loss": [...]} and with an EMA "ema_loss", from (step, loss, EMA loss) records."""
    curves = {"step": [step for step, _, _ in validated], "loss": [loss for _, loss, _ in validated]}
    if with_ema:
        curves["ema_loss"] = [ema for _, _, ema in validated]
    return curves


SaveHook = Callable[[int, DiffusionModel, DiffusionModel | None], object]
SampleHook = Callable[[int, PreparedRun, nnx.State], object]


def trained_models(
    model: DiffusionModel, config: TrainConfig, run: PreparedRun, adapters: nnx.State, opt_state
) -> tuple[DiffusionModel, DiffusionModel | None]:
    """The models carrying the adapter to use (schedule-free: its average) and its EMA (None without one)."""
    adapted = with_adapters(model, run, eval_params(config.optimizer, opt_state, adapters))
    return adapted, None if config.ema_decay is None else with_adapters(model, run, ema_params(opt_state))


def host_models(model, config, run, adapters, opt_state) -> tuple[DiffusionModel, DiffusionModel | None]:
    """`trained_models` with their adapters copied to the host (every process takes part on a mesh), so the next
    step may donate the device buffers."""
    adapted, ema = trained_models(model, config, run, adapters, opt_state)
    return with_host_adapters(adapted), ema and with_host_adapters(ema)


def with_adapters(model: DiffusionModel, run: PreparedRun, adapters: nnx.State) -> DiffusionModel:
    """The trained model: the run's network carrying `adapters` (float32 masters are cast by export)."""
    network = nnx.merge(run.graph, adapters, run.base)
    return replace(model, network=network, sampling=run.sampling)


def train_lora(
    model: DiffusionModel,
    latents,
    positive,
    batch_size: int = 1,
    grad_accumulation_steps: int = 1,
    steps: int = 16,
    learning_rate: float = 0.0005,
    rank: int = 8,
    optimizer: str = "AdamW",
    loss_function: str = "MSE",
    seed: int = 0,
    training_dtype: str = "bf16",
    lora_dtype: str = "bf16",
    algorithm: str = "LoRA",
    gradient_checkpointing: bool = True,
    existing_lora: str | None = None,
    quantized_backward: bool = False,
    checkpoint_depth: int = 1,
    offloading: bool = False,
    bucket_mode: bool = False,
    bypass_mode: bool = False,
    **options,
) -> TrainResult:
    """ComfyUI's Train LoRA node as a function, with its inputs, names and defaults.

    `latents`: raw VAE latents [N, C, H, W] (ComfyUI LATENT `samples`), or a list of such arrays of different
    resolutions. `positive`: the text conditioning, an array [N or 1, T, D] or a dict with `c_crossattn` and,
    the family's other fields (`pooled_output`, sizes) (or a list matching `latents`). `options` are the
    TrainConfig additions (remat_policy, bypass, base_quantization, prediction, mesh, and the training controls
    such as lr_scheduler, warmup_steps, weight_decay, max_grad_norm, timestep_sampling, min_snr_gamma,
    loss_target, ema_decay, validation_split) and run_training's (checkpoint_dir, checkpoint_every, resume,
    progress, save_every, on_save, validation_dataset, validate_every, logger, sample_every, on_sample: e.g.
    `samples.prepare_samples(...)`). `validation_dataset` may be a Dataset or a dataset path. A quantized base is
    loaded so: `load_model(path, quantization="int8")`.
    Returns model_with_lora, lora (ComfyUI-keyed tensors), loss_map and steps (including the existing
    adapter's), and with ema_decay the ema_model.
    """
    run_options = {k: options.pop(k) for k in list(options) if k in RUN_OPTIONS}
    config = TrainConfig(
        batch_size=batch_size,
        grad_accumulation_steps=grad_accumulation_steps,
        steps=steps,
        learning_rate=learning_rate,
        rank=rank,
        optimizer=optimizer,
        loss_function=loss_function,
        seed=seed,
        training_dtype=training_dtype,
        lora_dtype=lora_dtype,
        algorithm=algorithm,
        gradient_checkpointing=gradient_checkpointing,
        existing_lora=existing_lora,
        quantized_backward=quantized_backward,
        checkpoint_depth=checkpoint_depth,
        offloading=offloading,
        bucket_mode=bucket_mode,
        bypass_mode=bypass_mode,
        **options,
    )
    dataset = latents if isinstance(latents, Dataset) else make_dataset(latents, positive)
    if isinstance(run_options.get("validation_dataset"), str | Path):
        run_options["validation_dataset"] = load_dataset(run_options["validation_dataset"])
    return run_training(model, dataset, config, **run_options)


RUN_OPTIONS = (
    "checkpoint_dir",
    "checkpoint_every",
    "resume",
    "progress",
    "log_every_seconds",
    "existing",
    "save_every",
    "on_save",
    "validation_dataset",
    "validate_every",
    "logger",
    "sample_every",
    "on_sample",
)
