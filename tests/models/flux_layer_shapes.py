"""A tiny Flux's linear layers in BFL layout (shapes only) with random weights and LoRAs, for the name and file
tests: numpy, no network needed."""

import numpy as np

H = 32


def flux_layers(hidden=H, double=2, single=2, guidance=True, channels=16, context=24, pooled=12, time_dim=8):
    """A Flux model's linear layers in BFL layout: {path: torch weight shape [out, in]} (mlp ratio 4)."""
    layers = {
        "img_in": (hidden, channels),
        "txt_in": (hidden, context),
        "time_in.in_layer": (hidden, time_dim),
        "time_in.out_layer": (hidden, hidden),
        "vector_in.in_layer": (hidden, pooled),
        "vector_in.out_layer": (hidden, hidden),
    }
    if guidance:
        layers.update({"guidance_in.in_layer": (hidden, time_dim), "guidance_in.out_layer": (hidden, hidden)})
    for i in range(double):
        for stream in ("img", "txt"):
            b = f"double_blocks.{i}.{stream}"
            layers.update({f"{b}_mod.lin": (6 * hidden, hidden), f"{b}_attn.qkv": (3 * hidden, hidden)})
            layers.update({f"{b}_attn.proj": (hidden, hidden), f"{b}_mlp.0": (4 * hidden, hidden)})
            layers[f"{b}_mlp.2"] = (hidden, 4 * hidden)
    for i in range(single):
        b = f"single_blocks.{i}"
        layers.update({f"{b}.linear1": (7 * hidden, hidden), f"{b}.linear2": (hidden, 5 * hidden)})
        layers[f"{b}.modulation.lin"] = (3 * hidden, hidden)
    layers.update({"final_layer.linear": (channels, hidden), "final_layer.adaLN_modulation.1": (2 * hidden, hidden)})
    return layers


def state_dict(layers, head_dim=8, seed=0):
    """Random weights and biases under `diffusion_model.`, plus the QK-norm scales ComfyUI's model also holds."""
    rng = np.random.default_rng(seed)
    sd = {}
    for path, shape in layers.items():
        sd[f"diffusion_model.{path}.weight"] = rng.standard_normal(shape).astype(np.float32)
        sd[f"diffusion_model.{path}.bias"] = rng.standard_normal(shape[0]).astype(np.float32)
    norms = [p.replace(".qkv", ".norm") for p in layers if p.endswith("_attn.qkv")]
    norms += [p.replace(".linear1", ".norm") for p in layers if p.endswith(".linear1")]
    for norm in norms:
        for which in ("query_norm", "key_norm"):
            sd[f"diffusion_model.{norm}.{which}.scale"] = np.ones(head_dim, np.float32)
    return sd


def random_loras(layers, rank=3, seed=1):
    """{path: (up [out, r], down [r, in], alpha)} with alpha != rank, so that the scale shows."""
    rng = np.random.default_rng(seed)
    return {
        path: (
            0.1 * rng.standard_normal((out, rank)).astype(np.float32),
            0.1 * rng.standard_normal((rank, fan_in)).astype(np.float32),
            float(rank + 1 + i % 3),
        )
        for i, (path, (out, fan_in)) in enumerate(layers.items())
    }


def assert_same_weights(patched, expected):
    assert patched.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(patched[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)


def expected_weights(sd, loras, bias_diffs):
    expected = dict(sd)
    for path, (up, down, alpha) in loras.items():
        expected[f"diffusion_model.{path}.weight"] = sd[f"diffusion_model.{path}.weight"] + alpha / down.shape[0] * (
            up @ down
        )
    for path, diff in bias_diffs.items():
        expected[f"diffusion_model.{path}.bias"] = sd[f"diffusion_model.{path}.bias"] + diff
    return expected
