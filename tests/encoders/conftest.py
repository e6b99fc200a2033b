"""A small CLIP-style tokenizer folder shared by the encoder tests."""

import json

import pytest
from tokenizers import Tokenizer, pre_tokenizers, processors
from tokenizers.models import Unigram

MERGES = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("r", "e"), ("re", "d</w>"), ("a", "n</w>")]


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    return write_clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))


def write_clip_tokenizer(folder):
    """A small CLIP-style vocabulary: the 256 byte symbols alone and word-final, a few merges, the specials last."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = (
        symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in MERGES] + ["<|startoftext|>", "<|endoftext|>"]
    )
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in MERGES) + "\n")
    return folder


T5_PIECES = ["<pad>", "</s>", "<unk>", "▁a", "▁red", "▁cat", "▁dog", "▁", "a", "c", "d", "e", "g", "o", "r", "t"]


@pytest.fixture(scope="module")
def t5_tokenizer_folder(tmp_path_factory):
    return write_t5_tokenizer(tmp_path_factory.mktemp("comfy"))


def write_t5_tokenizer(parent):
    """A small SentencePiece-style (Unigram) tokenizer.json as T5's: `</s>` appended, `<pad>` id 0, in a
    `t5_tokenizer` sub-folder of `parent` as ComfyUI keeps it; returns `parent`."""
    folder = parent / "t5_tokenizer"
    folder.mkdir(parents=True)
    tokenizer = Tokenizer(Unigram([(piece, -float(i)) for i, piece in enumerate(T5_PIECES)], unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer.save(str(folder / "tokenizer.json"))
    return parent
