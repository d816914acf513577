"""``vllm serve`` in a subprocess for the server tests: start, wait until healthy, stop."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 900  # a compiled engine on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def serve(model: str | Path, log_path: Path, *extra_args: str, served_name: str = "tiny-sinq",
          max_model_len: int = 256, env: dict | None = None, timeout_s: float = STARTUP_TIMEOUT_S):
    """``vllm serve MODEL`` on 127.0.0.1 (float32, eager unless ``extra_args`` say otherwise);
    yields ``(base_url, process, log_file)``. A server that exits or never becomes healthy fails
    the test with the tail of its log."""
    vllm_cli = Path(sys.executable).parent / "vllm"
    port = free_port()
    args = [str(vllm_cli), "serve", str(model), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--max-model-len", str(max_model_len), "--served-model-name", served_name, "--seed", "0", *extra_args]
    if "--no-enforce-eager" not in extra_args and "--enforce-eager" not in extra_args:
        args.append("--enforce-eager")
    log = open(log_path, "w+")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while not _healthy(base):
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail("vllm serve did not become healthy in time")
            time.sleep(1)
        yield base, proc, log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
