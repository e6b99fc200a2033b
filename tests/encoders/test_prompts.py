"""Caption tokenization: the BPE against transformers' CLIPTokenizer on the same files, ComfyUI's chunking and
prompt-weight rules against hand-worked cases."""

import numpy as np
import pytest
import transformers

from jaxlora.encoders.prompts import (
    CHUNK,
    TokenizerFilesError,
    build_clip_bpe,
    clip_tokenizer,
    find_tokenizer,
    parse_weights,
)


def test_bpe_matches_transformers(tokenizer_folder):
    ours = build_clip_bpe(tokenizer_folder)
    theirs = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_folder))  # as ComfyUI loads its folder
    for text in ["cat", "A Red  DOG", "cats, dogs & 42 an-cat!", "café ☕ naïve", "it's\tred\n"]:
        assert ours.encode(text, add_special_tokens=False).ids == theirs(text)["input_ids"][1:-1], text


def test_folder_without_tokenizer_files_names_them(tmp_path):
    with pytest.raises(TokenizerFilesError, match="vocab.json and merges.txt"):
        build_clip_bpe(tmp_path)


def test_short_caption_is_one_padded_chunk(tokenizer_folder):
    bpe = build_clip_bpe(tokenizer_folder)
    start, end, cat, dog = (bpe.token_to_id(t) for t in ("<|startoftext|>", "<|endoftext|>", "cat</w>", "dog</w>"))
    chunks = clip_tokenizer(bpe, pad_with_end=True).chunks("cat dog")
    assert chunks.tokens.tolist() == [[start, cat, dog, end] + [end] * (CHUNK - 4)]
    assert clip_tokenizer(bpe, pad_with_end=False).chunks("cat dog").tokens.tolist() == [
        [start, cat, dog, end] + [0] * (CHUNK - 4)
    ]
    np.testing.assert_array_equal(chunks.weights, 1.0)


def test_long_captions_chunk_at_word_boundaries(tokenizer_folder):
    bpe = build_clip_bpe(tokenizer_folder)
    start, end, cat = (bpe.token_to_id(t) for t in ("<|startoftext|>", "<|endoftext|>", "cat</w>"))
    tokenizer = clip_tokenizer(bpe)
    # 74 one-token words, then a 3-token word ("xyz": no merges) that does not fit the 75th slot: it moves whole.
    chunks = tokenizer.chunks("cat " * 74 + "xyz")
    xyz = bpe.encode("xyz", add_special_tokens=False).ids
    assert len(xyz) == 3
    assert chunks.tokens.tolist() == [
        [start] + [cat] * 74 + [end, end],
        [start] + xyz + [end] + [end] * (CHUNK - 5),
    ]
    # A word of 10 tokens (>= 8) is split: it fills the first chunk and continues in the next.
    long_word = "qwertyuiop"
    pieces = bpe.encode(long_word, add_special_tokens=False).ids
    assert len(pieces) == 10
    chunks = tokenizer.chunks("cat " * 70 + long_word)
    assert chunks.tokens[0].tolist() == [start] + [cat] * 70 + pieces[:5] + [end]
    assert chunks.tokens[1, :7].tolist() == [start] + pieces[5:] + [end]


def test_prompt_weights_follow_comfyui_syntax(tokenizer_folder):
    assert parse_weights("a (b:1.5) ((c)) (d:x) e)") == [
        ("a ", 1.0),
        ("b", 1.5),
        (" ", 1.0),
        ("c", pytest.approx(1.21)),
        (" ", 1.0),
        ("d:x", pytest.approx(1.1)),
        (" e)", 1.0),
    ]
    bpe = build_clip_bpe(tokenizer_folder)
    chunks = clip_tokenizer(bpe).chunks("red (cat:1.3) \\(dog\\)")
    expected = [bpe.token_to_id("red</w>"), bpe.token_to_id("cat</w>")] + bpe.encode(
        "(dog)", add_special_tokens=False
    ).ids
    assert chunks.tokens[0, 1 : 1 + len(expected)].tolist() == expected
    assert chunks.weights[0, : 3 + len(expected) - 2].tolist() == pytest.approx(
        [1.0, 1.0, 1.3] + [1.0] * (len(expected) - 2)
    )


def test_tokenizers_in_a_comfyui_style_folder_are_found(tokenizer_folder, t5_tokenizer_folder, tmp_path):
    """`--tokenizers` may be ComfyUI's comfy/ folder: CLIP files in sd1_tokenizer/, T5's in t5_tokenizer/."""
    comfy = tmp_path / "comfy"
    (comfy / "sd1_tokenizer").mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        (comfy / "sd1_tokenizer" / name).write_bytes((tokenizer_folder / name).read_bytes())
    (comfy / "t5_tokenizer").mkdir()
    (comfy / "t5_tokenizer" / "tokenizer.json").write_bytes(
        (t5_tokenizer_folder / "t5_tokenizer" / "tokenizer.json").read_bytes()
    )
    assert find_tokenizer("clip", comfy).token_to_id("cat</w>") == build_clip_bpe(tokenizer_folder).token_to_id(
        "cat</w>"
    )
    assert find_tokenizer("t5", comfy).token_to_id("</s>") == 1
    with pytest.raises(TokenizerFilesError, match="no T5 tokenizer files"):
        find_tokenizer("t5", tokenizer_folder)  # CLIP's files only: a BPE tokenizer is not taken for T5


def test_offline_without_tokenizer_files_says_which_to_get(monkeypatch):
    """What the hub client raises offline with an empty cache becomes a message naming the files to get."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo, name, **kwargs):
        raise LocalEntryNotFoundError(f"{repo}/{name} is not cached and the hub cannot be reached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(TokenizerFilesError, match="--tokenizers DIR .*vocab.json and merges.txt"):
        find_tokenizer("clip", None)
