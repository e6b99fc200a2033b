"""A small CLIP-style tokenizer folder shared by the encoder tests."""

import json

import pytest
from tokenizers import pre_tokenizers

MERGES = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("r", "e"), ("re", "d</w>"), ("a", "n</w>")]


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    """A small CLIP-style vocabulary: the 256 byte symbols alone and word-final, a few merges, the specials last."""
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = (
        symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in MERGES] + ["<|startoftext|>", "<|endoftext|>"]
    )
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in MERGES) + "\n")
    return folder
