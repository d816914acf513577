"""Where the engine being configured downloads its model to: vLLM's ``--download-dir``.

vLLM hands ``maybe_update_config`` the model id and revision but not its load config, and
picks the quantization method before a load config exists; yet the sidecar and index of a
Hub checkpoint must land in the cache the weights go to. The plugin wraps
``EngineArgs.create_engine_config`` (both steps run inside it) to publish the download
directory here for the duration of the call (docs/design.md §3.1).
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

_download_dir: ContextVar[str | None] = ContextVar("sinq_vllm_download_dir", default=None)


def download_dir() -> str | None:
    """The ``--download-dir`` of the engine being configured (None: the Hugging Face cache)."""
    return _download_dir.get()


@contextlib.contextmanager
def engine_download_dir(path: str | None):
    token = _download_dir.set(path)
    try:
        yield
    finally:
        _download_dir.reset(token)
