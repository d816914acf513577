"""`vllm serve` on a SINQ checkpoint written without quantization_config (the reference
API's output): the plugin is loaded by the CLI process, detects the sidecar, and the
OpenAI completions endpoint answers."""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import pytest
from vllm_server import serve


def _strip_quantization_config(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def _post(url: str, body: dict, timeout=120):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read())


@pytest.fixture(scope="module")
def server(sinq_factory, tmp_path_factory):
    ckpt = _strip_quantization_config(sinq_factory("llama", nbits=4, group_size=64),
                                      tmp_path_factory.mktemp("served") / "model")
    with serve(ckpt, tmp_path_factory.mktemp("serve-log") / "server.log") as (base, _, log):
        yield base, log


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
