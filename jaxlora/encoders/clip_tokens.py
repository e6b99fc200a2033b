"""Captions to CLIP token chunks exactly as ComfyUI's CLIPTextEncode lays them out.

The BPE itself is the `tokenizers` package's, built from the tokenizer files a user has: a Hugging Face
`tokenizer.json`, or the `vocab.json` + `merges.txt` pair ComfyUI ships in `comfy/sd1_tokenizer/` (both CLIP
towers share that vocabulary). On top of it, ComfyUI's rules (comfy/sd1_clip.py), written here because no library
has them:
- prompt weights: `(text)` multiplies by 1.1 per level, `(text:1.3)` sets the weight, `\\(` and `\\)` are literal;
- each word (split at spaces) is tokenized alone; a word already in the vocabulary as `word</w>` is that token;
- chunks of 77: start token, up to 75 tokens, end token, padding (the end token for CLIP-L, 0 for the OpenCLIP
  towers); a word of fewer than 8 tokens is never split across chunks, a longer one is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

CHUNK = 77
LONG_WORD = 8  # words of at least this many tokens may be split across chunks
START_TEXT, END_TEXT = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenization: contractions, letter runs, single digits, runs of other non-space characters.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_ESCAPES = (("\\)", "\0\1"), ("\\(", "\0\2"))


class TokenizerFilesError(FileNotFoundError):
    pass


def build_clip_bpe(folder: str | Path) -> Tokenizer:
    """CLIP's byte-level BPE from `tokenizer.json`, or from `vocab.json` + `merges.txt` (lower-cased, whitespace
    collapsed, words end in `</w>`); an error naming the files otherwise."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    if not (vocab_file.is_file() and merges_file.is_file()):
        raise TokenizerFilesError(
            f"{folder} has no CLIP tokenizer: it needs tokenizer.json, or vocab.json and merges.txt (ComfyUI ships "
            "them in comfy/sd1_tokenizer/; Hugging Face in openai/clip-vit-large-patch14)"
        )
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    lines = merges_file.read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    bpe = Tokenizer(BPE(vocab, merges, end_of_word_suffix="</w>", continuing_subword_prefix="", unk_token=END_TEXT))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    return bpe


def parse_weights(text: str, weight: float = 1.0) -> list[tuple[str, float]]:
    """(segment, weight) pairs of ComfyUI's prompt syntax: `(a)` is weight x1.1, `(a:1.5)` weight 1.5, nested
    groups compound; unbalanced brackets stay text. Escaped brackets must be masked first (`_mask`)."""
    pieces, depth, current = [], 0, ""
    for char in text:
        if char == "(" and depth == 0 and current:
            pieces.append(current)
            current = ""
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        current += char
        if char == ")" and depth == 0:
            pieces.append(current)
            current = ""
    if current:
        pieces.append(current)
    out = []
    for piece in pieces:
        if len(piece) < 2 or piece[0] != "(" or piece[-1] != ")":
            out.append((piece, weight))
            continue
        inner, inner_weight = piece[1:-1], weight * 1.1
        colon = inner.rfind(":")
        if colon > 0:
            try:
                inner, inner_weight = inner[:colon], float(inner[colon + 1 :])
            except ValueError:
                pass
        out.extend(parse_weights(inner, inner_weight))
    return out


def _mask(text: str) -> str:
    for escaped, mark in _ESCAPES:
        text = text.replace(escaped, mark)
    return text


def _unmask(text: str) -> str:
    for escaped, mark in _ESCAPES:
        text = text.replace(mark, escaped[1])
    return text


@dataclass(frozen=True)
class TokenChunks:
    """A caption as CLIP input: token ids [chunks, 77] and each token's prompt weight."""

    tokens: np.ndarray
    weights: np.ndarray


@dataclass(frozen=True)
class ClipTokenizer:
    """ComfyUI's SDTokenizer rules over a CLIP BPE; `pad_with_end` for CLIP-L, pad id 0 for the OpenCLIP towers."""

    bpe: Tokenizer
    pad_with_end: bool = True

    @property
    def start(self) -> int:
        return self.bpe.token_to_id(START_TEXT)

    @property
    def end(self) -> int:
        return self.bpe.token_to_id(END_TEXT)

    def word_tokens(self, word: str) -> list[int]:
        exact = self.bpe.token_to_id(f"{word}</w>")
        if exact is not None:
            return [exact]
        return self.bpe.encode(word, add_special_tokens=False).ids

    def empty(self) -> np.ndarray:
        """The empty caption's chunk (ComfyUI's reference for prompt weights)."""
        return self.chunks("").tokens[0]

    def chunks(self, caption: str) -> TokenChunks:
        pad = self.end if self.pad_with_end else 0
        words = [
            (self.word_tokens(word), weight)
            for segment, weight in parse_weights(_mask(caption))
            for word in _unmask(segment).replace("\n", " ").split(" ")
            if word
        ]
        rows: list[list[tuple[int, float]]] = [[(self.start, 1.0)]]
        for ids, weight in words:
            group = [(token, weight) for token in ids]
            while group:
                row = rows[-1]
                room = CHUNK - 1 - len(row)
                if len(group) <= room:
                    row.extend(group)
                    break
                if len(ids) >= LONG_WORD:  # split a long word: fill this chunk, carry the rest
                    row.extend(group[:room])
                    group = group[room:]
                row.append((self.end, 1.0))
                row.extend([(pad, 1.0)] * (CHUNK - len(row)))
                rows.append([(self.start, 1.0)])
        rows[-1].append((self.end, 1.0))
        rows[-1].extend([(pad, 1.0)] * (CHUNK - len(rows[-1])))
        tokens = np.array([[token for token, _ in row] for row in rows], np.int32)
        weights = np.array([[weight for _, weight in row] for row in rows], np.float32)
        return TokenChunks(tokens, weights)


HUB_REPO = "openai/clip-vit-large-patch14"  # CLIP's tokenizer files; SD2.x's and SDXL's towers use the same
HUB_FILES = ("vocab.json", "merges.txt")


def clip_tokenizer_folder(given: str | Path | None) -> Path:
    """The folder of CLIP tokenizer files: `given`, or the Hugging Face hub's copy of CLIP's (downloaded once with
    `huggingface_hub` and cached; found in the cache offline)."""
    if given is not None:
        return Path(given)
    try:
        from huggingface_hub import hf_hub_download

        paths = [Path(hf_hub_download(HUB_REPO, name)) for name in HUB_FILES]
    except Exception as error:  # not installed, offline with an empty cache, hub refused: all end the same way
        raise TokenizerFilesError(
            f"no CLIP tokenizer files ({error.__class__.__name__}: {error}): pass --tokenizers DIR, a folder with "
            f"vocab.json and merges.txt (ComfyUI's comfy/sd1_tokenizer/, or {HUB_REPO} on Hugging Face), or go "
            "online once so they can be fetched and cached"
        ) from error
    return paths[0].parent
