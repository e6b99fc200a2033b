"""Captions to token rows exactly as ComfyUI's CLIPTextEncode lays them out, for CLIP and T5 encoders.

The tokenization itself is the `tokenizers` package's, built from the tokenizer files a user has: a Hugging Face
`tokenizer.json` (CLIP's, or T5's that ComfyUI ships in `comfy/text_encoders/t5_tokenizer/`), or the
`vocab.json` + `merges.txt` pair ComfyUI ships in `comfy/sd1_tokenizer/` (all CLIP towers share that
vocabulary). On top of it, ComfyUI's rules (comfy/sd1_clip.py `SDTokenizer`), written here because no library
has them:
- prompt weights: `(text)` multiplies by 1.1 per level, `(text:1.3)` sets the weight, `\\(` and `\\)` are literal;
- each word (split at spaces) is tokenized alone; a word already in the vocabulary as `word</w>` is that token;
- CLIP: rows of 77: start token, up to 75 tokens, end token, padding (the end token for CLIP-L, 0 for the
  OpenCLIP towers); a word of fewer than 8 tokens is never split across rows, a longer one is;
- T5: one row, no start token: the tokens, the end token, padding with 0 up to a minimum length (the
  family's `TextTower.min_length`).
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
class PromptTokenizer:
    """ComfyUI's SDTokenizer rules over a `tokenizers` tokenizer: `start` None for encoders without a start token
    (T5), `row` the row length (None: one row of any length), `min_length` the padded length of the last row."""

    bpe: Tokenizer
    start: int | None
    end: int
    pad: int
    row: int | None = CHUNK
    min_length: int = 0

    def word_tokens(self, word: str) -> list[int]:
        exact = self.bpe.token_to_id(f"{word}</w>")
        if exact is not None:
            return [exact]
        return self.bpe.encode(word, add_special_tokens=False).ids

    def empty(self, length: int | None = None) -> np.ndarray:
        """The empty caption's row of `length` tokens (default: a padded row), ComfyUI's reference for prompt
        weights: start and end tokens, then padding."""
        ids = [token for token, _ in self._new_row()] + [self.end]
        length = length or max(self.row or 0, self.min_length, len(ids))
        return np.array(ids + [self.pad] * (length - len(ids)), np.int32)

    def _new_row(self) -> list[tuple[int, float]]:
        return [] if self.start is None else [(self.start, 1.0)]

    def _close(self, row: list[tuple[int, float]]) -> None:
        row.append((self.end, 1.0))
        row.extend([(self.pad, 1.0)] * (max(self.row or 0, self.min_length) - len(row)))

    def chunks(self, caption: str) -> TokenChunks:
        words = [
            (self.word_tokens(word), weight)
            for segment, weight in parse_weights(_mask(caption))
            for word in _unmask(segment).replace("\n", " ").split(" ")
            if word
        ]
        rows = [self._new_row()]
        for ids, weight in words:
            group = [(token, weight) for token in ids]
            while group:
                row = rows[-1]
                room = len(group) if self.row is None else self.row - 1 - len(row)
                if len(group) <= room:
                    row.extend(group)
                    break
                if len(ids) >= LONG_WORD:  # split a long word: fill this row, carry the rest
                    row.extend(group[:room])
                    group = group[room:]
                self._close(row)
                rows.append(self._new_row())
        self._close(rows[-1])
        tokens = np.array([[token for token, _ in row] for row in rows], np.int32)
        weights = np.array([[weight for _, weight in row] for row in rows], np.float32)
        return TokenChunks(tokens, weights)


def clip_tokenizer(bpe: Tokenizer, pad_with_end: bool = True) -> PromptTokenizer:
    """CLIP rows of 77; padded with the end token (CLIP-L) or 0 (the OpenCLIP towers)."""
    start, end = bpe.token_to_id(START_TEXT), bpe.token_to_id(END_TEXT)
    return PromptTokenizer(bpe, start, end, end if pad_with_end else 0)


def t5_tokenizer(bpe: Tokenizer, min_length: int) -> PromptTokenizer:
    """T5: one row, `</s>` at the end, padded with `<pad>` (0) to `min_length`."""
    return PromptTokenizer(bpe, None, bpe.token_to_id("</s>"), bpe.token_to_id("<pad>"), None, min_length)


# Where the tokenizer files of each kind are found inside a `--tokenizers` folder (ComfyUI's `comfy/` folder works as
# it is), and the Hugging Face repositories they are fetched from once when no folder is given.
SUBFOLDERS = {"clip": ("", "sd1_tokenizer", "clip"), "t5": ("", "t5_tokenizer", "text_encoders/t5_tokenizer", "t5")}
MODEL_TYPE = {"clip": "BPE", "t5": "Unigram"}  # the `model.type` of each kind's tokenizer.json
HUB_FILES = {
    "clip": ("openai/clip-vit-large-patch14", ("vocab.json", "merges.txt")),
    "t5": ("google-t5/t5-base", ("tokenizer.json",)),  # the same SentencePiece vocabulary as T5 v1.1
}


def _from_folder(kind: str, folder: Path) -> Tokenizer | None:
    """The kind's tokenizer if `folder` holds its files, else None."""
    single = folder / "tokenizer.json"
    if single.is_file() and json.loads(single.read_text(encoding="utf-8"))["model"]["type"] == MODEL_TYPE[kind]:
        return Tokenizer.from_file(str(single))
    if kind == "clip" and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return build_clip_bpe(folder)
    return None


def find_tokenizer(kind: str, given: str | Path | None) -> Tokenizer:
    """The "clip" or "t5" tokenizer: from the folder `given` (or its usual sub-folders), or fetched once from the
    Hugging Face hub with `huggingface_hub` and cached (found in the cache offline)."""
    if given is not None:
        for sub in SUBFOLDERS[kind]:
            if (found := _from_folder(kind, Path(given) / sub)) is not None:
                return found
        raise TokenizerFilesError(
            f"{given} has no {kind.upper()} tokenizer files (looked in {', '.join(repr(s) for s in SUBFOLDERS[kind])}"
            f"): give a folder with {' and '.join(Path(f).name for f in HUB_FILES[kind][1])} (ComfyUI's comfy/ "
            f"folder holds them)"
        )
    repo, names = HUB_FILES[kind]
    try:
        from huggingface_hub import hf_hub_download

        paths = [Path(hf_hub_download(repo, name)) for name in names]
    except Exception as error:  # not installed, offline with an empty cache, hub refused: all end the same way
        raise TokenizerFilesError(
            f"no {kind.upper()} tokenizer files ({error.__class__.__name__}: {error}): pass --tokenizers DIR (a "
            f"folder with {' and '.join(Path(f).name for f in names)}, e.g. ComfyUI's comfy/ folder, or {repo} on "
            "Hugging Face), or go online once so they can be fetched and cached"
        ) from error
    return _from_folder(kind, paths[0].parent)
