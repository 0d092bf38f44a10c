"""Rule filters: normalisation, empty and over-long texts, exact duplicates, test-set copies.

Pure functions: the chain runner applies :func:`row_filter_reason` to every text a stage
writes, and :func:`raydag.stages.deduplicate` finds exact copies across shards with
:func:`text_key` and :func:`later_copies`. A filtered row is dropped with its reason, never lost.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import pandas as pd

_EDGE_PUNCT = " \t\n\"'“”‘’`.,;:!?-"
WORD = re.compile(r"\w+")  # punctuation separates words and is dropped: "parcel?" = "parcel"
# In ASCII text \w is [A-Za-z0-9_]: the other bytes of ASCII text become spaces, then split.
_ASCII_NON_WORD = bytes(c if c < 128 and (chr(c).isalnum() or chr(c) == "_") else 32
                        for c in range(256))


def normalize_text(text: str) -> str:
    """Unicode-normalise, lowercase, collapse whitespace and trim edge punctuation."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    # str.split() splits at the characters \s matches (str.isspace), as re.sub(r"\s+", " ")
    # would, 5x faster; the whitespace at the ends goes either way with the edge punctuation
    return " ".join(text.split()).strip(_EDGE_PUNCT)


def word_bytes(text: str) -> list[bytes]:
    """The words (runs of ``\\w``) of the normalised text, UTF-8 encoded: what near-duplicate
    shingles and decontamination grams are made of. ASCII text is split by a byte translation,
    which finds the words of ``WORD.findall`` 3x faster.

    Example:
        >>> word_bytes("Where's my parcel?!")
        [b'where', b's', b'my', b'parcel']
    """
    text = normalize_text(text or "")
    if text.isascii():
        return text.encode().translate(_ASCII_NON_WORD).split()
    return [word.encode() for word in WORD.findall(text)]


def row_filter_reason(text: str, *, raw_norms: frozenset[str], test_norms: frozenset[str],
                      min_chars: int, max_chars: int) -> str | None:
    """Why a generated text is dropped (``too_short``, ``too_long``, ``test_copy``,
    ``raw_duplicate``; first match wins), or None when it passes."""
    norm = normalize_text(text or "")
    if len(norm) < max(min_chars, 1):
        return "too_short"
    if len(str(text)) > max_chars:
        return "too_long"
    if norm in test_norms:
        return "test_copy"
    if norm in raw_norms:
        return "raw_duplicate"
    return None


def text_key(text: str) -> str:
    """A short hash of the normalised text: rows with equal keys are exact duplicates."""
    return hashlib.blake2b(normalize_text(text or "").encode(), digest_size=8).hexdigest()


def later_copies(keys: pd.DataFrame) -> frozenset[int]:
    """The ``_order`` of every row whose ``_key`` an earlier row (smaller ``_order``) has."""
    ordered = keys.sort_values("_order", kind="stable")
    return frozenset(int(o) for o in ordered.loc[ordered["_key"].duplicated(), "_order"])
