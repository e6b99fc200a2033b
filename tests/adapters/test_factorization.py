"""`factorization(dim, factor)`, which shapes LoKr's Kronecker factors and OFT's blocks: the spec's examples
(section 4.1) and lycoris's own function.

ComfyUI's copy adds one guard to lycoris's: the `(factor, dim / factor)` shortcut is taken only when
`dim >= factor**2`. Without it, a factor larger than its cofactor gives a lopsided split (lycoris 4.1.3:
`factorization(16, 8) == (2, 8)`); with it, the search runs and finds the most even split (ComfyUI: `(4, 4)`).
jaxlora follows ComfyUI, so the comparison with lycoris is exact everywhere except in that region, where the
result must instead be lycoris's split with no factor limit.
"""

from __future__ import annotations

import pytest
from lycoris.functional import factorization as lycoris_factorization

from jaxlora.adapters.base import factorization

DIMS = sorted(
    {*range(1, 257), 320, 360, 384, 512, 640, 768, 960, 1024, 1280, 1920, 2048, 2560, 2816, 3072, 5120, 10240}
    | {127, 251, 1021, 4099}  # primes
)
FACTORS = [-1, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 32, 64, 100]


def in_comfyui_guard_region(dim: int, factor: int) -> bool:
    """Where ComfyUI's `dim >= factor**2` guard makes it skip the shortcut that lycoris takes."""
    return factor > 0 and dim % factor == 0 and dim < factor * factor


@pytest.mark.parametrize(
    "dim, expected",
    [(320, (8, 40)), (640, (8, 80)), (1280, (8, 160)), (3072, (8, 384)), (4, (2, 2))]
    + [(p, (1, p)) for p in (2, 3, 7, 11, 127, 1021)],
)
def test_factorization_at_rank_8_gives_the_spec_examples(dim, expected):
    assert factorization(dim, 8) == expected


@pytest.mark.parametrize("dim, factor, expected", [(16, 8, (4, 4)), (8, 8, (2, 4)), (64, 64, (8, 8)), (48, 16, (6, 8))])
def test_factorization_skips_the_factor_shortcut_when_the_factor_exceeds_its_cofactor(dim, factor, expected):
    # ComfyUI's guard (spec 4.1): e.g. OFT at rank 8 on a 16-channel layer gets 4 blocks of 4, not 2 of 8.
    assert factorization(dim, factor) == expected


def test_factorization_matches_lycoris_outside_comfyui_guard():
    pairs = [(dim, factor) for dim in DIMS for factor in FACTORS if not in_comfyui_guard_region(dim, factor)]
    mismatches = [
        (dim, factor, factorization(dim, factor), lycoris_factorization(dim, factor))
        for dim, factor in pairs
        if factorization(dim, factor) != lycoris_factorization(dim, factor)
    ]
    assert len(pairs) > 3000
    assert not mismatches, f"(dim, factor, ours, lycoris): {mismatches[:10]}"


def test_factorization_in_comfyui_guard_region_is_lycoris_most_even_split():
    pairs = [(dim, factor) for dim in DIMS for factor in FACTORS if in_comfyui_guard_region(dim, factor)]
    mismatches = [
        (dim, factor, factorization(dim, factor), lycoris_factorization(dim, -1))
        for dim, factor in pairs
        if factorization(dim, factor) != lycoris_factorization(dim, -1)
    ]
    assert len(pairs) > 50
    assert not mismatches, f"(dim, factor, ours, lycoris with factor -1): {mismatches[:10]}"
