"""ldm module paths -> diffusers module paths for the UNet, as tables (what kohya SD1.x/SD2.x and PEFT
adapter files use). The tests check this table against diffusers' own single-file converter."""

from __future__ import annotations

from jaxlora.models.unet import UNetConfig

RESNET_PARTS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
TOP_LEVEL = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}


def unet_block_prefixes(config: UNetConfig) -> dict[str, str]:
    """ldm block prefix -> diffusers block prefix: ResBlocks (`.0`), SpatialTransformers (`.1`), resamplers."""
    table = {"middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0"}
    table["middle_block.2"] = "mid_block.resnets.1"
    block = 1
    for level, blocks in enumerate(config.num_res_blocks):
        for i in range(blocks):
            table[f"input_blocks.{block}.0"] = f"down_blocks.{level}.resnets.{i}"
            table[f"input_blocks.{block}.1"] = f"down_blocks.{level}.attentions.{i}"
            block += 1
        if level != len(config.num_res_blocks) - 1:
            table[f"input_blocks.{block}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            block += 1
    block = 0
    for up_level, level in enumerate(reversed(range(len(config.num_res_blocks)))):
        blocks = config.num_res_blocks[level] + 1
        for i in range(blocks):
            table[f"output_blocks.{block}.0"] = f"up_blocks.{up_level}.resnets.{i}"
            table[f"output_blocks.{block}.1"] = f"up_blocks.{up_level}.attentions.{i}"
            if level and i == blocks - 1:
                upsampler = 2 if config.transformer_depth_output[block] else 1
                table[f"output_blocks.{block}.{upsampler}.conv"] = f"up_blocks.{up_level}.upsamplers.0.conv"
            block += 1
    return table


def unet_to_diffusers(config: UNetConfig, module_paths) -> dict[str, str]:
    """Diffusers name of each ldm module path in `module_paths` (layers with weights)."""
    blocks = unet_block_prefixes(config)
    names = {}
    for path in module_paths:
        if path in TOP_LEVEL:
            names[path] = TOP_LEVEL[path]
            continue
        prefix = next(p for p in (".".join(path.split(".")[:n]) for n in (4, 3, 2)) if p in blocks)
        rest = path[len(prefix) + 1 :]
        names[path] = blocks[prefix] + ("." + RESNET_PARTS.get(rest, rest) if rest else "")
    return names
