"""LoHa, LoKr and OFT weight math against the independent `lycoris` package (lycoris-lora), on the same factors.

The factors are given to both sides in torch layout; jaxlora patches a weight stored in its Flax layout
([in, out] for linear, HWIO for conv) and the result is permuted back to torch layout for the comparison, so
these tests also pin how a conv kernel is folded into `d_in` and where the output channels sit.

Conventions (ComfyUI's, which jaxlora follows, versus lycoris's functional API):
* LoHa: ComfyUI's `hada_w{i}_a` [out, r] / `hada_w{i}_b` [r, d_in] are lycoris's `w{i}u` / `w{i}d`, and
  ComfyUI's `alpha / rank` is lycoris's `gamma`.
* LoKr with directly stored `lokr_w1` / `lokr_w2`: both sides compute `kron(w1, w2)` with no scaling (lycoris's
  `rank_scale` is `gamma / gamma` when no factor is decomposed).
* OFT: lycoris's `diag_oft` is the same algorithm: Q = B - B^T, the norm constraint applied to all blocks
  jointly when positive, R = (I + Q)(I - Q)^-1, and `einsum("k n m, k n ... -> k m ...", R - I, W)`, i.e.
  W'_k = R_k^T W_k on output-channel blocks. lycoris returns the difference, so the rotated weight is
  `W + diff_weight(W, ...)`. (ComfyUI's trainer also applies a *negative* alpha as a constraint, lycoris and
  ComfyUI's loader do not; only non-negative constraints are compared here.)

Tolerance: fp32 on both sides, `atol = 1e-5 * max|reference|` (the reference's own scale), rtol 0.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from lycoris.functional import diag_oft as lycoris_oft
from lycoris.functional import loha as lycoris_loha
from lycoris.functional import lokr as lycoris_lokr

from jaxlora.adapters.base import Target
from jaxlora.adapters.loha import LoHa
from jaxlora.adapters.lokr import LoKr
from jaxlora.adapters.oft import OFT
from jaxlora.models.layers import Conv2d, Linear

RELATIVE_ATOL = 1e-5

# torch shapes chosen with out != in and non-square factors, so a swapped axis cannot go unnoticed.
LINEAR = Target((48, 40), Linear.torch_to_flax)
CONV = Target((32, 12, 3, 3), Conv2d.torch_to_flax)
TARGETS = pytest.mark.parametrize("target", [LINEAR, CONV], ids=["linear", "conv3x3"])


def to_flax(target: Target, torch_weight: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(np.transpose(torch_weight, target.torch_to_flax))


def to_torch_layout(target: Target, flax_weight) -> np.ndarray:
    return np.transpose(np.asarray(flax_weight), np.argsort(target.torch_to_flax))


def patched_in_torch_layout(adapter, target: Target, torch_weight: np.ndarray) -> np.ndarray:
    """jaxlora's patch applied to the weight in its Flax layout, read back in torch layout."""
    return to_torch_layout(target, adapter.patch(to_flax(target, torch_weight)))


def assert_close_to_reference(actual: np.ndarray, reference: np.ndarray) -> None:
    assert actual.shape == reference.shape
    np.testing.assert_allclose(actual, reference, rtol=0, atol=RELATIVE_ATOL * np.abs(reference).max())


def normal(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


@TARGETS
@pytest.mark.parametrize("rank, alpha", [(4, 3.0), (1, 1.0)])
def test_loha_delta_matches_lycoris_hadamard_of_two_low_rank_products(target, rank, alpha):
    rng = np.random.default_rng(0)
    out, in_channels, *kernel = target.torch_shape
    w1a, w2a = normal(rng, out, rank), normal(rng, out, rank)
    # jaxlora takes the b factors flattened to [r, in * kh * kw]; lycoris takes them with the kernel axes and
    # flattens them itself, so a mismatch in the fold order shows.
    w1b, w2b = normal(rng, rank, in_channels, *kernel), normal(rng, rank, in_channels, *kernel)
    weight = normal(rng, *target.torch_shape)

    adapter = LoHa(target, w1a, w1b.reshape(rank, -1), w2a, w2b.reshape(rank, -1), alpha=alpha, lora_dtype=jnp.float32)
    ours = patched_in_torch_layout(adapter, target, weight) - weight
    reference = lycoris_loha.diff_weight(
        *map(torch.from_numpy, (w1b, w1a, w2b, w2a)), None, None, gamma=alpha / rank, backend="torch"
    ).numpy()

    assert_close_to_reference(ours, reference)


@TARGETS
def test_lokr_delta_matches_lycoris_kronecker_product_without_scaling(target):
    rng = np.random.default_rng(1)
    out, in_channels, *kernel = target.torch_shape
    # [out_l, in_m] x [out_k, in_n, k...] with out_l != in_m, and the kernel kept on w2 (ComfyUI's new layout).
    (out_l, out_k), (in_m, in_n) = {48: (4, 12), 32: (8, 4)}[out], {40: (5, 8), 12: (3, 4)}[in_channels]
    w1, w2 = normal(rng, out_l, in_m), normal(rng, out_k, in_n, *kernel)
    weight = normal(rng, *target.torch_shape)

    adapter = LoKr(target, w1, w2, lora_dtype=jnp.float32)
    ours = patched_in_torch_layout(adapter, target, weight) - weight
    reference = lycoris_lokr.diff_weight(
        torch.from_numpy(w1), None, None, torch.from_numpy(w2), None, None, None, gamma=1.0, backend="torch"
    ).numpy()

    assert_close_to_reference(ours, reference)


@TARGETS
@pytest.mark.parametrize(
    "block_scale, constraint, norm_exceeds_constraint",
    [(0.3, 0.5, True), (0.3, 0.0, None), (0.05, 100.0, False)],
    ids=["joint-norm-constraint-active", "unconstrained", "constraint-inactive"],
)
def test_oft_rotated_weight_matches_lycoris_diag_oft(target, block_scale, constraint, norm_exceeds_constraint):
    rng = np.random.default_rng(2)
    out = target.out_features
    block_size = {48: 8, 32: 4}[out]  # block_num != block_size: 6 blocks of 8, 8 blocks of 4
    blocks = normal(rng, out // block_size, block_size, block_size, scale=block_scale)
    if norm_exceeds_constraint is not None:
        # The constraint acts on the norm of all blocks together: check the case is the one named.
        assert (np.linalg.norm(blocks - np.swapaxes(blocks, 1, 2)) > constraint) == norm_exceeds_constraint
    weight = normal(rng, *target.torch_shape)

    adapter = OFT(target, blocks, alpha=constraint, lora_dtype=jnp.float32)
    ours = patched_in_torch_layout(adapter, target, weight)
    torch_weight = torch.from_numpy(weight)
    reference = (
        torch_weight
        + lycoris_oft.diff_weight(torch_weight, torch.from_numpy(blocks), None, constraint=constraint, backend="torch")
    ).numpy()

    assert np.abs(ours - weight).max() > 1e-2  # the rotation is far from the identity
    assert_close_to_reference(ours, reference)
