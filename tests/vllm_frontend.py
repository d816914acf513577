"""vLLM's front end without an engine, for tests: ``EngineArgs(...).create_engine_config()``
is what ``vllm serve`` and ``LLM(...)`` run before they start workers (quantization method
detection, ``SinqConfig.maybe_update_config`` with its Hub downloads and validation).

``python tests/vllm_frontend.py CASES_JSON`` runs every case of a JSON list
(``{"model": ..., "quantization": ..., "revision": ..., "download_dir": ..., "env": {...}}``)
in this one process and prints one JSON list of outcomes: the quantization method vLLM
picked, what ``SinqConfig`` read (bits of the quantized layers, online options) or the error.
The environment decides the Hub (``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

_ENGINE_ARGS = ("model", "quantization", "revision", "download_dir", "hf_overrides")


def run_case(case: dict) -> dict:
    from vllm.engine.arg_utils import EngineArgs

    old = {k: os.environ.get(k) for k in case.get("env", {})}
    os.environ.update(case.get("env", {}))
    try:
        args = EngineArgs(dtype="float32", max_model_len=128, enforce_eager=True,
                          **{k: case[k] for k in _ENGINE_ARGS if case.get(k) is not None})
        config = args.create_engine_config()
        quant = config.quant_config
        return {
            "model": config.model_config.model,
            "quantization": config.model_config.quantization,
            "nbits": sorted({m.nbits for m in getattr(quant, "layer_metas", {}).values()}),
            "layers": len(getattr(quant, "layer_metas", {})),
            "online": quant.online.describe() if getattr(quant, "online", None) else None,
            "error": None,
        }
    except Exception as e:  # noqa: BLE001 - the outcome is the message
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_cases(cases: list[dict], env: dict, timeout: float = 600) -> list[dict]:
    """Run ``cases`` in a fresh Python process with ``env``; returns one outcome per case."""
    proc = subprocess.run([sys.executable, __file__, json.dumps(cases)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("OUTCOMES ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"front-end probe failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("OUTCOMES "):])


if __name__ == "__main__":
    outcomes = [run_case(c) for c in json.loads(sys.argv[1])]
    print("OUTCOMES " + json.dumps(outcomes), flush=True)
