"""Safetensors checkpoints -> Flax networks: layout detection, config inference, bounded-memory loading.

Accepted files: a full checkpoint (`model.diffusion_model.*` beside VAE and text-encoder weights, which are
ignored), a bare diffusion model (`diffusion_model.*`), or a diffusion model with no prefix. The config is
inferred from key names and shapes alone. The header is checked completely (missing, unexpected, mis-shaped
keys) before any tensor is read; tensors are then read one at a time from the memory-mapped file, converted
to Flax layout, cast and placed on the device, so the host never holds more than one tensor beyond the model.
On a device mesh each tensor goes straight to its shards (split by `jaxlora.parallel.mesh.FSDP_RULES`), so no
device ever holds the whole model.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from jaxlora.models.families import UNetFamily, find_unet_family
from jaxlora.models.layers import WeightLayer
from jaxlora.models.unet import UNet, UNetConfig
from jaxlora.parallel.mesh import fsdp_sharding
from jaxlora.parallel.placement import from_host

UNET_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
# Keys by which other layouts are recognised, so the error can say what the file is.
FOREIGN_LAYOUTS = {
    "down_blocks.": "a diffusers-format UNet (convert it to the single-file ldm layout)",
    "double_blocks.": "a Flux transformer (not supported yet)",
    "joint_blocks.": "an SD3 MMDiT (not supported)",
    "lora_": "a LoRA/adapter file, not a model",
    "encoder.down.": "a VAE, not a diffusion model",
}
DTYPES = {
    "bf16": jnp.bfloat16,
    "bfloat16": jnp.bfloat16,
    "fp32": jnp.float32,
    "float32": jnp.float32,
    "fp16": jnp.float16,
    "float16": jnp.float16,
}
PREDICTIONS = ("auto", "eps", "v")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file, key or shape at fault."""


class UnknownLayoutError(CheckpointError):
    pass


class KeyMismatchError(CheckpointError):
    pass


class ShapeMismatchError(CheckpointError):
    pass


@dataclass(frozen=True)
class CheckpointIndex:
    """A checkpoint's header: tensor shapes in torch layout (file keys) and the `__metadata__` strings."""

    path: Path
    shapes: Mapping[str, tuple[int, ...]]
    metadata: Mapping[str, str]


def read_index(path: str | Path) -> CheckpointIndex:
    """Read only the header of a .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise CheckpointError(f"{path}: pickled checkpoints are not loaded (they can run code); use .safetensors")
    try:
        with safe_open(path, framework="numpy") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable .safetensors file: {error}") from error
    return CheckpointIndex(path, shapes, metadata)


def _describe_keys(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def find_unet_prefix(keys) -> str:
    """The prefix under which the ldm UNet lives in this file."""
    keys = list(keys)
    for prefix in UNET_PREFIXES:
        if f"{prefix}input_blocks.0.0.weight" in keys:
            return prefix
    for marker, what in FOREIGN_LAYOUTS.items():
        if any(marker in key for key in keys):
            raise UnknownLayoutError(f"this looks like {what}: keys like {_describe_keys(keys, 4)}")
    raise UnknownLayoutError(
        "no ldm UNet found: expected 'input_blocks.0.0.weight' under one of the prefixes "
        f"{[p for p in UNET_PREFIXES if p]} or none; file keys: {_describe_keys(keys, 6)}"
    )


def _indices(shapes: Mapping[str, tuple], pattern: str) -> list[int]:
    """Sorted distinct integers N of keys matching `pattern` (a regex with one `(\\d+)` group)."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in shapes if (m := regex.match(key))})


def _transformer_depth(shapes: Mapping[str, tuple], block: str) -> int:
    return len(_indices(shapes, re.escape(block) + r"\.1\.transformer_blocks\.(\d+)\."))


def infer_unet_config(shapes: Mapping[str, tuple[int, ...]]) -> tuple[UNetConfig, UNetFamily]:
    """Infer the full UNet config from un-prefixed key shapes (torch layout); no config file needed."""
    try:
        model_channels, in_channels = shapes["input_blocks.0.0.weight"][:2]
        out_channels = shapes["out.2.weight"][0]
    except KeyError as error:
        raise UnknownLayoutError(f"ldm UNet key {error} is missing") from error

    channel_mult, num_res_blocks, depth = [], [], []
    res_in_level = 0
    for i in _indices(shapes, r"input_blocks\.(\d+)\.")[1:]:
        block = f"input_blocks.{i}"
        if f"{block}.0.op.weight" in shapes:
            num_res_blocks.append(res_in_level)
            res_in_level = 0
        elif f"{block}.0.in_layers.2.weight" in shapes:
            channels = shapes[f"{block}.0.in_layers.2.weight"][0]
            if res_in_level == 0:
                if channels % model_channels:
                    raise UnknownLayoutError(f"{block}: {channels} channels is not a multiple of {model_channels}")
                channel_mult.append(channels // model_channels)
            res_in_level += 1
            depth.append(_transformer_depth(shapes, block))
        else:
            raise UnknownLayoutError(f"{block} is neither a ResBlock nor a Downsample")
    num_res_blocks.append(res_in_level)

    context_dims = Counter(shape[-1] for key, shape in shapes.items() if key.endswith("attn2.to_k.weight"))
    if not context_dims:
        raise UnknownLayoutError("no cross-attention layer (attn2.to_k) found: not a text-conditioned UNet")
    # The majority width; a single odd tensor is then reported by name in the shape check.
    context_dim = context_dims.most_common(1)[0][0]
    adm = shapes["label_emb.0.0.weight"][1] if "label_emb.0.0.weight" in shapes else None
    family = find_unet_family(context_dim, adm)
    if family is None:
        raise UnknownLayoutError(
            f"unsupported UNet: context width {context_dim}, y width {adm}; supported: SD1.x (768, none), "
            "SD2.x (1024, none), SDXL base (2048, 2816)"
        )
    proj_in = next(shape for key, shape in shapes.items() if key.endswith("proj_in.weight"))
    output_blocks = _indices(shapes, r"output_blocks\.(\d+)\.")
    config = UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=tuple(num_res_blocks),
        transformer_depth=tuple(depth),
        transformer_depth_middle=_transformer_depth(shapes, "middle_block"),
        transformer_depth_output=tuple(_transformer_depth(shapes, f"output_blocks.{j}") for j in output_blocks),
        context_dim=context_dim,
        num_heads=family.num_heads,
        num_head_channels=family.num_head_channels,
        use_linear_in_transformer=len(proj_in) == 2,
        adm_in_channels=adm,
    )
    return config, family


def torch_parameters(network: nnx.Module) -> Iterator[tuple[str, WeightLayer, str]]:
    """(file key without prefix, layer, "weight"|"bias") for every parameter, in module order."""
    for path, node in nnx.iter_graph(network):
        if isinstance(node, WeightLayer):
            module = ".".join(str(part) for part in path)
            for name in ("weight", "bias"):
                if getattr(node, name) is not None:
                    yield f"{module}.{name}", node, name


def check_keys(network: nnx.Module, shapes: Mapping[str, tuple[int, ...]], prefix: str) -> None:
    """Raise naming every missing, unexpected or mis-shaped key, comparing in torch layout."""
    expected = {
        prefix + key: layer.torch_shape(name, getattr(layer, name).shape)
        for key, layer, name in torch_parameters(network)
    }
    present = {key for key in shapes if key.startswith(prefix)}
    missing = expected.keys() - present
    if missing:
        raise KeyMismatchError(f"checkpoint lacks {len(missing)} UNet keys: {_describe_keys(missing)}")
    unexpected = present - expected.keys()
    if unexpected:
        raise KeyMismatchError(f"checkpoint has {len(unexpected)} unexpected UNet keys: {_describe_keys(unexpected)}")
    wrong = [f"{key}: file {shapes[key]}, model {shape}" for key, shape in expected.items() if shapes[key] != shape]
    if wrong:
        raise ShapeMismatchError(f"{len(wrong)} UNet tensors have the wrong shape: " + "; ".join(wrong[:8]))


def resolve_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)


def guess_v_prediction(index: CheckpointIndex, prefix: str, family: UNetFamily) -> bool:
    """ComfyUI's rules: a top-level `v_pred` key; for SD2.x (4 input channels) the spread of one LayerNorm
    bias, which v-trained SD2 checkpoints have above 0.09. Reads one small tensor."""
    if "v_pred" in index.shapes:
        return True
    key = f"{prefix}output_blocks.11.1.transformer_blocks.0.norm1.bias"
    if family.name != "sd2" or key not in index.shapes:
        return False
    with safe_open(index.path, framework="numpy") as f:
        return float(np.std(f.get_tensor(key).astype(np.float32))) > 0.09


def set_parameter(
    layer: WeightLayer,
    name: str,
    torch_array: np.ndarray,
    dtype: jnp.dtype,
    sharding: jax.sharding.Sharding | None = None,
) -> None:
    """Convert one torch-layout tensor to the layer's Flax layout and dtype, and place it on the device (or send
    each device of `sharding` its slice)."""
    host_dtype = ml_dtypes.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(dtype)
    host = layer.from_torch(name, torch_array).astype(host_dtype)
    getattr(layer, name).set_value(jax.device_put(host) if sharding is None else from_host(host, sharding))


def load_unet(
    index: CheckpointIndex, dtype: jnp.dtype, weights: bool = True, mesh: jax.sharding.Mesh | None = None
) -> tuple[UNet, UNetFamily, str]:
    """Build the UNet abstractly, check every key, then stream the tensors in (unless `weights` is False:
    the structure alone is what adapter-file conversion needs), onto their shards when a `mesh` is given."""
    prefix = find_unet_prefix(index.shapes)
    unprefixed = {k[len(prefix) :]: s for k, s in index.shapes.items() if k.startswith(prefix)}
    config, family = infer_unet_config(unprefixed)
    network = UNet(config)
    check_keys(network, index.shapes, prefix)
    if not weights:
        return network, family, prefix
    with safe_open(index.path, framework="numpy") as f:
        for key, layer, name in torch_parameters(network):
            shape = getattr(layer, name).shape
            sharding = None if mesh is None else fsdp_sharding(mesh, key, shape)
            set_parameter(layer, name, f.get_tensor(prefix + key), dtype, sharding)
    return network, family, prefix
