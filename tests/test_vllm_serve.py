"""`vllm serve` on a SINQ checkpoint written without quantization_config (the reference
API's output): the plugin is loaded by the CLI process, detects the sidecar, and the
OpenAI completions endpoint answers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _strip_quantization_config(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def _get(url: str, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def _post(url: str, body: dict, timeout=120):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read())


@pytest.fixture(scope="module")
def server(sinq_factory, tmp_path_factory):
    ckpt = _strip_quantization_config(sinq_factory("llama", nbits=4, group_size=64),
                                      tmp_path_factory.mktemp("served") / "model")
    vllm_cli = Path(sys.executable).parent / "vllm"
    port = _free_port()
    log = open(tmp_path_factory.mktemp("serve-log") / "server.log", "w+")
    proc = subprocess.Popen(
        [str(vllm_cli), "serve", str(ckpt), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--max-model-len", "256", "--enforce-eager", "--served-model-name", "tiny-sinq"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ}, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read()[-4000:]}")
            try:
                if _get(base + "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail("vllm serve did not become healthy in time")
            time.sleep(2)
        yield base, log
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_completions_endpoint_answers(server):
    base, log = server
    status, body = _post(base + "/v1/completions", {
        "model": "tiny-sinq", "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0,
        "ignore_eos": True,
    })
    assert status == 200
    assert body["usage"]["completion_tokens"] == 8
    assert isinstance(body["choices"][0]["text"], str) and body["choices"][0]["text"]
    log.flush()
    log.seek(0)
    text = log.read()
    assert "SINQ sidecar meta file" in text and "quantization=sinq" in text
