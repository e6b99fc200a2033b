"""Flux adapter names (jaxlora/models/flux_names.py) against ComfyUI's load math (tests/adapters/comfy_loader.py,
transcribed from ComfyUI's source independently of the tables under test) and diffusers' own module names and
converters. Numpy only: patched weights agree in fp32 to rtol 1e-5, atol 1e-6."""

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

from jaxlora.adapters.row_slices import LoraPiece, SliceShapeError, fuse_lora, split_lora
from jaxlora.models.family import NameTarget
from jaxlora.models.flux_names import diffusers_names, export_names, import_aliases
from tests.adapters import comfy_loader
from tests.models.flux_layer_shapes import (
    H,
    assert_same_weights,
    expected_weights,
    flux_layers,
    random_loras,
    state_dict,
)


def oracle_target(target, sd):
    """A ComfyUI key-map target as (BFL path, rows, swapped), or None when it patches no weight of the model."""
    if isinstance(target, str):
        key, rows, swapped = target, None, False
    else:
        key, offset = target[:2]
        rows = None if offset is None else (offset[1], offset[1] + offset[2])
        swapped = len(target) > 2
    if not key.endswith(".weight") or key not in sd:
        return None
    return key[len("diffusion_model.") : -len(".weight")], rows, swapped


@pytest.mark.parametrize(
    "alias, path, rows, swapped",
    [
        ("diffusion_model.double_blocks.1.img_attn.qkv", "double_blocks.1.img_attn.qkv", None, False),
        ("lora_unet_double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv", None, False),
        ("lora_unet_single_blocks_1_linear1", "single_blocks.1.linear1", None, False),
        ("diffusion_model.single_blocks.0.linear1_qkv", "single_blocks.0.linear1", (0, 3 * H), False),
        ("transformer.transformer_blocks.0.attn.to_k", "double_blocks.0.img_attn.qkv", (H, 2 * H), False),
        ("lycoris_transformer_blocks_1_attn_add_v_proj", "double_blocks.1.txt_attn.qkv", (2 * H, 3 * H), False),
        ("lora_transformer_single_transformer_blocks_1_proj_mlp", "single_blocks.1.linear1", (3 * H, 7 * H), False),
        ("single_transformer_blocks.0.attn.to_q", "single_blocks.0.linear1", (0, H), False),
        ("transformer.norm_out.linear", "final_layer.adaLN_modulation.1", None, True),
        ("lycoris_norm_out_linear", "final_layer.adaLN_modulation.1", None, True),
        ("proj_out", "final_layer.linear", None, False),
        ("transformer.single_transformer_blocks.1.proj_out", "single_blocks.1.linear2", None, False),
        ("transformer.time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer", None, False),
        ("transformer.transformer_blocks.1.ff_context.linear_out", "double_blocks.1.txt_mlp.2", None, False),
        ("transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj", "single_blocks.0.linear1", None, False),
    ],
)
def test_alias_names_the_bfl_layer_and_rows(alias, path, rows, swapped):
    assert import_aliases(flux_layers(), H)[alias] == NameTarget(path, rows, swapped)


@pytest.mark.parametrize("guidance", [True, False])
def test_aliases_are_exactly_the_names_comfyui_maps_to_weights(guidance):
    layers = flux_layers(guidance=guidance)
    sd = state_dict(layers)
    oracle = {}
    for alias, target in comfy_loader.flux_key_map(sd).items():
        if (resolved := oracle_target(target, sd)) is not None:
            oracle[alias] = resolved
    ours = {alias: (t.path, t.rows, t.swap_halves) for alias, t in import_aliases(layers, H).items()}
    assert ours == oracle
    assert any("guidance" in alias for alias in ours) == guidance


def test_kohya_and_peft_names():
    assert list(export_names("double_blocks.0.img_attn.qkv", H, "kohya")) == ["lora_unet_double_blocks_0_img_attn_qkv"]
    assert list(export_names("single_blocks.3.linear1", H, "peft")) == [
        f"transformer.single_transformer_blocks.3.{name}"
        for name in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    ]
    assert export_names("final_layer.adaLN_modulation.1", H, "peft") == {
        "transformer.norm_out.linear": NameTarget("final_layer.adaLN_modulation.1", None, True)
    }


def test_diffusers_pieces_fused_give_the_weights_comfyui_patches():
    """Pieces of different ranks and alphas, in every diffusers spelling, some slices missing (their rows stay
    unpatched), plus the swapped final modulation: fused into one LoRA per weight, they patch what ComfyUI does."""
    layers = flux_layers()
    sd = state_dict(layers)
    aliases = import_aliases(layers, H)
    rng = np.random.default_rng(3)
    file_names = [
        "transformer.transformer_blocks.0.attn.to_q",
        "lycoris_transformer_blocks_0_attn_to_k",
        "transformer_blocks.0.attn.to_v",
        "lora_transformer_transformer_blocks_1_attn_add_k_proj",
        "transformer.single_transformer_blocks.0.attn.to_q",
        "transformer.single_transformer_blocks.0.attn.to_v",
        "transformer.single_transformer_blocks.0.proj_mlp",
        "transformer.single_transformer_blocks.1.proj_out",
        "diffusion_model.single_blocks.1.linear1_qkv",
        "transformer.norm_out.linear",
    ]
    tensors, pieces = {}, {}
    for i, name in enumerate(file_names):
        target = aliases[name]
        out, fan_in = layers[target.path]
        rows = out if target.rows is None else target.rows[1] - target.rows[0]
        rank, alpha = 2 + i % 3, (None if i % 4 == 0 else 1.5 + i)
        up = rng.standard_normal((rows, rank)).astype(np.float32)
        down = rng.standard_normal((rank, fan_in)).astype(np.float32)
        tensors.update({f"{name}.lora_B.weight": up, f"{name}.lora_A.weight": down})
        if alpha is not None:
            tensors[f"{name}.alpha"] = np.float32(alpha)
        pieces.setdefault(target.path, []).append(LoraPiece(name, target, up, down, alpha))
    patched, not_loaded = comfy_loader.apply_file(sd, tensors, comfy_loader.flux_key_map(sd))
    assert not_loaded == []
    fused = {}
    for path, group in pieces.items():
        up, down, alpha = fuse_lora(group, layers[path][0])
        assert up.shape == (layers[path][0], down.shape[0]) and alpha == down.shape[0]
        fused[path] = (up, down, alpha)
    assert_same_weights(patched, expected_weights(sd, fused, {}))
    untouched = slice(H, 2 * H)  # to_k of the txt stream only: its q and v rows keep their weights
    txt_qkv = "diffusion_model.double_blocks.1.txt_attn.qkv.weight"
    np.testing.assert_array_equal(np.delete(patched[txt_qkv], untouched, axis=0), np.delete(sd[txt_qkv], untouched, 0))


def test_diffusers_bias_diffs_on_slices_and_the_swapped_modulation_are_consumed_but_not_applied():
    """A ComfyUI fact the exporter must respect: write bias diffs of fused or swapped layers under BFL names."""
    layers = flux_layers()
    sd = state_dict(layers)
    tensors = {
        "transformer.transformer_blocks.0.attn.to_q.diff_b": np.ones(H, np.float32),
        "transformer.single_transformer_blocks.0.proj_mlp.diff_b": np.ones(4 * H, np.float32),
        "transformer.norm_out.linear.diff_b": np.ones(2 * H, np.float32),
        "transformer.proj_out.diff_b": np.ones(16, np.float32),
    }
    patched, not_loaded = comfy_loader.apply_file(sd, tensors, comfy_loader.flux_key_map(sd))
    assert not_loaded == []
    changed = [k for k in sd if not np.array_equal(patched[k], sd[k])]
    assert changed == ["diffusion_model.final_layer.linear.bias"]


def test_a_piece_that_does_not_fit_its_slice_names_its_key():
    target = import_aliases(flux_layers(), H)["transformer.transformer_blocks.0.attn.to_k"]
    piece = LoraPiece("transformer.transformer_blocks.0.attn.to_k", target, np.ones((H + 1, 2)), np.ones((2, H)))
    with pytest.raises(SliceShapeError, match=r"transformer\.transformer_blocks\.0\.attn\.to_k: 33 rows"):
        fuse_lora([piece], 3 * H)
    bad_rank = LoraPiece("lycoris_transformer_blocks_0_attn_to_k", target, np.ones((H, 2)), np.ones((3, H)))
    with pytest.raises(SliceShapeError, match="lycoris_transformer_blocks_0_attn_to_k: LoRA up"):
        fuse_lora([bad_rank], 3 * H)


def test_split_refuses_a_weight_whose_height_does_not_fit_the_hidden_size():
    names = export_names("single_blocks.0.linear1", H, "peft")
    with pytest.raises(SliceShapeError, match=r"single_transformer_blocks\.0\.proj_mlp: rows \[96, 224\) exceed"):
        split_lora(np.ones((6 * H, 2)), np.ones((2, H)), 1.0, names)
    with pytest.raises(SliceShapeError, match=r"cover 224 of the 256 rows of single_blocks\.0\.linear1"):
        split_lora(np.ones((8 * H, 2)), np.ones((2, H)), 1.0, names)


def test_unknown_style_and_layer_are_refused():
    with pytest.raises(ValueError, match="unknown adapter style 'a1111'"):
        export_names("img_in", H, "a1111")
    assert export_names("pe_embedder", H, "peft") == {}  # no diffusers name: the style cannot write it


def test_every_diffusers_name_is_a_linear_of_diffusers_flux_transformer():
    """diffusers' own FluxTransformer2DModel, tiny: its linear layers are exactly the names written in peft style."""
    heads, head_dim = 2, 16
    hidden = heads * head_dim
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=24,
        pooled_projection_dim=12,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    written = {
        name[len("transformer.") :]
        for path in flux_layers(hidden=hidden)
        for name in export_names(path, hidden, "peft")
    }
    assert written == linears


def tagged_checkpoint(layers):
    """A BFL checkpoint whose every tensor holds, per row, tag * 2**20 + row: converted tensors tell where each of
    their rows came from. One column suffices: converters move rows only."""
    keys = [f"{path}.{end}" for path in layers for end in ("weight", "bias")]
    keys += [
        f"{p.rsplit('.', 1)[0]}.norm.{which}.scale"
        for p in layers
        if p.endswith(("_attn.qkv", ".linear1"))
        for which in ("query_norm", "key_norm")
    ]
    rows = {k: layers[k.rsplit(".", 1)[0]][0] if not k.endswith(".scale") else 4 for k in keys}
    tensors = {k: (i * 2**20 + torch.arange(rows[k], dtype=torch.int64))[:, None] for i, k in enumerate(keys)}
    return keys, tensors


def test_diffusers_single_file_converter_moves_the_rows_the_names_say():
    """diffusers' BFL -> diffusers converter (full-size widths are hard-coded in it, so H = 3072), as an oracle
    for every diffusers name's BFL layer, row slice and swap."""
    hidden = 3072
    layers = flux_layers(hidden=hidden, double=1, single=1)
    keys, tensors = tagged_checkpoint(layers)
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(tensors))
    found = {}
    for name, tensor in converted.items():
        tags = tensor[:, 0].numpy()
        (source,) = {keys[t >> 20] for t in tags}
        if not source.endswith(".weight"):
            continue
        found[name[: -len(".weight")]] = (source[: -len(".weight")], list(tags & (2**20 - 1)))
    ours = {}
    for path, (out, _) in layers.items():
        for name, target in diffusers_names(path, hidden).items():
            start, stop = target.rows or (0, out)
            rows = list(range(start, stop))
            ours[name] = (path, rows[len(rows) // 2 :] + rows[: len(rows) // 2] if target.swap_halves else rows)
    assert ours == found


def test_diffusers_kohya_converter_reads_our_kohya_file_as_our_peft_file():
    """diffusers' kohya -> PEFT converter as an oracle for the kohya names and the split into diffusers pieces
    (its single-block split sizes are hard-coded to H = 3072). It drops final-layer alphas (a TODO there), so those
    layers get alpha = rank, scale 1."""
    hidden, rank = 3072, 4
    layers = flux_layers(hidden=hidden, double=1, single=1, channels=64, context=64, pooled=64, time_dim=64)
    loras = random_loras(layers, rank=rank)
    for path in ("final_layer.linear", "final_layer.adaLN_modulation.1"):
        loras[path] = (*loras[path][:2], float(rank))
    kohya, peft = {}, {}
    for path, (up, down, alpha) in loras.items():
        (name,) = export_names(path, hidden, "kohya")
        kohya.update({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": alpha})
        for name, (up_i, down_i, alpha_i) in split_lora(up, down, alpha, export_names(path, hidden, "peft")).items():
            peft[name.removeprefix("transformer.")] = (up_i * np.float32(alpha_i / rank), down_i)
    converted = _convert_kohya_flux_lora_to_diffusers(
        {k: torch.tensor(np.asarray(v, np.float32)) for k, v in kohya.items()}
    )
    theirs = {}
    for key, value in converted.items():
        name, factor = key.removeprefix("transformer.").rsplit(".lora_", 1)
        theirs.setdefault(name, {})[factor] = value.numpy()
    assert theirs.keys() == peft.keys()
    probe = np.random.default_rng(4).standard_normal((8 * hidden, 3)).astype(np.float32)
    for name, (up, down) in peft.items():
        x = probe[: down.shape[1]].astype(np.float64)
        ours_out = up.astype(np.float64) @ (down.astype(np.float64) @ x)
        their_b, their_a = (theirs[name][f].astype(np.float64) for f in ("B.weight", "A.weight"))
        np.testing.assert_allclose(their_b @ (their_a @ x), ours_out, rtol=1e-5, atol=1e-6, err_msg=name)
