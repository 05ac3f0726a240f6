"""The synthetic fixtures' tokenizer: a small but valid byte-level BPE vocabulary (GPT-2's byte map,
common English pieces, then letter words shortest first) and Qwen2.5's added tokens."""
from __future__ import annotations

import itertools
import string
from typing import Iterator

# Qwen2.5's added tokens, in id order. The first three are the ones llama.cpp's chat/eos logic uses.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)
# Common English pieces (plain text; spaces become "Ġ"), added before the systematic fill.
_COMMON = (
    " the", " a", " and", " of", " to", " in", " is", " that", " for", " it", " with", " as",
    " was", " on", " be", " at", " by", " this", " have", " from", " or", " an", " are", " not",
    " but", " we", " you", " they", " he", " she", " his", " her", " can", " will", " one",
    " all", " there", " their", " which", " what", " when", " were", " been", " has", " more",
    " The", " A", " In", " It", " This", " We", " I", " hello", " world", " quick", " brown",
    " fox", " jumps", " over", " lazy", " dog", "Hello", "The", "ing", "ed", "er", "es", "tion",
    "ly", "re", "on", "en", "al", "an", "ou", "th", "st", "ent", "ation", "  ", "    ", "\n\n",
    ".\n", ",", ".", "ment", "ness", "able", "ers", "est", "ity", "ous", "ive",
)


def bytes_to_unicode() -> list[tuple[int, str]]:
    """GPT-2's byte -> printable character map, as (byte, char) in GPT-2's vocab order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [(b, chr(c)) for b, c in zip(bs, cs)]


def _fill_words() -> Iterator[str]:
    """Unbounded stream of letter words (optionally space-prefixed), shortest first, so every
    word's prefix without its last character comes earlier in the stream (or is a byte)."""
    lower, upper = string.ascii_lowercase, string.ascii_uppercase
    for length in itertools.count(2):
        for lead in ("Ġ", ""):
            for first in lower + upper:
                for rest in itertools.product(lower, repeat=length - 1 - len(lead)):
                    yield lead + first + "".join(rest)


def build_vocab(n_regular: int) -> tuple[list[str], list[str]]:
    """``n_regular`` tokens (256 byte tokens then merged ones) and their merges.

    Every merged token ``s`` comes with the merge ``"{s[:-1]} {s[-1]}"`` whose parts are earlier
    tokens, so BPE can only ever produce tokens in the vocab."""
    enc = dict(bytes_to_unicode())
    tokens = [c for _, c in bytes_to_unicode()]
    if n_regular < len(tokens):
        raise ValueError(f"n_regular {n_regular} is smaller than the 256 byte tokens")
    seen, merges = set(tokens), []

    def add(word: str) -> None:
        for i in range(2, len(word) + 1):
            piece = word[:i]
            if piece not in seen and len(tokens) < n_regular:
                seen.add(piece)
                tokens.append(piece)
                merges.append(f"{piece[:-1]} {piece[-1]}")

    for text in _COMMON:
        add("".join(enc[b] for b in text.encode("utf-8")))
    words = _fill_words()
    while len(tokens) < n_regular:
        add(next(words))
    return tokens, merges
