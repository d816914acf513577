"""A-SINQ calibration text -> token samples (docs/format.md §1.5).

Two sources:

* the reference's built-in set (default): its five prompts (``calibration_prompts.py``),
  each encoded with the tokenizer's special tokens, prompts over 512 tokens skipped, the
  rest concatenated and cut into blocks of 128 tokens (the remainder dropped), at most 128
  blocks: ``get_simple_calibration_data`` + ``collect_activations_blockwise(num_samples=128)``,
  so the same tokenizer gives the same token blocks as the reference;
* ``--calib-data FILE``: UTF-8 plain text (one document) or ``.jsonl`` (one document per
  line: a JSON string or an object with a ``"text"`` field). Documents are encoded in order
  with the tokenizer's special tokens and concatenated; the first ``samples`` windows of
  ``seqlen`` tokens are the samples.

The file is checked (present, non-empty, decodable) and tokenized before any weight is
read, so a bad file fails at once with one error naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SinqConfigError
from ..log import get_logger
from .calibration_prompts import PROMPTS

logger = get_logger(__name__)

BUILTIN_SEQLEN = 128  # the reference's block_size
BUILTIN_SAMPLES = 128  # collect_activations_blockwise(num_samples=128)
_BUILTIN_MAX_PROMPT = 512  # the reference skips longer prompts
_CHARS_PER_TOKEN = 8  # first guess of how much text a plain-text file needs; doubled until enough


@dataclass(frozen=True)
class CalibrationSet:
    samples: list[torch.Tensor]  # [1, seqlen] int64 token ids each
    source: str  # for logs and the summary

    def describe(self) -> str:
        return f"{self.source}: {len(self.samples)} samples x {self.samples[0].shape[1]} tokens"


def check_options(data: str | None, samples: int | None, seqlen: int | None) -> None:
    """``--calib-samples`` / ``--calib-seqlen`` must be positive integers; the file must exist."""
    for flag, value in (("--calib-samples", samples), ("--calib-seqlen", seqlen)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise SinqConfigError(f"{flag}={value!r} must be a positive integer")
    if data is not None:
        path = Path(data)
        if not path.is_file():
            raise SinqConfigError(f"--calib-data {str(path)!r}: no such file")


def calibration_set(tokenizer, data: str | None = None, samples: int | None = None,
                    seqlen: int | None = None) -> CalibrationSet:
    """The token samples of the built-in set (``data`` None) or of a text/jsonl file."""
    check_options(data, samples, seqlen)
    if data is None:
        return _builtin(tokenizer, samples or BUILTIN_SAMPLES, seqlen or BUILTIN_SEQLEN)
    samples, seqlen = samples or BUILTIN_SAMPLES, seqlen or BUILTIN_SEQLEN
    path = Path(data)
    ids = _token_ids(tokenizer, path, samples * seqlen)
    blocks = len(ids) // seqlen
    if blocks == 0:
        raise SinqConfigError(
            f"--calib-data {str(path)!r}: its text gives {len(ids)} tokens, fewer than one --calib-seqlen {seqlen} sample"
        )
    if blocks < samples:
        logger.warning("--calib-data %s: only %d samples of %d tokens (asked for %d)", path, blocks, seqlen, samples)
    out = [torch.tensor([ids[i * seqlen:(i + 1) * seqlen]], dtype=torch.long) for i in range(min(blocks, samples))]
    return CalibrationSet(out, f"{path.name}")


def _builtin(tokenizer, samples: int, seqlen: int) -> CalibrationSet:
    encoded = [tokenizer.encode(p) for p in PROMPTS]
    kept = [ids for ids in encoded if 0 < len(ids) <= _BUILTIN_MAX_PROMPT]
    ids = [i for part in kept for i in part]
    blocks = len(ids) // seqlen
    if blocks == 0:
        raise SinqConfigError(
            f"the built-in A-SINQ calibration prompts give no {seqlen}-token sample with this tokenizer "
            f"(prompt lengths {[len(e) for e in encoded]} tokens; prompts over {_BUILTIN_MAX_PROMPT} are skipped, "
            "as the reference does); pass --calib-data FILE"
        )
    out = [torch.tensor([ids[i * seqlen:(i + 1) * seqlen]], dtype=torch.long) for i in range(min(blocks, samples))]
    return CalibrationSet(out, "built-in prompts (the reference's)")


def _token_ids(tokenizer, path: Path, need: int) -> list[int]:
    """At least ``need`` token ids of the file's documents (all of them when it is shorter)."""
    docs = _documents(path)
    if path.suffix.lower() == ".jsonl":
        ids: list[int] = []
        for doc in docs:
            ids += tokenizer.encode(doc)
            if len(ids) >= need:
                break
        return ids
    # Plain text is one document: tokenize a prefix cut at a line end, twice as long until it
    # gives enough tokens, so a large file is not tokenized in full.
    text = docs[0]
    chars = need * _CHARS_PER_TOKEN
    while True:
        if chars >= len(text):
            return tokenizer.encode(text)
        cut = text.rfind("\n", 0, chars) + 1 or chars
        ids = tokenizer.encode(text[:cut])
        if len(ids) >= need:
            return ids
        chars *= 2


def _documents(path: Path) -> list[str]:
    """The documents of a calibration file, checked: UTF-8, not empty, jsonl lines well formed."""
    where = f"--calib-data {str(path)!r}"
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SinqConfigError(f"{where}: not UTF-8 text (undecodable byte at offset {e.start})") from None
    except OSError as e:
        raise SinqConfigError(f"{where}: cannot read it ({e.strerror})") from None
    if not text.strip():
        raise SinqConfigError(f"{where}: the file is empty")
    if path.suffix.lower() != ".jsonl":
        return [text]
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as e:
            raise SinqConfigError(f"{where}: line {n} is not JSON ({e.msg})") from None
        doc = item.get("text") if isinstance(item, dict) else item
        if not isinstance(doc, str):
            raise SinqConfigError(f"{where}: line {n} is neither a JSON string nor an object with a \"text\" string")
        if doc.strip():
            docs.append(doc)
    if not docs:
        raise SinqConfigError(f"{where}: no line has a non-empty \"text\"")
    return docs
