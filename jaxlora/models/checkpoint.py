"""Safetensors checkpoints -> Flax networks: layout detection, config inference, bounded-memory loading.

Accepted files: a full checkpoint (`model.diffusion_model.*` beside VAE and text-encoder weights, which are
ignored), a bare diffusion model (`diffusion_model.*`), or a diffusion model with no prefix; an ldm UNet
(SD1.x, SD2.x, SDXL) or a Flux transformer (dev, schnell). The config is inferred from key names and shapes
alone. The header is checked completely (missing, unexpected, mis-shaped keys) before any tensor is read;
tensors are then read one at a time from the memory-mapped file, converted to Flax layout, cast and placed on
the device. The host holds at most one tensor beyond the model, or for a layer of stacked blocks (Flux) that
layer's per-block tensors until they are stacked and transferred. On a device mesh each tensor goes straight to
its shards (split by `jaxlora.parallel.mesh.FSDP_RULES`), so no device ever holds the whole model.
"""

from __future__ import annotations

import os
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

from jaxlora.models.families import FLUX_FAMILIES, FluxFamily, UNetFamily, find_unet_family
from jaxlora.models.flux import Flux, FluxConfig
from jaxlora.models.layers import WeightLayer
from jaxlora.models.stack import LayerSite, layer_sites
from jaxlora.models.unet import UNet, UNetConfig
from jaxlora.parallel.mesh import fsdp_sharding
from jaxlora.parallel.placement import from_host

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
# A key every checkpoint of an architecture holds (without prefix) -> the architecture.
ARCHITECTURE_MARKERS = {"input_blocks.0.0.weight": "unet", "img_in.weight": "flux"}
# Keys by which other layouts are recognised, so the error can say what the file is.
FOREIGN_LAYOUTS = {
    "down_blocks.": "a diffusers-format UNet (convert it to the single-file ldm layout)",
    "single_transformer_blocks.": "a diffusers-format Flux transformer (convert it to the single-file BFL layout)",
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
    if not os.access(path, os.R_OK):
        raise PermissionError(f"permission denied: {path}")
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


def find_architecture(keys) -> tuple[str, str]:
    """(architecture, prefix): which supported network this file holds ("unet" or "flux") and under which
    prefix."""
    keys = set(keys)
    for prefix in PREFIXES:
        for marker, architecture in ARCHITECTURE_MARKERS.items():
            if prefix + marker in keys:
                return architecture, prefix
    for marker, what in FOREIGN_LAYOUTS.items():
        if any(marker in key for key in keys):
            raise UnknownLayoutError(f"this looks like {what}: keys like {_describe_keys(keys, 4)}")
    raise UnknownLayoutError(
        f"no diffusion model found: expected one of {sorted(ARCHITECTURE_MARKERS)} under one of the prefixes "
        f"{[p for p in PREFIXES if p]} or none; file keys: {_describe_keys(keys, 6)}"
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


def infer_flux_config(shapes: Mapping[str, tuple[int, ...]]) -> tuple[FluxConfig, FluxFamily]:
    """Flux config from un-prefixed key shapes: widths from the embedders, depths from the block indices, the
    head width from the QK-norm scale, dev (guidance embedding) or schnell from `guidance_in`."""
    try:
        hidden, patched_in = shapes["img_in.weight"]
        context_dim = shapes["txt_in.weight"][1]
        vec_in_dim = shapes["vector_in.in_layer.weight"][1]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        mlp_hidden = shapes["double_blocks.0.img_mlp.0.weight"][0]
        patched_out = shapes["final_layer.linear.weight"][0]
    except KeyError as error:
        raise UnknownLayoutError(f"Flux key {error} is missing") from error
    if hidden % head_dim:
        raise UnknownLayoutError(f"hidden size {hidden} is not a multiple of the QK-norm width {head_dim}")
    guidance = "guidance_in.in_layer.weight" in shapes
    try:
        config = FluxConfig(
            hidden_size=hidden,
            num_heads=hidden // head_dim,
            mlp_hidden=mlp_hidden,
            depth=len(_indices(shapes, r"double_blocks\.(\d+)\.")),
            depth_single_blocks=len(_indices(shapes, r"single_blocks\.(\d+)\.")),
            in_channels=patched_in // 4,
            out_channels=patched_out // 4,
            context_dim=context_dim,
            vec_in_dim=vec_in_dim,
            guidance_embed=guidance,
        )
    except ValueError as error:
        raise UnknownLayoutError(f"unsupported Flux layout: {error}") from error
    return config, FLUX_FAMILIES[guidance]


def torch_parameters(network: nnx.Module) -> Iterator[tuple[str, LayerSite, str]]:
    """(file key without prefix, layer site, "weight"|"bias") for every parameter, in module order; a stacked
    layer gives one entry per block. The site reads like the layer (`getattr(site, name).shape`,
    `site.torch_shape(name)`); `site.value(name)` is the block's array."""
    for site in layer_sites(network):
        for name in ("weight", "bias"):
            if getattr(site.layer, name) is not None:
                key = site.layer.weight_key if name == "weight" else name
                yield f"{site.path}.{key}", site, name


def check_keys(network: nnx.Module, shapes: Mapping[str, tuple[int, ...]], prefix: str) -> None:
    """Raise naming every missing, unexpected or mis-shaped key, comparing in torch layout."""
    expected = {prefix + key: site.torch_shape(name) for key, site, name in torch_parameters(network)}
    present = {key for key in shapes if key.startswith(prefix)}
    kind = type(network).__name__
    missing = expected.keys() - present
    if missing:
        raise KeyMismatchError(f"checkpoint lacks {len(missing)} {kind} keys: {_describe_keys(missing)}")
    unexpected = present - expected.keys()
    if unexpected:
        raise KeyMismatchError(f"checkpoint has {len(unexpected)} unexpected {kind} keys: {_describe_keys(unexpected)}")
    wrong = [f"{key}: file {shapes[key]}, model {shape}" for key, shape in expected.items() if shapes[key] != shape]
    if wrong:
        raise ShapeMismatchError(f"{len(wrong)} {kind} tensors have the wrong shape: " + "; ".join(wrong[:8]))


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


def _host_dtype(dtype: jnp.dtype):
    return ml_dtypes.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(dtype)


def _place(host: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """On the default device, or each device of `sharding` sent only its slice."""
    return jax.device_put(host) if sharding is None else from_host(host, sharding)


def set_parameter(
    layer: WeightLayer,
    name: str,
    torch_array: np.ndarray,
    dtype: jnp.dtype,
    sharding: jax.sharding.Sharding | None = None,
) -> None:
    """Convert one torch-layout tensor to the layer's Flax layout and dtype, and place it on the device (or send
    each device of `sharding` its slice)."""
    getattr(layer, name).set_value(_place(layer.from_torch(name, torch_array).astype(_host_dtype(dtype)), sharding))


def read_parameters(network: nnx.Module, f, prefix: str, dtype: jnp.dtype, mesh: jax.sharding.Mesh | None) -> None:
    """Fill the network from an open safetensors file, onto the `mesh`'s shards when one is given. A stacked
    layer's per-block tensors are converted one at a time and stacked on the host, then placed in one transfer."""

    def sharding(key: str, shape: tuple[int, ...]) -> jax.sharding.Sharding | None:
        return None if mesh is None else fsdp_sharding(mesh, key, shape)

    pending: dict[tuple[int, str], list[np.ndarray]] = {}
    for key, site, name in torch_parameters(network):
        shape = getattr(site.layer, name).shape
        if site.index is None:
            set_parameter(site.layer, name, f.get_tensor(prefix + key), dtype, sharding(key, shape))
            continue
        blocks = pending.setdefault((id(site.layer), name), [])
        blocks.append(site.from_torch(name, f.get_tensor(prefix + key)).astype(_host_dtype(dtype)))
        if len(blocks) == shape[0]:
            getattr(site.layer, name).set_value(_place(np.stack(blocks), sharding(key, shape)))
            del pending[(id(site.layer), name)]


def load_network(
    index: CheckpointIndex, dtype: jnp.dtype, weights: bool = True, mesh: jax.sharding.Mesh | None = None
) -> tuple[UNet | Flux, UNetFamily | FluxFamily, str]:
    """Detect the architecture, build the network abstractly, check every key, then stream the tensors in
    (unless `weights` is False: the structure alone is what adapter-file conversion needs), onto their shards
    when a `mesh` is given."""
    architecture, prefix = find_architecture(index.shapes)
    unprefixed = {k[len(prefix) :]: s for k, s in index.shapes.items() if k.startswith(prefix)}
    if architecture == "flux":
        config, family = infer_flux_config(unprefixed)
        network = Flux(config)
    else:
        config, family = infer_unet_config(unprefixed)
        network = UNet(config)
    check_keys(network, index.shapes, prefix)
    if weights:
        with safe_open(index.path, framework="numpy") as f:
            read_parameters(network, f, prefix, dtype, mesh)
    return network, family, prefix
