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
    flag = "1" if offline else "0"  # explicit: tests/conftest.py sets both to 1 for the whole session
    return {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1",
            "SINQ_AUTO_PATCH": "0", "HF_HUB_OFFLINE": flag, "TRANSFORMERS_OFFLINE": flag, **extra}


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


# ---- sinq-vllm inspect / quantize with Hub ids ------------------------------------------------------
def _cli(hub, home, *args, offline=False):
    return subprocess.run([str(SINQ_CLI), *args], env=hub_env(hub, home, offline), capture_output=True, text=True,
                          timeout=600)


def test_cli_inspect_and_quantize_take_hub_ids(hub, tmp_path):
    home = tmp_path / "hf-home"
    first = len(hub.requests)
    proc = _cli(hub, home, "inspect", REPO_API, "--revision", "v2", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["servable"] and report["path"] == f"{REPO_API} (revision v2)", report["reasons"]
    assert report["kinds"] and all(k.startswith("8-bit") for k in report["kinds"]), report["kinds"]
    assert all(b == "cpu" for d in report["backends"].values() for b in d.values()), report["backends"]
    # the shard headers came from the Hub by range requests; the weights were not downloaded
    assert any(m == "GET" and s == 206 and p.startswith("/cdn/") for m, p, s in hub.requests[first:])
    assert "model-00001-of-00001.safetensors" not in _snapshot_files(home / "hub", REPO_API)

    proc = _cli(hub, home, "inspect", REPO_API, "--revision", "v2", offline=True)  # headers not cached
    assert proc.returncode == 1 and "HF_HUB_OFFLINE=1" in proc.stdout, proc.stdout + proc.stderr

    proc = _cli(hub, home, "inspect", "sinq-org/gated")
    assert proc.returncode == 2 and "sinq-org/gated is a gated repository (HTTP 401)" in proc.stderr, proc.stderr

    out = tmp_path / "quantized"
    proc = _cli(hub, home, "quantize", BF16, str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "14 quantized Linear layers" in proc.stdout and (out / SIDECAR).is_file(), proc.stdout


# ---- engines: vllm serve on a cold and a warm cache (compiled), LLM(...) with revision + download dir ----------
def _completion(base: str, prompt: str = "The quick brown fox") -> dict:
    body = {"model": "tiny-sinq", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200
        return json.loads(r.read())


def _log_text(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()


@pytest.fixture(scope="module")
def served(hub, tmp_path_factory):
    """`vllm serve ORG/NAME` (repo-API layout, no flag, vLLM's default compiled engine) on a cold
    cache, then again offline on the cache it left; the answers and the logs of both."""
    home = tmp_path_factory.mktemp("serve-hf-home")
    logs = tmp_path_factory.mktemp("serve-logs")
    runs = {}
    for name, offline in (("cold", False), ("warm", True)):
        first = len(hub.requests)
        with serve(REPO_API, logs / f"{name}.log", "--no-enforce-eager", env=hub_env(hub, home, offline)) as (
                base, _, log):
            runs[name] = (_completion(base), _log_text(log), hub.requests[first:])
    return runs, home / "hub"


def test_serve_by_id_on_a_cold_cache(served):
    (answer, log, requests), cache = served[0]["cold"], served[1]
    assert answer["usage"]["completion_tokens"] == 8 and answer["choices"][0]["text"], answer
    assert "carries a SINQ sidecar meta file: using --quantization sinq" in log
    assert f"SINQ checkpoint {REPO_API} (revision main): 14 quantized linear modules" in log
    assert "use the 'cpu' kernel backend" in log and "torch fallback" not in log
    assert "enforce_eager=False" in log or "Enforce eager set" not in log  # the compiled engine
    assert any(m == "GET" and p.endswith("/" + SIDECAR) for m, p, s in requests)
    assert {SIDECAR, INDEX, "model-00001-of-00001.safetensors"} <= _snapshot_files(cache, REPO_API)


def test_serve_by_id_offline_on_the_warm_cache(served):
    runs = served[0]
    answer, log, requests = runs["warm"]
    assert requests == [], requests  # HF_HUB_OFFLINE=1: nothing reaches the Hub
    assert "using --quantization sinq" in log and "14 quantized linear modules" in log
    assert answer["choices"][0]["text"] == runs["cold"][0]["choices"][0]["text"]  # greedy, same weights


_LLM_SCRIPT = '''
import json, sys
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    kwargs = json.loads(sys.argv[1])
    llm = LLM(dtype="float32", max_model_len=256, enforce_eager=True, seed=0, **kwargs)
    out = llm.generate(["The quick brown fox"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    print("ANSWER " + json.dumps(out[0].outputs[0].text), flush=True)
'''


def test_llm_by_id_with_flag_revision_and_download_dir(hub, tmp_path):
    """LLM(ORG/NAME, quantization="sinq", revision="v2", download_dir=D): every file of branch v2
    (config aside, which vLLM's front end keeps in HF_HOME) lands in D, and the 8-bit branch is served."""
    script = tmp_path / "llm_by_id.py"
    script.write_text(_LLM_SCRIPT)
    home, download_dir = tmp_path / "hf-home", tmp_path / "download-dir"
    kwargs = dict(model=REPO_API, quantization="sinq", revision="v2", download_dir=str(download_dir))
    proc = subprocess.run([sys.executable, str(script), json.dumps(kwargs)], env=hub_env(hub, home),
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("ANSWER "))[7:])
    summary = next((line for line in out.splitlines() if f"SINQ checkpoint {REPO_API} (revision v2)" in line), "")
    assert "14 quantized linear modules" in summary and "8-bit g128" in summary and "4-bit" not in summary, summary
    assert {SIDECAR, INDEX, "model-00001-of-00001.safetensors"} <= _snapshot_files(download_dir, REPO_API)
    assert not any(n.endswith(".safetensors") for n in _snapshot_files(home / "hub", REPO_API))
