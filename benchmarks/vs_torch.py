"""One LoRA training step, PyTorch against jaxlora: same model, weights, adapters, batch and machine, one run.

Run from the repository root as `python benchmarks/vs_torch.py`; prints markdown for BENCHMARKS.md.

The model has SD1.5's block structure (4 levels, 2 ResBlocks each, 8 heads, 1x1-conv projections, 768-d
context) at a reduced width (`--width`, SD1.5's is 320), random weights. Both sides train the same trainables,
ComfyUI's set: a LoRA on every conv and linear weight, a full diff on every norm scale and on every bias.

- PyTorch: diffusers' `UNet2DConditionModel` converted from the same checkpoint file by diffusers itself, in the
  configurations a rival trainer would use (`--torch-configs`, default all): `patch`, each LoRA entering as
  ComfyUI's trainer does it, weight patching in the forward (W' = W + scale up @ down, through
  `torch.nn.utils.parametrize`); `bypass`, each LoRA added to its layer's output by a forward hook as PEFT and
  kohya do (y = f(x) + scale up(down(x)), down with the layer's kernel, stride and padding, up 1x1); and both
  again through `torch.compile` of the loss function (`+compile`: inductor, mode default). Norm-scale and bias
  diffs are patched in every configuration, and `torch.optim.AdamW` steps the same trainables.
- jaxlora: the trainer's own step (`prepare_run`, `compile_step`, donated adapters and optimizer state), as
  `run_training` builds it with the node's defaults (LoRA in bypass form).

Before timing, both sides start from the same non-zero adapter values and take the same two steps on the same
x0, noise and sigma: every torch configuration's losses must agree with jaxlora's (fp32) before any step is
timed. The timed steps then alternate between all sides (the order rotating every step); warm-up steps and
compilation (XLA's, torch.compile's) are excluded and reported separately. The summary row compares jaxlora with
torch's fastest configuration of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import UNet2DConditionModel
from flax import nnx
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode

from jaxlora import load_model
from jaxlora.adapters.attach import adapted_layers
from jaxlora.adapters.base import AdapterParam, Diff
from jaxlora.adapters.lora import LoRA
from jaxlora.models.demo import write_random_checkpoint
from jaxlora.models.unet import SD15, UNetConfig
from jaxlora.models.unet_names import unet_to_diffusers
from jaxlora.train.config import TrainConfig
from jaxlora.train.data import make_dataset
from jaxlora.train.loop import prepare_run
from jaxlora.train.perf import measure_matmul_peak, step_flops
from jaxlora.train.step import StepSettings, compile_step, noise_key_data, permutation_key

TOKENS = 77
# fp32 losses of the two sides, relative, per checked step. The first is the same forward on the same weights. The
# second follows one AdamW update, whose first step moves every weight by about lr * sign(gradient) whatever the
# gradient's size: weights whose gradient is near zero move by a full lr in a direction set by rounding, so a
# compiler that sums in another order (torch.compile's inductor) shows up there (2.3e-4 measured for
# patch+compile, 1e-7 for the eager configurations).
CHECK_RTOL = (1e-4, 1e-3)


def sd15_shaped(width: int) -> UNetConfig:
    return replace(SD15, model_channels=width)


def diffusers_config(config: UNetConfig) -> dict:
    """diffusers' config of an SD1.x-structured UNet (every level but the last has attention)."""
    levels = len(config.channel_mult)
    return {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": config.num_heads,  # diffusers' name for SD1.x's head count
        "block_out_channels": [config.model_channels * m for m in config.channel_mult],
        "center_input_sample": False,
        "cross_attention_dim": config.context_dim,
        "down_block_types": ["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1),
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "layers_per_block": config.num_res_blocks[0],
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "sample_size": 64,
    }


# ---- the PyTorch side: weight patching (ComfyUI) or activation bypass (PEFT/kohya) ----------------------------


class LoRAPatch(torch.nn.Module):
    """W' = W + scale * (up @ down) reshaped to W, formed in the forward as ComfyUI's weight wrappers do."""

    def __init__(self, up: np.ndarray, down: np.ndarray, scale: float):
        super().__init__()
        self.up = torch.nn.Parameter(torch.from_numpy(np.array(up)))
        self.down = torch.nn.Parameter(torch.from_numpy(np.array(down)))
        self.scale = scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.scale * (self.up @ self.down)).reshape(weight.shape).to(weight.dtype)


class LoRABypass(torch.nn.Module):
    """scale * up(down(x)), added to a layer's output by a forward hook as PEFT and kohya add it: down is a
    layer of the adapted layer's kind (a conv keeps its kernel, stride and padding), up a 1x1 conv or a linear,
    so the full-size delta is never formed. The factors are kept in the layer's own layout."""

    def __init__(self, up: np.ndarray, down: np.ndarray, scale: float, layer: torch.nn.Module):
        super().__init__()
        rank = down.shape[0]
        conv = isinstance(layer, torch.nn.Conv2d)
        if conv and layer.groups != 1:
            raise ValueError(f"bypass LoRA on a grouped conv ({layer.groups} groups) is not supported")
        down_shape, up_shape = ((rank, *layer.weight.shape[1:]), (-1, rank, 1, 1)) if conv else ((rank, -1), (-1, rank))
        self.down = torch.nn.Parameter(torch.from_numpy(np.array(down).reshape(down_shape)))
        self.up = torch.nn.Parameter(torch.from_numpy(np.array(up).reshape(up_shape)))
        self.scale = scale
        self.conv = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation} if conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.down.to(x.dtype), self.up.to(x.dtype)
        if self.conv is None:
            return self.scale * torch.nn.functional.linear(torch.nn.functional.linear(x, down), up)
        return self.scale * torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down, **self.conv), up)


def add_bypass(layer: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """The forward hook of a bypassed layer: y = f(x) + scale * up(down(x))."""
    return output + layer.lora_bypass(args[0])


class DiffPatch(torch.nn.Module):
    """W' = W + diff: the trainer's `diff` (norm scales) and `diff_b` (biases)."""

    def __init__(self, diff: np.ndarray):
        super().__init__()
        self.diff = torch.nn.Parameter(torch.from_numpy(np.array(diff)))

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor + self.diff.to(tensor.dtype)


ADAPTER_MODULES = (LoRAPatch, LoRABypass, DiffPatch)


def adapt_torch_unet(
    unet: torch.nn.Module, network, config: UNetConfig, lora_form: str
) -> tuple[list[torch.nn.Parameter], int]:
    """Give every diffusers layer the adapter values of the jaxlora layer it corresponds to, its LoRA patched
    into the weight (`lora_form` "patch") or added to the output ("bypass"); norm-scale and bias diffs are
    patched either way. Returns the trainables and the number of frozen tensors; every parameter of the
    diffusers UNet must be adapted exactly once."""
    layers = list(adapted_layers(network))
    names = unet_to_diffusers(config, [path for path, _, _ in layers])
    modules = dict(unet.named_modules())
    bypassed = set()
    for path, _, adapter in layers:
        module = modules[names[path]]
        weight = adapter.weight
        if isinstance(weight, LoRA) and lora_form == "bypass":
            module.lora_bypass = LoRABypass(weight.up[...], weight.down[...], weight.scale, module)
            module.register_forward_hook(add_bypass)
            bypassed.add(f"{names[path]}.weight")
        else:
            patch = (
                LoRAPatch(weight.up[...], weight.down[...], weight.scale)
                if isinstance(weight, LoRA)
                else DiffPatch(weight.diff[...])
            )
            parametrize.register_parametrization(module, "weight", patch, unsafe=True)
        if adapter.bias is not None:
            parametrize.register_parametrization(module, "bias", DiffPatch(adapter.bias.diff[...]), unsafe=True)
    adapter_parameters = {id(p) for m in unet.modules() if isinstance(m, ADAPTER_MODULES) for p in m.parameters()}
    trainable, frozen, unadapted = [], 0, []
    for name, parameter in unet.named_parameters():
        if id(parameter) in adapter_parameters:
            trainable.append(parameter)
            continue
        parameter.requires_grad_(False)
        frozen += 1
        if not (name.endswith(".original") or name in bypassed):
            unadapted.append(name)
    if unadapted:
        raise AssertionError(f"diffusers parameters without a jaxlora counterpart: {unadapted[:5]}")
    return trainable, frozen


@dataclass
class Draw:
    """The inputs of one micro-step, drawn as `micro_step_loss` draws them (same keys, same functions)."""

    x0: np.ndarray  # NHWC, the model's latent scale
    noise: np.ndarray
    sigma: np.ndarray
    timestep: np.ndarray
    context: np.ndarray


def draw(data, settings: StepSettings, seed: int, micro_step: int) -> Draw:
    count = data["latents"].shape[0]
    batch = min(settings.batch_size, count)
    index = jax.random.permutation(jax.random.fold_in(permutation_key(seed), micro_step), count)[:batch]
    x0 = data["latents"][index].astype(jnp.float32)
    key_data = noise_key_data(seed, micro_step, 1)[0]
    noise_key, sigma_key = jax.random.split(jax.random.wrap_key_data(key_data, impl="threefry2x32"))
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32).astype(settings.compute_dtype).astype(jnp.float32)
    percent = jax.random.uniform(sigma_key, (batch,), minval=jnp.finfo(jnp.float32).tiny)
    sigma = settings.sampling.percent_to_sigma(percent)
    context = jnp.broadcast_to(data["context"], (batch, *data["context"].shape[1:]))
    return Draw(*(np.asarray(a) for a in (x0, noise, sigma, settings.sampling.timestep(sigma), context)))


def torch_inputs(d: Draw, dtype: torch.dtype) -> dict:
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    return {
        "x0": nchw(d.x0),
        "noise": nchw(d.noise),
        "sigma": torch.tensor(d.sigma).reshape(-1, 1, 1, 1),
        "timestep": torch.tensor(d.timestep),
        "context": torch.tensor(d.context.astype(np.float32)).to(dtype),
    }


def x0_loss(unet: torch.nn.Module, dtype: torch.dtype, inputs: dict) -> torch.Tensor:
    """ComfyUI's loss for an eps model: the x0-space MSE, in float32. The `+compile` configurations run this
    function through `torch.compile` (the UNet's forward and the loss; AOTAutograd compiles their backward)."""
    sigma, x0 = inputs["sigma"], inputs["x0"]
    noisy = x0 + sigma * inputs["noise"]
    xc = (noisy / torch.sqrt(sigma**2 + 1.0)).to(dtype)
    out = unet(xc, inputs["timestep"], encoder_hidden_states=inputs["context"], return_dict=False)[0].float()
    return torch.nn.functional.mse_loss(noisy - sigma * out, x0)


# ---- the jaxlora side ---------------------------------------------------------------------------------------


def randomize_adapters(network, seed: int) -> None:
    """Non-zero adapter values (a fresh LoRA's down is zero, which would hide a wrong down path)."""
    rng = np.random.default_rng(seed)
    for _, _, adapter in adapted_layers(network):
        for module in (adapter.weight, adapter.bias):
            if isinstance(module, LoRA):
                module.down[...] = jnp.asarray(0.05 * rng.standard_normal(module.down.shape), jnp.float32)
            elif isinstance(module, Diff):
                module.diff[...] = jnp.asarray(0.02 * rng.standard_normal(module.diff.shape), jnp.float32)


@dataclass
class JaxSide:
    """The trainer's compiled step over an adapted network; `step(i)` runs optimizer step i, returns its loss."""

    prepared: Prepared
    compiled: jax.stages.Compiled
    compile_seconds: float
    state: dict

    def step(self, i: int) -> jax.Array:
        self.state["adapters"], self.state["opt"], metrics = self.compiled(
            self.state["adapters"],
            self.state["opt"],
            self.state["base"],
            self.prepared.data,
            noise_key_data(self.prepared.seed, i, 1),
            permutation_key(self.prepared.seed),
            i,
        )
        return jax.block_until_ready(metrics)["loss"][0]


def train_config(args, dtype_name: str, remat: bool) -> TrainConfig:
    return TrainConfig(
        batch_size=args.batch,
        rank=args.rank,
        learning_rate=1e-4,
        training_dtype=dtype_name,
        lora_dtype="fp32",
        gradient_checkpointing=remat,
    )


@dataclass
class Prepared:
    """The trainer's network with non-zero adapters, its step settings and data, before compilation."""

    network: nnx.Module
    settings: StepSettings
    data: dict
    seed: int


def prepared_network(args, config: TrainConfig, checkpoint: Path, unet_config: UNetConfig) -> Prepared:
    """Set up by the trainer's own `prepare_run`, then given non-zero adapter values."""
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((args.batch, 4, args.latent, args.latent)).astype(np.float32) / 0.18215
    context = rng.standard_normal((1, TOKENS, unet_config.context_dim)).astype(np.float32)
    model = load_model(checkpoint, dtype=config.training_dtype)
    run = prepare_run(model, make_dataset(latents, {"c_crossattn": context}), config)
    network = nnx.merge(run.graph, run.adapters, run.base)
    randomize_adapters(network, seed=1)
    return Prepared(network, run.settings, run.data[0], config.seed)


def jax_side(args, config: TrainConfig, checkpoint: Path, unet_config: UNetConfig) -> JaxSide:
    """The prepared network's step compiled as `run_training` compiles it."""
    prepared = prepared_network(args, config, checkpoint, unet_config)
    graph, adapters, base = nnx.split(prepared.network, AdapterParam, ...)
    state = {"adapters": adapters, "opt": prepared.settings.optimizer.init(adapters), "base": base}
    begin = time.perf_counter()
    inputs = (
        adapters,
        state["opt"],
        base,
        prepared.data,
        noise_key_data(config.seed, 0, 1),
        permutation_key(config.seed),
        0,
    )
    compiled = compile_step(graph, prepared.settings).lower(*inputs).compile()
    return JaxSide(prepared, compiled, time.perf_counter() - begin, state)


TORCH_CONFIGS = ("patch", "bypass", "patch+compile", "bypass+compile")


@dataclass
class TorchSide:
    """diffusers' UNet with the jaxlora network's adapter values, in one of `TORCH_CONFIGS`; `step(i)` runs
    optimizer step i. A `+compile` configuration is compiled (and its compile time taken) when it is built."""

    unet: torch.nn.Module
    optimizer: torch.optim.Optimizer
    dtype: torch.dtype
    inputs: list[dict]
    frozen: int
    loss: object  # x0_loss, or torch.compile of it
    compile_seconds: float | None

    def step(self, i: int) -> torch.Tensor:
        loss = self.loss(self.unet, self.dtype, self.inputs[i])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def flops(self) -> int:
        """torch's own count (FlopCounterMode) of one eager forward and backward."""
        with FlopCounterMode(display=False) as counter:
            x0_loss(self.unet, self.dtype, self.inputs[0]).backward()
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops()


def torch_side(
    prepared: Prepared, config: TrainConfig, steps: int, checkpoint: Path, config_dir: Path, torch_config: str
) -> TorchSide:
    dtype = torch.float32 if config.training_dtype == "fp32" else torch.bfloat16
    unet = UNet2DConditionModel.from_single_file(
        str(checkpoint), config=str(config_dir), local_files_only=True, torch_dtype=torch.float32
    )
    lora_form = torch_config.removesuffix("+compile")
    trainable, frozen = adapt_torch_unet(unet, prepared.network, prepared.network.config, lora_form)
    unet.to(dtype)
    for p in trainable:  # fp32 masters, as jaxlora keeps them
        p.data = p.data.float()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    # drawn before timing: the torch step gets its inputs ready-made
    inputs = [torch_inputs(draw(prepared.data, prepared.settings, config.seed, i), dtype) for i in range(steps)]
    if not torch_config.endswith("+compile"):
        return TorchSide(unet, optimizer, dtype, inputs, frozen, x0_loss, None)
    loss = torch.compile(x0_loss)
    begin = time.perf_counter()  # one forward and backward compiles both; no optimizer step, so nothing changes
    loss(unet, dtype, inputs[0]).backward()
    optimizer.zero_grad(set_to_none=True)
    return TorchSide(unet, optimizer, dtype, inputs, frozen, loss, time.perf_counter() - begin)


def adapted_counts(network, torch_run: TorchSide) -> dict:
    """Adapted tensors per kind on both sides (the check that both train the same set)."""
    adapters = [a for _, _, a in adapted_layers(network)]
    counts = {
        "jaxlora LoRA": sum(isinstance(a.weight, LoRA) for a in adapters),
        "jaxlora diff + diff_b": sum(isinstance(a.weight, Diff) for a in adapters)
        + sum(a.bias is not None for a in adapters),
        "torch LoRA": sum(isinstance(m, (LoRAPatch, LoRABypass)) for m in torch_run.unet.modules()),
        "torch diff + diff_b": sum(isinstance(m, DiffPatch) for m in torch_run.unet.modules()),
        "torch frozen tensors": torch_run.frozen,
    }
    if (
        counts["jaxlora LoRA"] != counts["torch LoRA"]
        or counts["jaxlora diff + diff_b"] != counts["torch diff + diff_b"]
    ):
        raise AssertionError(f"the two sides adapt different layers: {counts}")
    return counts


def timed(fn, *args) -> tuple[object, float]:
    begin = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - begin


def loss_errors(reference: list[float], losses: list[float]) -> np.ndarray:
    """The relative differences of a torch side's checked losses from jaxlora's, step by step."""
    return np.abs(np.array(reference) - np.array(losses)) / np.abs(np.array(losses))


def run_case(args, dtype_name: str, remat: bool, checkpoint: Path, config_dir: Path, unet_config: UNetConfig) -> dict:
    """Build jaxlora's side and every torch configuration, check that their first two losses agree with
    jaxlora's (fp32: within CHECK_RTOL), then time them all alternately, the order rotating every step; the
    matmul peak is measured right after, so it sees the same machine load."""
    config = train_config(args, dtype_name, remat)
    jax_run = jax_side(args, config, checkpoint, unet_config)
    total = 2 + args.warmup + args.steps
    torch_runs = {
        name: torch_side(jax_run.prepared, config, total, checkpoint, config_dir, name) for name in args.torch_configs
    }
    counts = {name: adapted_counts(jax_run.prepared.network, run) for name, run in torch_runs.items()}
    steps = {"jaxlora": jax_run.step} | {name: run.step for name, run in torch_runs.items()}
    losses = {side: [] for side in steps}
    seconds = {side: [] for side in steps}

    def one_step(i: int) -> None:
        names = list(steps)
        for side in names[i % len(names) :] + names[: i % len(names)]:
            loss, s = timed(steps[side], i)
            seconds[side].append(s)
            if i < 2:
                losses[side].append(float(loss))

    for i in range(2):
        one_step(i)
    errors = {name: loss_errors(losses["jaxlora"], losses[name]) for name in torch_runs}
    if dtype_name == "fp32" and not all((e <= CHECK_RTOL).all() for e in errors.values()):
        raise AssertionError(f"fp32 losses differ beyond {CHECK_RTOL}: {losses}")
    for i in range(2, total):
        one_step(i)
    timed_from = 2 + args.warmup
    sides = {
        side: {
            "losses": losses[side],
            "first_step_s": seconds[side][0],
            "step_s": statistics.median(seconds[side][timed_from:]),
            "all_step_s": seconds[side],
        }
        for side in steps
    }
    for name, run in torch_runs.items():
        sides[name] |= {
            "compile_s": run.compile_seconds,
            "flops": run.flops(),
            "loss_error": [float(error) for error in errors[name]],
            "adapted": counts[name],
        }
    return {
        "dtype": dtype_name,
        "remat": remat,
        "compile_s": jax_run.compile_seconds,
        "flops": step_flops(jax_run.compiled),
        "sides": sides,
        "peak": measure_matmul_peak(args.peak_size, repeats=5),
    }


def fastest_torch(result: dict) -> str:
    return min((name for name in result["sides"] if name != "jaxlora"), key=lambda n: result["sides"][n]["step_s"])


def markdown(results: list[dict]) -> str:
    """Two tables: per case, jaxlora against torch's fastest configuration; per torch configuration, its row."""
    summary = [
        "| dtype | remat | jaxlora s/step | fastest torch config | its s/step | fastest torch / jaxlora | jaxlora "
        "compile s | jaxlora first step s | GFLOP/step (XLA) | jaxlora GFLOP/s | matmul peak GFLOP/s | jaxlora MFU |",
        "|---" * 12 + "|",
    ]
    configs = [
        "| dtype | remat | torch config | torch s/step | torch / jaxlora | torch.compile s | first step s | "
        "GFLOP/step (torch counter) | torch at XLA's count, of peak | loss rel. diff (step 1 / 2) |",
        "|---" * 10 + "|",
    ]
    for r in results:
        jax_s, flops = r["sides"]["jaxlora"]["step_s"], r["flops"] or float("nan")
        fastest = fastest_torch(r)
        torch_s = r["sides"][fastest]["step_s"]
        cells = [
            r["dtype"],
            "on" if r["remat"] else "off",
            f"{jax_s:.3f}",
            fastest,
            f"{torch_s:.3f}",
            f"**{torch_s / jax_s:.2f}x**",
            f"{r['compile_s']:.1f}",
            f"{r['sides']['jaxlora']['first_step_s']:.2f}",
            f"{flops / 1e9:.2f}",
            f"{flops / jax_s / 1e9:.1f}",
            f"{r['peak'] / 1e9:.1f}",
            f"{flops / jax_s / r['peak']:.1%}",
        ]
        summary.append("| " + " | ".join(cells) + " |")
        for name, side in r["sides"].items():
            if name == "jaxlora":
                continue
            cells = [
                r["dtype"],
                "on" if r["remat"] else "off",
                name,
                f"{side['step_s']:.3f}",
                f"{side['step_s'] / jax_s:.2f}x",
                "-" if side["compile_s"] is None else f"{side['compile_s']:.1f}",
                f"{side['first_step_s']:.2f}",
                f"{side['flops'] / 1e9:.2f}",
                f"{flops / side['step_s'] / r['peak']:.1%}",
                " / ".join(f"{error:.1e}" for error in side["loss_error"]),
            ]
            configs.append("| " + " | ".join(cells) + " |")
    counts = next(side["adapted"] for name, side in results[0]["sides"].items() if name != "jaxlora")
    adapted = ", ".join(f"{k} {v}" for k, v in counts.items())
    return "\n".join(summary) + "\n\n" + "\n".join(configs) + f"\n\nAdapted tensors: {adapted}."


def one_case_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and settings of one case (the jax-only benchmarks time one case of this script)."""
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--remat", default="off", choices=["off", "on"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64, help="model_channels (SD1.5: 320)")
    parser.add_argument("--latent", type=int, default=16, help="latent side (x8 pixels)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the two checked ones")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--remat", nargs="+", default=["off"], choices=["off", "on"])
    parser.add_argument(
        "--torch-configs",
        nargs="+",
        default=list(TORCH_CONFIGS),
        choices=TORCH_CONFIGS,
        help="PyTorch's LoRA as weight patching (ComfyUI) or as activation bypass (PEFT/kohya), eager or through "
        "torch.compile (default: all)",
    )
    parser.add_argument("--peak-size", type=int, default=2048, help="side of the square fp32 matmul for the peak")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    unet_config = sd15_shaped(args.width)
    print(
        f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), devices "
        f"{jax.devices()}, {os.cpu_count()} CPU cores\n"
    )
    results = []
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = write_random_checkpoint(unet_config, Path(folder) / "model.safetensors")
        config_dir = Path(folder) / "diffusers"
        config_dir.mkdir()
        (config_dir / "config.json").write_text(json.dumps(diffusers_config(unet_config)))
        for dtype_name in args.dtypes:
            for remat in args.remat:
                results.append(run_case(args, dtype_name, remat == "on", checkpoint, config_dir, unet_config))
                if args.json:  # after every case: a long run keeps what it measured
                    args.json.write_text(json.dumps(results, indent=1))
                print(markdown(results[-1:]), flush=True)  # each case as it ends, the table at the end
    print(
        f"SD1.5-structured UNet at width {args.width} (SD1.5: 320), random weights, batch {args.batch}, "
        f"{args.latent}x{args.latent} latents ({8 * args.latent} px), {TOKENS} tokens, LoRA rank {args.rank} on every "
        f"conv and linear + diff/diff_b, AdamW; median of {args.steps} alternated steps after {2 + args.warmup} "
        "untimed ones\n"
    )
    print(markdown(results))


if __name__ == "__main__":
    main()
