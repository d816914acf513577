"""Bad sinq-related options and environment variables get one clear message that lists the
valid values, and nothing in the plugin or the quantizer implies ``trust_remote_code``.

* ``SINQ_VLLM_BACKEND``: an unknown name fails in vLLM's front end (before any engine
  starts) listing ``auto, cpu, torch``; a forced backend that cannot run (simulated: the
  CPU extension reported unavailable) fails naming the layer, the variable and the reason,
  while ``auto`` falls back to the portable backend.
* activation dtypes: what a user sees for a dtype vLLM does not know (``"float8"``) and
  for a torch dtype our ``get_supported_act_dtypes`` refuses (float8, float64): both list
  the valid dtypes; no engine starts.
* ``sinq-vllm quantize`` with nbits 7, group size 50 or ``--method foo``: exit code 2,
  one line on stderr naming the option and the valid values, no traceback.
* ``trust_remote_code``: a checkpoint whose ``config.json`` has an ``auto_map`` pointing at
  a module in the folder that would create a marker file on import is loaded by
  ``LLM(...)`` (default ``trust_remote_code=False``) and quantized by ``sinq-vllm
  quantize``; the module never runs (one engine in this file).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import vllm_engine
from sinq_vllm.errors import SinqConfigError
from sinq_vllm.format.names import SIDECAR_NAME

SINQ_CLI = Path(sys.executable).parent / "sinq-vllm"


def _fails_before_engine(model_dir, **kwargs) -> str:
    """Build ``LLM(...)``; it must fail in the front end. Returns the message."""
    from vllm import LLM

    opts = dict(dtype="float32", max_model_len=128, enforce_eager=True)
    opts.update(kwargs)
    with pytest.raises(Exception) as info:
        LLM(model=str(model_dir), **opts)
    return str(info.value)


@pytest.fixture(scope="module")
def ckpt(sinq_factory):
    return sinq_factory("llama", nbits=4, group_size=64)


# ---- SINQ_VLLM_BACKEND ----------------------------------------------------------------------
def test_unknown_backend_fails_in_the_front_end_listing_valid_values(ckpt, monkeypatch):
    monkeypatch.setenv("SINQ_VLLM_BACKEND", "magic")
    msg = _fails_before_engine(ckpt)
    assert "SINQ_VLLM_BACKEND='magic' is not a SINQ kernel backend; valid values: auto, cpu, cuda, triton, torch" in msg, msg


def test_forced_backend_that_cannot_run_names_layer_variable_and_reason(monkeypatch):
    from sinq_vllm.kernels import cpu_backend, selection
    from sinq_vllm.kernels.contract import LayerSpec

    reason = "simulated: the sinq_vllm._C_cpu extension was not built"
    monkeypatch.setattr(cpu_backend.CpuBackend, "unavailable_reason", classmethod(lambda cls: reason))
    monkeypatch.setattr(selection, "_instances", {})
    spec = LayerSpec(nbits=4, group_size=64, out_features=128, in_features=128, shard_offsets=(0, 128))
    cpu = torch.device("cpu")

    monkeypatch.setenv("SINQ_VLLM_BACKEND", "cpu")
    with pytest.raises(SinqConfigError) as info:
        selection.select_backend(spec, torch.float32, cpu, "model.layers.0.self_attn.qkv_proj")
    msg = str(info.value)
    assert "model.layers.0.self_attn.qkv_proj" in msg and "SINQ_VLLM_BACKEND=cpu" in msg and reason in msg, msg

    monkeypatch.setenv("SINQ_VLLM_BACKEND", "auto")  # auto skips the unavailable backend
    assert selection.select_backend(spec, torch.float32, cpu, "layer").name == "torch"


# ---- activation dtype -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float8", torch.float8_e4m3fn, torch.float64])
def test_unsupported_activation_dtype_lists_valid_dtypes(ckpt, dtype):
    msg = _fails_before_engine(ckpt, dtype=dtype)
    if isinstance(dtype, str):  # vLLM's own option validation
        assert "'float8'" in msg and all(d in msg for d in ("'bfloat16'", "'float16'", "'float32'")), msg
    else:  # SinqConfig.get_supported_act_dtypes
        assert f"{dtype} is not supported for quantization method sinq" in msg, msg
        assert "Supported dtypes: [torch.bfloat16, torch.float16, torch.float32]" in msg, msg


# ---- sinq-vllm quantize flags ---------------------------------------------------------------
@pytest.mark.parametrize("flags, expected", [
    (["--nbits", "7"], "nbits=7 is not supported; choose one of [2, 3, 4, 5, 6, 8]"),
    (["--group-size", "50"], "group_size=50 must be a multiple of 8 and at least 16"),
    (["--method", "foo"], "method='foo' is not supported; choose one of ['sinq', 'asinq', 'sinq_nf4', 'sinq_nf3', 'sinq_fit', 'sinq_gptq', 'rtn']"),
])
def test_quantize_bad_flags_exit_2_with_one_line(model_factory, tmp_path, flags, expected):
    proc = subprocess.run(
        [str(SINQ_CLI), "quantize", str(model_factory("llama")), str(tmp_path / "out"), *flags],
        capture_output=True, text=True, timeout=120, env={**os.environ, "SINQ_AUTO_PATCH": "0"},
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("sinq-vllm quantize: error: ") and expected in lines[0], lines
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists()  # nothing written


# ---- no trust_remote_code -------------------------------------------------------------------
_EVIL = '''
import pathlib
pathlib.Path({marker!r}).write_text("remote code ran")
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    pass


class EvilModel(LlamaForCausalLM):
    pass
'''


def _plant_remote_code(folder: Path, marker: Path) -> None:
    (folder / "evil_remote_code.py").write_text(_EVIL.format(marker=str(marker)))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {
        "AutoConfig": "evil_remote_code.EvilConfig",
        "AutoModel": "evil_remote_code.EvilModel",
        "AutoModelForCausalLM": "evil_remote_code.EvilModel",
    }
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def test_auto_map_module_never_runs(ckpt, model_factory, tmp_path, monkeypatch):
    from vllm import SamplingParams

    marker = tmp_path / "REMOTE_CODE_RAN"
    served = tmp_path / "served"
    shutil.copytree(ckpt, served)
    _plant_remote_code(served, marker)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: quicker to start
    with vllm_engine(served, max_model_len=128) as llm:  # trust_remote_code defaults to False
        out = llm.generate(["Once upon a time"], SamplingParams(max_tokens=4, temperature=0))
    assert len(out[0].outputs[0].token_ids) >= 1
    assert not marker.exists(), "loading a SINQ checkpoint executed code named by config.json auto_map"

    src = tmp_path / "src"
    shutil.copytree(model_factory("llama"), src)
    _plant_remote_code(src, marker)
    proc = subprocess.run(
        [str(SINQ_CLI), "quantize", str(src), str(tmp_path / "q"), "--no-progress"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "SINQ_AUTO_PATCH": "0"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not marker.exists(), "sinq-vllm quantize executed code named by config.json auto_map"


# ---- every SINQ_VLLM_* switch: one table, checked in the front end, documented in the README -------
def _switch_names_in_source() -> set[str]:
    import re

    root = Path(__file__).resolve().parents[1]
    files = [*root.joinpath("sinq_vllm").rglob("*.py"), *root.joinpath("triton_kernels").rglob("*.py"),
             *root.joinpath("csrc").rglob("*.cpp"), *root.joinpath("csrc").rglob("*.cu"), root / "build_ext_config.py"]
    names = set()
    for f in files:
        names |= set(re.findall(r"\bSINQ_VLLM_[A-Z0-9_]*[A-Z0-9]\b", f.read_text()))
    return names


def test_every_switch_is_in_the_table_and_the_readme():
    from sinq_vllm.vllm.options import SWITCHES

    table = {s.name for s in SWITCHES}
    # SINQ_VLLM_<KIND>_JIT is spelled as a pattern in kernels/native.py: its instances are in the table
    assert _switch_names_in_source() <= table, _switch_names_in_source() - table
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in table), [n for n in table if f"`{n}`" not in readme]


@pytest.mark.parametrize("name, value, expected", [
    ("SINQ_VLLM_BACKEND", "gpu", "valid values: auto, cpu, cuda, triton, torch"),
    ("SINQ_VLLM_ONLINE", "bits=4", "keys nbits, group_size, method, aux, skip, routers"),
    ("SINQ_VLLM_ONLINE", "aux=maybe", "valid values: 1, true, yes, on, 0, false, no, off"),
    ("SINQ_VLLM_MOE_KERNEL", "fused", "valid values: auto, triton, loop"),
    ("SINQ_VLLM_CPU_ISA", "AVX2", "valid values: auto, avx512bf16, avx512, avx2, scalar"),
    ("SINQ_VLLM_CPU_JIT", "off", "valid values: 0, 1, false, true, no, yes"),
    ("SINQ_VLLM_CUDA_JIT", "never", "valid values: 0, 1, false, true, no, yes"),
    ("SINQ_VLLM_CACHE", __file__, "it exists and is not a folder"),
    ("SINQ_VLLM_TRITON_AUTOTUNE", "2", "valid values: 0, 1, false, true, no, yes, on, off"),
    ("SINQ_VLLM_TRITON_GEMV_MAX_M", "one", "valid values: a whole number >= 0"),
    ("SINQ_VLLM_TRITON_FACTORED_MAX_M", "-1", "valid values: a whole number >= 0"),
    ("SINQ_VLLM_CPU_ACT", "fp8", "valid values: auto, exact, int8"),
    ("SINQ_VLLM_PREFILL_MIN_M", "0", "must be a positive integer (default 256)"),
    ("SINQ_VLLM_REQUIRE_CUDA", "maybe", "valid values: 0, 1, false, true, no, yes, on, off"),
    ("SINQ_VLLM_SKIP_CPU_EXT", "yes", "valid values: 0, 1"),
    ("SINQ_VLLM_SKIP_CUDA_EXT", "true", "valid values: 0, 1"),
    ("SINQ_VLLM_BAKCEND", "cpu", "is not a sinq-vllm switch (a typo?); valid names: SINQ_VLLM_BACKEND, "),
])
def test_bad_switch_values_list_the_valid_ones(monkeypatch, name, value, expected):
    from sinq_vllm.vllm.options import check_environment

    monkeypatch.setenv(name, value)
    with pytest.raises(SinqConfigError) as info:
        check_environment()
    assert expected in str(info.value), str(info.value)


def test_switch_defaults_are_valid(monkeypatch):
    from sinq_vllm.vllm.options import SWITCHES, check_environment

    for switch in SWITCHES:
        monkeypatch.setenv(switch.name, switch.default)
    check_environment()


# ---- online quantization keeps what the offline quantizer keeps ------------------------------------
def test_online_defaults_match_offline(model_factory, sinq_factory):
    """On a tiny Qwen3-MoE: the non-expert linear modules that online SINQ quantizes (LinearBase
    layers only, never the head: vLLM's ParallelLMHead is not one) are exactly those that
    `sinq-vllm quantize` quantizes by default, and with the same skip pattern too."""
    from sinq_vllm.quantizer.model import model_skeleton
    from sinq_vllm.vllm.online import OnlineOptions

    moe = dict(num_hidden_layers=3, mlp_only_layers=[1])
    skel = model_skeleton(model_factory("qwen3_moe", **moe))
    linears = [n for n in [*skel.linears, *skel.routers] if n != skel.output_module]
    for skip in ((), ("q_proj",)):
        sidecar = json.loads((sinq_factory("qwen3_moe", skip=skip, **moe) / SIDECAR_NAME).read_text())
        offline = {n for n in sidecar if ".experts." not in n}
        online = {n for n in linears if not OnlineOptions(skip=skip).keeps(n)}
        assert online == offline, (online ^ offline)
    assert OnlineOptions().keeps("model.layers.0.mlp.gate") and OnlineOptions().keeps("model.layers.0.mlp.shared_expert_gate")
    assert not OnlineOptions(routers=True).keeps("model.layers.0.mlp.gate")
