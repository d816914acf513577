"""Where and how the engine being configured downloads its model: vLLM's ``--download-dir``
and ``--hf-token``.

vLLM hands ``maybe_update_config`` the model id and revision but not its load config, and
picks the quantization method before a load config exists; yet the sidecar and index of a
Hub checkpoint must land in the cache the weights go to. The plugin wraps
``EngineArgs.create_engine_config`` (both steps run inside it) to publish the download
directory and token here for the duration of the call (docs/design.md §3.1).
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

_source: ContextVar[tuple[str | None, bool | str | None]] = ContextVar("sinq_vllm_source", default=(None, None))


def download_dir() -> str | None:
    """The ``--download-dir`` of the engine being configured (None: the Hugging Face cache)."""
    return _source.get()[0]


def hf_token() -> bool | str | None:
    """The ``--hf-token`` of the engine being configured (None: huggingface_hub's own lookup)."""
    return _source.get()[1]


@contextlib.contextmanager
def engine_source(download_dir: str | None, token: bool | str | None):
    reset = _source.set((download_dir, token))
    try:
        yield
    finally:
        _source.reset(reset)
