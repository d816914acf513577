"""Hub model ids: SINQ checkpoints served by id from a local stand-in for the Hugging Face Hub
(tests/hub_server.py: the Hub's routes, headers and errors) with ``HF_ENDPOINT`` pointing at
it, through the real huggingface_hub client and the real vLLM.

Repositories (tiny Llama/Qwen3 SINQ checkpoints built by our quantizer):

==========================  =================================================================
``sinq-org/llama-repoapi``  the reference repo-API layout (sidecar, no quantization_config);
                            branch ``v2``: the same model quantized 8-bit g128
``sinq-org/qwen3-hf``       the Transformers ``SinqConfig`` layout (quantization_config)
``sinq-org/llama-bf16``     a plain bf16 model (no sidecar)
``sinq-org/gated``          a gated copy of llama-repoapi
``sinq-org/sidecar-renamed``  llama-repoapi with its sidecar under another name
``sinq-org/shard-renamed``  llama-repoapi whose only shard has another name than the index says
``sinq-org/sidecar-refused``  llama-repoapi whose sidecar the server refuses (403)
``sinq-org/old-name``       renamed to llama-repoapi (the Hub redirects, 307)
==========================  =================================================================

The front-end matrix runs vLLM's front end (``EngineArgs.create_engine_config``: detection,
``maybe_update_config``, validation) for every layout x flag x cache case in one process per
cache state (tests/vllm_frontend.py); three engines then serve by id: ``vllm serve`` on a cold
cache and on a warm cache with ``HF_HUB_OFFLINE=1`` (vLLM's default compiled engine, no request
may reach the Hub), and ``LLM(...)`` with ``--quantization sinq``, ``--revision`` and
``--download-dir`` (eager).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from ckpt_mutation import INDEX, SIDECAR, copy_checkpoint, edit_config
from hub_server import LocalHub
from vllm_frontend import run_cases
from vllm_server import serve

SINQ_CLI = Path(sys.executable).parent / "sinq-vllm"
REPO_API, HF_LAYOUT, BF16 = "sinq-org/llama-repoapi", "sinq-org/qwen3-hf", "sinq-org/llama-bf16"


def _strip_quantization_config(folder: Path) -> Path:
    edit_config(folder, lambda c: c.pop("quantization_config", None))
    return folder


@pytest.fixture(scope="module")
def hub(sinq_factory, model_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-repos")
    repoapi = _strip_quantization_config(copy_checkpoint(sinq_factory("llama"), root / "repoapi"))
    repoapi_8bit = _strip_quantization_config(
        copy_checkpoint(sinq_factory("llama", nbits=8, group_size=128), root / "repoapi-8bit"))
    with LocalHub() as h:
        h.add_repo(REPO_API, repoapi)
        h.add_repo(REPO_API, repoapi_8bit, revision="v2")
        h.add_repo(HF_LAYOUT, sinq_factory("qwen3"))
        h.add_repo(BF16, model_factory("llama"))
        h.add_repo("sinq-org/gated", repoapi, gated=True)
        h.add_repo("sinq-org/sidecar-renamed", repoapi, rename={SIDECAR: "model.safetensors.meta.json"})
        shard = json.loads((repoapi / INDEX).read_text())["weight_map"]["model.norm.weight"]
        h.add_repo("sinq-org/shard-renamed", repoapi, rename={shard: "model.safetensors"})
        h.add_repo("sinq-org/sidecar-refused", repoapi)
        h.deny("sinq-org/sidecar-refused", SIDECAR, 403)
        h.rename_repo("sinq-org/old-name", REPO_API)
        yield h


def hub_env(hub: LocalHub, home: Path, offline: bool = False, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", SINQ_AUTO_PATCH="0", **extra)
    if offline:
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _snapshot_files(cache: Path, repo_id: str) -> set[str]:
    """File names in any snapshot of ``repo_id`` in a Hugging Face cache folder (hub/ or a download dir)."""
    base = cache / ("models--" + repo_id.replace("/", "--"))
    return {p.name for p in base.glob("snapshots/*/*")}


# ---- the front end: every layout x flag x cache case ---------------------------------------------
@pytest.fixture(scope="module")
def frontend(hub, tmp_path_factory):
    """Outcomes of the cold-cache cases, then of the warm-cache cases offline (same HF_HOME)."""
    home = tmp_path_factory.mktemp("hf-home")
    download_dir = tmp_path_factory.mktemp("download-dir")
    cold = {
        "repoapi": dict(model=REPO_API),
        "repoapi+flag": dict(model=REPO_API, quantization="sinq"),
        "hf": dict(model=HF_LAYOUT),
        "hf+flag": dict(model=HF_LAYOUT, quantization="sinq"),
        "repoapi@v2": dict(model=REPO_API, revision="v2"),
        "repoapi+download_dir": dict(model=REPO_API, revision="v2", download_dir=str(download_dir)),
        "bf16": dict(model=BF16),
        "bf16+flag": dict(model=BF16, quantization="sinq"),
        "bf16+online": dict(model=BF16, quantization="sinq", env={"SINQ_VLLM_ONLINE": "1"}),
        "gated": dict(model="sinq-org/gated"),
        "sidecar-renamed": dict(model="sinq-org/sidecar-renamed"),
        "shard-renamed": dict(model="sinq-org/shard-renamed"),
        "sidecar-refused": dict(model="sinq-org/sidecar-refused"),
        "old-name": dict(model="sinq-org/old-name"),
        "no-such-revision": dict(model=REPO_API, revision="v9"),
        "bad-switch": dict(model=REPO_API, env={"SINQ_VLLM_MOE_KERNEL": "fast"}),
    }
    first = len(hub.requests)
    outcomes = dict(zip(cold, run_cases(list(cold.values()), hub_env(hub, home))))
    cold_requests = hub.requests[first:]
    warm = {
        "repoapi": dict(model=REPO_API),
        "hf+flag": dict(model=HF_LAYOUT, quantization="sinq"),
        "repoapi@v2": dict(model=REPO_API, revision="v2"),
        "bf16": dict(model=BF16),
        "sidecar-renamed": dict(model="sinq-org/sidecar-renamed"),
    }
    # the weights too, as `hf download` or an earlier `vllm serve` leave them (the front end never downloads them)
    warm_up = "; ".join(f"snapshot_download({repo!r}, revision={rev!r})"
                        for repo, rev in ((REPO_API, "main"), (REPO_API, "v2"), (HF_LAYOUT, "main")))
    subprocess.run([sys.executable, "-c", f"from huggingface_hub import snapshot_download; {warm_up}"],
                   env=hub_env(hub, home), check=True, capture_output=True, timeout=300)
    first = len(hub.requests)
    warm_outcomes = dict(zip(warm, run_cases(list(warm.values()), hub_env(hub, home, offline=True))))
    return outcomes, warm_outcomes, hub.requests[first:], cold_requests, home / "hub", download_dir


@pytest.mark.parametrize("case", ["repoapi", "repoapi+flag", "hf", "hf+flag"])
def test_both_layouts_with_and_without_the_flag_on_a_cold_cache(frontend, case):
    outcome = frontend[0][case]
    assert outcome["error"] is None, outcome
    assert outcome["quantization"] == "sinq" and outcome["nbits"] == [4] and outcome["layers"] == 14, outcome


def test_sidecar_and_index_are_downloaded_by_detection(frontend):
    """The trap: vLLM's front end fetched only config.json; detection must fetch the sidecar itself."""
    _, _, _, cold_requests, cache, _ = frontend
    fetched = [p for m, p, s in cold_requests if m == "GET" and s == 200 and f"{REPO_API}/resolve/" in p]
    assert any(p.endswith("/" + SIDECAR) for p in fetched) and any(p.endswith("/" + INDEX) for p in fetched)
    assert {SIDECAR, INDEX, "config.json"} <= _snapshot_files(cache, REPO_API)


def test_revision_and_download_dir_are_honoured(frontend):
    outcomes, _, _, _, cache, download_dir = frontend
    assert outcomes["repoapi@v2"]["nbits"] == [8], outcomes["repoapi@v2"]  # branch v2 is the 8-bit checkpoint
    assert outcomes["repoapi+download_dir"]["nbits"] == [8], outcomes["repoapi+download_dir"]
    assert {SIDECAR, INDEX} <= _snapshot_files(download_dir, REPO_API)


def test_plain_models_are_not_detected_and_online_quantization_works(frontend):
    outcomes = frontend[0]
    assert outcomes["bf16"]["error"] is None and outcomes["bf16"]["quantization"] is None, outcomes["bf16"]
    assert outcomes["bf16+online"]["online"] == "sinq 4-bit g64", outcomes["bf16+online"]
    err = outcomes["bf16+flag"]["error"]
    assert f"{BF16} (revision main) is not a SINQ checkpoint: the repository has no {SIDECAR}" in err, err


@pytest.mark.parametrize("case, expected", [
    ("gated", "gated"),
    ("sidecar-renamed", f"names SINQ codes ('<module>.W_q' tensors) but the SINQ sidecar {SIDECAR} is missing"),
    ("shard-renamed", f"{INDEX} lists 1 shard(s) the repository does not have, e.g. 'model-00001-of-00001.safetensors'"),
    ("sidecar-refused", f"the Hub refused {SIDECAR} (HTTP 403"),
    ("no-such-revision", "v9"),
    ("bad-switch", "SINQ_VLLM_MOE_KERNEL='fast' is not valid; valid values: auto, triton, loop"),
])
def test_bad_repositories_fail_in_the_front_end_with_one_clear_message(frontend, case, expected):
    err = frontend[0][case]["error"]
    assert err is not None and expected in err, err
    assert "Traceback" not in err


def test_renamed_repository_is_followed(frontend):
    assert frontend[0]["old-name"]["quantization"] == "sinq", frontend[0]["old-name"]


def test_warm_cache_offline_makes_no_request(frontend):
    _, warm, warm_requests, _, _, _ = frontend
    assert warm_requests == [], warm_requests
    for case in ("repoapi", "hf+flag"):
        assert warm[case]["error"] is None and warm[case]["quantization"] == "sinq" and warm[case]["nbits"] == [4], \
            warm[case]
    assert warm["repoapi@v2"]["nbits"] == [8], warm["repoapi@v2"]
    assert warm["bf16"]["error"] is None and warm["bf16"]["quantization"] is None, warm["bf16"]
    assert "the SINQ sidecar" in warm["sidecar-renamed"]["error"], warm["sidecar-renamed"]
