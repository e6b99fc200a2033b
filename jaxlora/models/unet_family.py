"""The ldm UNet family: SD1.x, SD2.x and SDXL base, told apart by their context width and `label_emb`.

Head counts are not stored in the weights: SD1.x uses 8 heads in every block, SD2.x and SDXL a head width of
64 (ComfyUI's `unet_extra_config`). They predict eps, or v for SD2's 768-v models (ComfyUI's detection:
a top-level `v_pred` key, else the spread of one LayerNorm bias). SDXL's `y` joins the pooled CLIP-G output
and six size embeddings. kohya names SD1.x/SD2.x layers by their diffusers names (as sd-scripts does) and
SDXL's by their ldm names; PEFT files use `unet.<diffusers name>`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.models.family import (
    AdapterNames,
    ConditioningField,
    ModelFamily,
    NameTarget,
    TextConditioning,
    TextTower,
    UnknownLayoutError,
    Variant,
    key_indices,
)
from jaxlora.models.layers import sinusoidal_embedding
from jaxlora.models.sampling import LatentFormat, ModelSampling, scaled_linear_schedule
from jaxlora.models.unet import UNet, UNetConfig
from jaxlora.models.unet_names import unet_to_diffusers

SD15_LATENT = LatentFormat(scale_factor=0.18215)  # SD1.x and SD2.x
SDXL_LATENT = LatentFormat(scale_factor=0.13025)
SD1 = Variant("sd1", "Stable Diffusion 1.x", SD15_LATENT, "sd_v1", "stable-diffusion-v1/lora", kohya_v_suffix=True)
SD2 = Variant(
    "sd2",
    "Stable Diffusion 2.x",
    SD15_LATENT,
    "sd_v2",
    "stable-diffusion-v2-512/lora",
    kohya_v2=True,
    kohya_v_suffix=True,
)
SDXL = Variant(
    "sdxl", "Stable Diffusion XL", SDXL_LATENT, "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", resolution=1024
)
# ComfyUI's CLIPTextEncode per variant (comfy/sd1_clip.py, sd2_clip.py, sdxl_clip.py): SD1.x the last CLIP-L layer
# after the final norm; SD2.x ViT-H's penultimate layer, normed, padded with 0; SDXL CLIP-L's and bigG's penultimate
# layers un-normed side by side (768 + 1280), bigG's projected pooled output.
TEXT_CONDITIONING = {
    "sd1": TextConditioning((TextTower("l"),)),
    "sd2": TextConditioning((TextTower("h", layer=-2, pad_with_end=False),)),
    "sdxl": TextConditioning(
        (TextTower("l", layer=-2, normed=False), TextTower("g", layer=-2, normed=False, pad_with_end=False)),
        pooled_from="g",
    ),
}
# variant -> (context width, `y` width, heads, head width): what tells the variants apart, and the head rule.
VARIANT_SHAPES = {SD1: (768, None, 8, None), SD2: (1024, None, None, 64), SDXL: (2048, 2816, None, 64)}
# Variants whose kohya files name layers by their diffusers names (sd-scripts' SD1/SD2 UNet).
KOHYA_DIFFUSERS_NAMES = {SD1, SD2}
PREDICTIONS = ("eps", "v")
SIZE_FIELDS = ("height", "width", "crop_h", "crop_w", "target_height", "target_width")
SDXL_SIZE_EMBED_DIM = 256
V_PRED_KEY = "output_blocks.11.1.transformer_blocks.0.norm1.bias"

# A UNet with SD1.x's structure (8 heads, conv projections, 768-d context) at a size that runs in seconds.
TINY_SD1 = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=(2, 2, 2),
    transformer_depth=(1, 1, 1, 1, 0, 0),
    transformer_depth_middle=1,
    transformer_depth_output=(0, 0, 0, 1, 1, 1, 1, 1, 1),
    context_dim=768,
    num_heads=8,
)
# The smallest UNet with every block type (two levels, one ResBlock each): the training demo, and the tests
# that compile a backward pass.
DEMO_UNET = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=(1, 1),
    transformer_depth=(1, 0),
    transformer_depth_middle=1,
    transformer_depth_output=(0, 0, 1, 1),
    context_dim=768,
    num_heads=8,
)


def _transformer_depth(shapes: Mapping[str, tuple], block: str) -> int:
    return len(key_indices(shapes, re.escape(block) + r"\.1\.transformer_blocks\.(\d+)\."))


def _variant(context_dim: int, adm_in_channels: int | None) -> Variant | None:
    return next((v for v, (c, a, _, _) in VARIANT_SHAPES.items() if (c, a) == (context_dim, adm_in_channels)), None)


def infer_unet_config(shapes: Mapping[str, tuple[int, ...]]) -> tuple[UNetConfig, Variant]:
    """Infer the full UNet config from un-prefixed key shapes (torch layout); no config file needed."""
    try:
        model_channels, in_channels = shapes["input_blocks.0.0.weight"][:2]
        out_channels = shapes["out.2.weight"][0]
    except KeyError as error:
        raise UnknownLayoutError(f"ldm UNet key {error} is missing") from error

    channel_mult, num_res_blocks, depth = [], [], []
    res_in_level = 0
    for i in key_indices(shapes, r"input_blocks\.(\d+)\.")[1:]:
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
    variant = _variant(context_dim, adm)
    if variant is None:
        supported = ", ".join(f"{v.description} ({c}, {a or 'none'})" for v, (c, a, _, _) in VARIANT_SHAPES.items())
        raise UnknownLayoutError(
            f"unsupported UNet: context width {context_dim}, y width {adm}; supported: {supported}"
        )
    _, _, heads, head_channels = VARIANT_SHAPES[variant]
    proj_in = next(shape for key, shape in shapes.items() if key.endswith("proj_in.weight"))
    output_blocks = key_indices(shapes, r"output_blocks\.(\d+)\.")
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
        num_heads=heads,
        num_head_channels=head_channels,
        use_linear_in_transformer=len(proj_in) == 2,
        adm_in_channels=adm,
    )
    return config, variant


def sdxl_vector(
    pooled_output: jax.Array,
    height,
    width,
    crop_h=0,
    crop_w=0,
    target_height=None,
    target_width=None,
) -> jax.Array:
    """SDXL's ``y`` [B, 1280 + 6*256]: pooled CLIP-G output [B, 1280] then embeddings of the six size ids.

    Sizes are in pixels (ComfyUI's default is the latent's H and W times 8); each is a number or one value
    per sample [B]. The targets default to height and width. Each id is embedded like the UNet's timestep.
    """
    target_height = height if target_height is None else target_height
    target_width = width if target_width is None else target_width
    batch = pooled_output.shape[0]
    size_ids = jnp.stack(
        [
            jnp.broadcast_to(jnp.asarray(size, jnp.float32), (batch,))
            for size in (height, width, crop_h, crop_w, target_height, target_width)
        ],
        axis=1,
    )
    size_embeddings = sinusoidal_embedding(size_ids, SDXL_SIZE_EMBED_DIM).reshape(batch, -1)
    return jnp.concatenate([pooled_output, size_embeddings], axis=1)


def sdxl_y(conditioning: Mapping[str, np.ndarray], latent_hw: tuple[int, int]) -> jax.Array:
    """SDXL's `y` from a bucket's fields: pooled output and sizes in pixels (default the latent size x 8)."""
    height, width = 8 * latent_hw[0], 8 * latent_hw[1]
    defaults = {"height": height, "width": width, "crop_h": 0, "crop_w": 0}
    sizes = {name: conditioning.get(name, defaults.get(name)) for name in SIZE_FIELDS}
    sizes["target_height"] = conditioning.get("target_height", sizes["height"])
    sizes["target_width"] = conditioning.get("target_width", sizes["width"])
    pooled = jnp.asarray(conditioning["pooled_output"], jnp.float32)
    rows = max([pooled.shape[0]] + [np.size(v) for v in sizes.values()])
    pooled = jnp.broadcast_to(pooled, (rows, pooled.shape[-1]))
    return sdxl_vector(
        pooled, *(jnp.broadcast_to(jnp.asarray(sizes[n], jnp.float32).reshape(-1), (rows,)) for n in SIZE_FIELDS)
    )


def processor_name(diffusers_name: str) -> str:
    """Old diffusers attention-processor spelling, which ComfyUI maps for attention projections:
    `attn1.to_q` -> `attn1.processor.to_q`, `attn1.to_out.0` -> `attn1.processor.to_out`."""
    return re.sub(r"\.to_out\.0$", ".to_out", diffusers_name.replace(".to_", ".processor.to_"))


def _is_attention_projection(diffusers_name: str) -> bool:
    return re.search(r"\.attn\d\.to_(q|k|v|out\.0)$", diffusers_name) is not None


def _flat(name: str) -> str:
    return name.replace(".", "_")


def unet_adapter_names(variant: Variant, config: UNetConfig, layer_paths: Sequence[str]) -> AdapterNames:
    """Every base name ComfyUI's loader resolves for a UNet layer (spec 8.2, 8.3) plus the modern diffusers
    names, and the export names: `diffusion_model.<path>`; kohya `lora_unet_<name>` (diffusers names for
    SD1.x/SD2.x); PEFT `unet.<diffusers name>`, in the processor spelling for attention projections (the only
    spelling of them ComfyUI maps)."""
    diffusers = unet_to_diffusers(config, layer_paths)
    aliases, comfyui, kohya, peft = {}, {}, {}, {}
    for path in layer_paths:
        whole = NameTarget(path)
        named = [f"diffusion_model.{path}", "lora_unet_" + _flat(path)]
        comfyui[path] = {f"diffusion_model.{path}": whole}
        kohya_name = diffusers[path] if variant in KOHYA_DIFFUSERS_NAMES and path in diffusers else path
        kohya[path] = {"lora_unet_" + _flat(kohya_name): whole}
        if path in diffusers:
            name = diffusers[path]
            processor = processor_name(name)
            named += ["lora_unet_" + _flat(name), "lycoris_" + _flat(name), name, f"unet.{name}"]
            named += [processor, f"unet.{processor}"]
            peft[path] = {f"unet.{processor if _is_attention_projection(name) else name}": whole}
        aliases.update(dict.fromkeys(named, whole))
    return AdapterNames(aliases, {"comfyui": comfyui, "kohya": kohya, "peft": peft})


class UNetFamily(ModelFamily):
    name = "unet"
    variants = (SD1, SD2, SDXL)
    markers = ("input_blocks.0.0.weight",)
    foreign_layouts = {"down_blocks.": "a diffusers-format UNet (convert it to the single-file ldm layout)"}
    number_fields = SIZE_FIELDS  # SDXL's size and crop ids, in pixels
    config_type = UNetConfig
    demo_config = DEMO_UNET

    def infer_config(self, shapes):
        return infer_unet_config(shapes)

    def variant_of(self, config: UNetConfig) -> Variant:
        variant = _variant(config.context_dim, config.adm_in_channels)
        if variant is None:
            raise ValueError(f"no UNet variant has context {config.context_dim} and y {config.adm_in_channels}")
        return variant

    def build(self, config: UNetConfig) -> UNet:
        return UNet(config)

    def load_sampling(self, variant, config, read_tensor, keys, prediction):
        if prediction == "auto":
            prediction = "v" if self._v_prediction(variant, read_tensor, keys) else "eps"
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r} for {variant.description}; use auto, eps or v")
        return ModelSampling(prediction, scaled_linear_schedule())

    @staticmethod
    def _v_prediction(variant: Variant, read_tensor, keys) -> bool:
        """ComfyUI's rules: a top-level `v_pred` key; for SD2.x the spread of one LayerNorm bias, which
        v-trained SD2 checkpoints have above 0.09. Reads one small tensor."""
        if "v_pred" in keys:
            return True
        if variant != SD2 or V_PRED_KEY not in keys:
            return False
        return float(np.std(np.asarray(read_tensor(V_PRED_KEY), np.float32))) > 0.09

    def run_sampling(self, variant, loaded, prediction, shift):
        if shift is not None:
            raise ValueError(f"flow_shift applies to flow models, not {variant.description}")
        return loaded if prediction == "auto" else ModelSampling(prediction, loaded.schedule)

    def conditioning(self, variant, config: UNetConfig):
        fields = [ConditioningField("c_crossattn", config.context_dim, "text encoder output")]
        if config.pooled_dim is not None:
            fields.append(ConditioningField("pooled_output", config.pooled_dim, "pooled text embedding"))
        return tuple(fields)

    def input_names(self, variant, config: UNetConfig):
        return ("context",) if config.pooled_dim is None else ("context", "y")

    def network_inputs(self, variant, config: UNetConfig, conditioning, latent_hw, dtype, guidance):
        inputs = {"context": jnp.asarray(conditioning["c_crossattn"], dtype)}
        if config.pooled_dim is not None:
            inputs["y"] = sdxl_y(conditioning, latent_hw).astype(dtype)
        return inputs

    def adapter_names(self, variant, config, layer_paths):
        return unet_adapter_names(variant, config, layer_paths)

    def text_conditioning(self, variant, config: UNetConfig):
        return TEXT_CONDITIONING[variant.name]

    def describe(self, config: UNetConfig):
        y = f", y {config.adm_in_channels}-d" if config.adm_in_channels else ""
        return [
            ("channels", f"{config.model_channels} x {config.channel_mult}, res blocks {config.num_res_blocks}"),
            ("transformers", f"in {config.transformer_depth}, mid {config.transformer_depth_middle}"),
            ("context", f"{config.context_dim}-d{y}"),
        ]


UNET_FAMILY = UNetFamily()
