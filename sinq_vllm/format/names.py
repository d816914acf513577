"""File and tensor names of a SINQ checkpoint (docs/format.md §2.1-§2.4, §2.11).

Every rule about names lives here: the index and sidecar file names, the buffers a
checkpoint may carry that are not model weights, and the extra ``model.`` prefix of
checkpoints written by reference commit 9a9812f (docs/format.md §2.11).
"""

from __future__ import annotations

from collections.abc import Iterable

INDEX_NAME = "model.safetensors.index.json"
SIDECAR_SUFFIX = ".meta.json"
SIDECAR_NAME = INDEX_NAME + SIDECAR_SUFFIX

#: rotary buffers some writers save; every loader recomputes them, so they are never copied or loaded
DROPPED_BUFFER_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")

#: the extra prefix of legacy (reference commit 9a9812f) names: ``model.model.layers...``, ``model.lm_head``
LEGACY_PREFIX = "model."
#: how vLLM must rename legacy tensor names (longest prefix first)
LEGACY_RENAMES = {"model.model.": "model.", "model.lm_head.": "lm_head."}


def is_legacy_prefixed(names: Iterable[str]) -> bool:
    """True when every name carries the legacy extra ``model.`` prefix."""
    names = list(names)
    return bool(names) and all(n.startswith(("model.model.", "model.lm_head")) for n in names)


def strip_legacy_prefix(name: str) -> str:
    return name[len(LEGACY_PREFIX):] if name.startswith(LEGACY_PREFIX) else name


def module_of(tensor_name: str, suffix: str) -> str | None:
    """``"a.b.W_q"`` with suffix ``".W_q"`` -> ``"a.b"``; None when the name does not end so."""
    return tensor_name[: -len(suffix)] if tensor_name.endswith(suffix) else None
