"""The model-family interface: every registered family recognises its own files, infers its config back from
shapes, names its layers for adapter files and refuses settings that do not apply to it; nothing outside the
families' own files names a family."""

import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxlora.models.checkpoint import torch_parameters
from jaxlora.models.demo import write_random_checkpoint
from jaxlora.models.diffusion import abstract_model, load_model
from jaxlora.models.family import STYLES, UnknownLayoutError
from jaxlora.models.registry import FAMILIES, PREFIXES, find_family, find_variant
from jaxlora.models.stack import layer_sites

PACKAGE = Path(__file__).resolve().parents[2] / "jaxlora"
FAMILY_FILES = {"registry.py"} | {
    f"{stem}{suffix}"
    for stem in ("unet", "flux", "flux2", "nextdit", "chroma", "qwen_image")
    for suffix in (".py", "_family.py", "_names.py")
}
FAMILY_FILES |= {f"wan{suffix}" for suffix in (".py", "_family.py", "_names.py")}


def demo_shapes(family):
    return {key: site.torch_shape(name) for key, site, name in torch_parameters(family.build(family.demo_config))}


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_a_family_infers_its_demo_config_back_from_the_shapes(family):
    config, variant = family.infer_config(demo_shapes(family))
    assert config == family.demo_config
    assert variant == family.variant_of(config) and variant in family.variants


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_files_are_recognised_by_their_markers_under_every_prefix(family, prefix):
    keys = [prefix + key for key in demo_shapes(family)]
    assert find_family(keys) == (family, prefix)


def test_a_dataset_passed_as_the_model_is_named_as_such(tmp_path):
    path = tmp_path / "data.safetensors"
    save_file({"latents": np.zeros((1, 4, 8, 8), np.float32), "c_crossattn": np.zeros((1, 2, 8), np.float32)}, path)
    with pytest.raises(UnknownLayoutError, match="a training dataset"):
        load_model(path, weights=False)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_adaptable_layer_has_a_comfyui_name_that_imports_back(family):
    model = abstract_model(family.demo_config)
    names = model.adapter_names
    paths = [site.path for site in layer_sites(model.network) if site.layer.adaptable]
    assert set(names.exports) == set(STYLES)
    for path in paths:
        ((name, target),) = names.exports["comfyui"][path].items()
        assert name == f"diffusion_model.{path}" and target.whole and names.aliases[name] == target


def test_variant_names_are_unique_and_found():
    variants = [variant for family in FAMILIES for variant in family.variants]
    assert len({v.name for v in variants}) == len(variants)
    for family in FAMILIES:
        for variant in family.variants:
            assert find_variant(variant.name) == (family, variant)
    with pytest.raises(ValueError, match="unknown model variant 'sd9'"):
        find_variant("sd9")


def test_settings_that_do_not_apply_to_a_family_are_refused_by_name():
    by_sampling = {abstract_model(f.demo_config).sampling.prediction: abstract_model(f.demo_config) for f in FAMILIES}
    eps, flow = by_sampling["eps"], by_sampling["const"]
    assert eps.run_sampling("v").prediction == "v"
    with pytest.raises(ValueError, match="flow_shift applies to flow models"):
        eps.run_sampling("auto", 3.0)
    with pytest.raises(ValueError, match="predicts a flow; prediction 'v' does not apply"):
        flow.run_sampling("v")
    assert flow.run_sampling("auto", 0.5).percent_to_sigma(0.5) != flow.sampling.percent_to_sigma(0.5)


def test_loaded_models_report_the_family_and_variant(tmp_path):
    for family in FAMILIES:
        path = write_random_checkpoint(family.demo_config, tmp_path / f"{family.name}.safetensors")
        model = load_model(path, weights=False)
        assert model.family is family and model.variant == family.variant_of(family.demo_config)


def test_no_family_is_named_outside_the_families_own_files():
    """The acceptance rule of the family interface: generic code asks the registry, so a new family is its own
    files and one registry line."""
    names = {v.name for f in FAMILIES for v in f.variants} | {f.name for f in FAMILIES}
    names |= {"flux", "unet", "sdxl", "schnell", "stable diffusion"}
    pattern = re.compile(r"\b(" + "|".join(re.escape(n) for n in sorted(names)) + r")\b", re.IGNORECASE)
    found = [
        f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name not in FAMILY_FILES
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == []
