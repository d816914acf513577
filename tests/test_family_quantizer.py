"""``sinq-vllm quantize --method asinq | sinq_nf4 | sinq_nf3`` on whole models.

Model-level parity with the reference (``sinq==0.2.0``, ``tests/reference_checkpoints.py``):
the same tiny bf16 model quantized by the repo API and by us gives bit-identical SINQ
tensors (``W_q``, ``meta.*``) and sidecar entries:

* A-SINQ on the reference's built-in calibration prompts: the same token blocks (checked
  against the reference's ``get_simple_calibration_data``), activations collected one
  decoder block at a time, the same alpha search (docs/format.md §1.5) with the reference's
  fp16 matmuls (``reference_matmul()``; the default fast path is compared in
  test_asinq_matmul.py and below). Measured: bit-identical (fp16 matmuls and reductions are
  deterministic on one machine; the reference runs single-threaded in its subprocess, ours
  with torch's default threads);
* NF4 without quantAux and NF3 with it (K fallback on Llama's down_proj).

The per-layer cases (odd shapes, kurtosis gate, seeded activations) are in
``test_reference_parity.py``. Then the options and the bad inputs, each caught before
anything is written.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from reference_checkpoints import (
    ASINQ_SPEC,
    NF_SPECS,
    prefetch_all,
    reference_calibration_blocks,
    repo_checkpoint,
    skip_reason,
    smollm2_tokenizer_dir,
    smollm2_tokenizer_reason,
)
from sinq_vllm.errors import SinqConfigError
from sinq_vllm.quantizer import METHODS, quantize_model
from sinq_vllm.quantizer.awq import reference_matmul

SIDECAR = "model.safetensors.index.json.meta.json"
INDEX = "model.safetensors.index.json"
needs_reference = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))
needs_tokenizer = pytest.mark.skipif(smollm2_tokenizer_reason() is not None, reason=str(smollm2_tokenizer_reason()))


def sinq_tensors(d: Path) -> dict[str, torch.Tensor]:
    wmap = json.loads((d / INDEX).read_text())["weight_map"]
    out = {}
    for key, f in wmap.items():
        if key.endswith(".W_q") or ".meta." in key:
            with safe_open(str(d / f), "pt") as h:
                out[key] = h.get_tensor(key)
    return out


def assert_same_checkpoint(ours: Path, theirs: Path) -> int:
    a, b = sinq_tensors(ours), sinq_tensors(theirs)
    assert sorted(a) == sorted(b)
    differ = [k for k in a if not (a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]))]
    assert not differ, f"{len(differ)}/{len(a)} tensors differ from the reference, e.g. {differ[:4]}"
    side_a, side_b = (json.loads((d / SIDECAR).read_text()) for d in (ours, theirs))
    assert sorted(side_a) == sorted(side_b)
    for name, entry in side_b.items():
        for field, value in entry["meta"].items():
            assert side_a[name]["meta"].get(field) == value, (name, field)
    return len(a)


# ---------------------------------------------------------------------------------------
# parity with the reference on whole models


@needs_reference
@needs_tokenizer
def test_builtin_calibration_blocks_equal_the_reference():
    from transformers import AutoTokenizer

    from sinq_vllm.quantizer.calibration import calibration_set

    tok_dir = smollm2_tokenizer_dir()
    theirs = reference_calibration_blocks(tok_dir)
    ours = calibration_set(AutoTokenizer.from_pretrained(str(tok_dir))).samples
    assert len(ours) == len(theirs) > 10
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


@needs_reference
def test_builtin_prompts_are_the_reference_text():
    """Our copy of the prompts, byte for byte (read from the reference's source, not imported:
    importing sinq.awq needs the datasets package)."""
    from sinq_vllm.quantizer.calibration_prompts import PROMPTS

    src = Path(list(importlib.util.find_spec("sinq").submodule_search_locations)[0]) / "awq.py"
    fn = next(n for n in ast.walk(ast.parse(src.read_text())) if isinstance(n, ast.FunctionDef)
              and n.name == "get_simple_calibration_data")
    strings = {n.targets[0].id: n.value.value for n in fn.body if isinstance(n, ast.Assign)
               and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)}
    assert list(PROMPTS) == [strings[f"prompt{i}"] for i in range(1, 6)]


@needs_reference
@needs_tokenizer
def test_asinq_model_bit_identical_to_reference(tmp_path):
    prefetch_all()
    ref = repo_checkpoint(*ASINQ_SPEC)
    arch, nbits, group, method = ASINQ_SPEC
    with reference_matmul():
        s = quantize_model(ref.src_dir, tmp_path / "ours", nbits=nbits, group_size=group, method=method,
                           progress=False)
    assert s.calibration.startswith("built-in prompts") and "13 samples x 128 tokens" in s.calibration
    assert len(s.calibrated_layers) == len(s.quantized) == 14  # every block Linear, none gated (Gaussian weights)
    count = assert_same_checkpoint(tmp_path / "ours", ref.safetensors_dir)
    print(f"A-SINQ {arch}: {count} SINQ tensors bit-identical to the reference")
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]
    assert cfg["method"] == "asinq"


@needs_reference
@needs_tokenizer
def test_asinq_model_fast_matmul_matches_reference_perplexity(tmp_path):
    """The default (fast) scale search on the same model: its SINQ tensors equal the
    reference's, or its perplexity on the calibration prompts is within 0.2% of theirs."""
    from transformers import AutoTokenizer

    from reference_checkpoints import PROMPTS, smollm2_tokenizer_dir
    from reference_dequant import dequantized_model

    prefetch_all()
    ref = repo_checkpoint(*ASINQ_SPEC)
    arch, nbits, group, method = ASINQ_SPEC
    quantize_model(ref.src_dir, tmp_path / "ours", nbits=nbits, group_size=group, method=method, progress=False)
    a, b = sinq_tensors(tmp_path / "ours"), sinq_tensors(ref.safetensors_dir)
    differ = [k for k in b if not torch.equal(a[k], b[k])]
    tok = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()))
    ids = torch.tensor([sum((tok.encode(p) for p in PROMPTS), [])[:512]])

    def ppl(d: Path) -> float:
        with torch.no_grad():
            return float(torch.exp(dequantized_model(d, dtype=torch.float32)(ids, labels=ids).loss))

    ours, theirs = ppl(tmp_path / "ours"), ppl(ref.safetensors_dir)
    print(f"A-SINQ {arch}, fast matmul: {len(differ)}/{len(b)} SINQ tensors differ from the reference; "
          f"ppl ours {ours:.4f}, theirs {theirs:.4f} ({(ours / theirs - 1) * 100:+.3f}%)")
    assert not differ or abs(ours / theirs - 1) <= 0.002


@needs_reference
@pytest.mark.parametrize("spec", NF_SPECS, ids=[s[3] for s in NF_SPECS])
def test_nf_model_bit_identical_to_reference(spec, tmp_path):
    prefetch_all()
    ref = repo_checkpoint(*spec)
    arch, nbits, group, ref_method = spec
    aux = ref_method.endswith("_quantAux")
    ours = tmp_path / "ours"
    quantize_model(ref.src_dir, ours, group_size=group, method=ref_method.removesuffix("_quantAux"), aux=aux,
                   progress=False)
    assert json.loads((ours / "config.json").read_text())["quantization_config"]["nbits"] == nbits  # method default
    count = assert_same_checkpoint(ours, ref.safetensors_dir)
    print(f"{ref_method} {arch}: {count} SINQ tensors bit-identical to the reference")


# ---------------------------------------------------------------------------------------
# options and bad input (no reference needed)


def test_cli_lists_every_method():
    from sinq_vllm.cli.main import QUANTIZE_METHODS

    assert list(QUANTIZE_METHODS) == list(METHODS)


def test_unknown_method_lists_the_valid_ones(model_factory, tmp_path):
    with pytest.raises(SinqConfigError, match=r"method='nf4' is not supported; choose one of \['sinq', 'asinq', "
                                              r"'sinq_nf4', 'sinq_nf3', 'sinq_fit', 'sinq_gptq', 'rtn'\]"):
        quantize_model(model_factory("llama"), tmp_path / "out", method="nf4")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method,nbits,match", [
    ("sinq_nf4", 3, r"sinq_nf4.*4-bit.*nbits=3.*--method sinq_nf3"),
    ("sinq_nf3", 4, r"sinq_nf3.*3-bit.*nbits=4"),
])
def test_codebook_needs_its_bit_width(model_factory, tmp_path, method, nbits, match):
    with pytest.raises(SinqConfigError, match=match):
        quantize_model(model_factory("llama"), tmp_path / "out", nbits=nbits, method=method)


def test_nf3_defaults_to_3_bits(model_factory, tmp_path):
    s = quantize_model(model_factory("qwen3"), tmp_path / "out", method="sinq_nf3", progress=False)
    side = json.loads((tmp_path / "out" / SIDECAR).read_text())
    assert s.nbits == 3 and {e["meta"]["method"] for e in side.values()} == {"sinq_nf3_quantAux"}
    assert {e["meta"]["nbits"] for e in side.values()} == {3}


def _calib_error(src, tmp_path, match, **kw):
    out = tmp_path / "out"
    with pytest.raises(SinqConfigError, match=match):
        quantize_model(src, out, method=kw.pop("method", "asinq"), progress=False, **kw)
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_bad_calibration_data(model_factory, tmp_path):
    src = model_factory("llama")
    empty, binary, bad_jsonl, no_text = (tmp_path / n for n in ("empty.txt", "bin.txt", "bad.jsonl", "x.jsonl"))
    empty.write_text("  \n\n")
    binary.write_bytes(b"caf\xe9 \xff\xfe text")
    bad_jsonl.write_text('{"text": "fine"}\n{"text": unquoted}\n')
    no_text.write_text('{"body": "x"}\n')
    _calib_error(src, tmp_path, r"--calib-data '.*missing.txt': no such file", calib_data=str(tmp_path / "missing.txt"))
    _calib_error(src, tmp_path, r"--calib-data '.*empty.txt': the file is empty", calib_data=str(empty))
    _calib_error(src, tmp_path, r"bin.txt': not UTF-8 text \(undecodable byte at offset 3\)", calib_data=str(binary))
    _calib_error(src, tmp_path, r"bad.jsonl': line 2 is not JSON", calib_data=str(bad_jsonl))
    _calib_error(src, tmp_path, r"x.jsonl': line 1 is neither a JSON string nor an object with a \"text\"",
                 calib_data=str(no_text))
    _calib_error(src, tmp_path, r"--calib-samples=0 must be a positive integer", calib_samples=0)
    _calib_error(src, tmp_path, r"calibrate the methods \['asinq', 'sinq_gptq'\], not method 'sinq'", method="sinq",
                 calib_data=str(empty))
    short = tmp_path / "short.txt"
    short.write_text("A few words.")
    _calib_error(src, tmp_path, r"short.txt': its text gives \d+ tokens, fewer than one --calib-seqlen 64 sample",
                 calib_data=str(short), calib_seqlen=64)


def test_builtin_prompts_need_a_real_tokenizer(model_factory, tmp_path):
    """The tiny 512-token vocabulary makes every built-in prompt longer than the 512 tokens
    the reference keeps: no sample, said before anything runs."""
    _calib_error(model_factory("llama"), tmp_path, r"built-in A-SINQ calibration prompts give no 128-token sample.*"
                 r"--calib-data")


def test_asinq_with_calibration_file(model_factory, tmp_path):
    """Plain text and jsonl give samples of the requested shape; the scale is searched for
    every decoder-block layer; lm_head (outside the blocks, quantized on request) is not."""
    src = model_factory("qwen3")
    text = tmp_path / "calib.txt"
    text.write_text("Once upon a time there was a little fox who lived in the woods.\n" * 60)
    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"Story {i}: the fox ran to the river and back again."})
                               for i in range(80)))
    for data in (text, jsonl):
        out = tmp_path / data.suffix[1:]
        s = quantize_model(src, out, method="asinq", calib_data=str(data), calib_samples=3, calib_seqlen=32,
                           lm_head=True, progress=False)
        assert s.calibration == f"{data.name}: 3 samples x 32 tokens"
        assert "lm_head" in s.quantized and "lm_head" not in s.calibrated_layers
        assert len(s.calibrated_layers) == len(s.quantized) - 1 == 2 * 7
        side = json.loads((out / SIDECAR).read_text())
        assert side["model.layers.0.self_attn.q_proj"]["meta"]["method"] == "sinq_awq_l1_quantAux"


def test_asinq_without_calibration_path_names_the_module(tmp_path):
    """OPT keeps its blocks at model.decoder.layers, where A-SINQ's block-wise forward (as the
    reference's) does not look."""
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    from tiny_models import make_tokenizer

    src = tmp_path / "opt"
    cfg = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=1, num_attention_heads=2, vocab_size=512,
                    word_embed_proj_dim=64, max_position_embeddings=128)
    OPTForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(src))
    AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path / "tok"))).save_pretrained(str(src))
    _calib_error(src, tmp_path, r"OPTForCausalLM has no calibration path: module 'model' \(OPTModel\) "
                 r"has no layers / embed_tokens.*--method sinq")


def test_asinq_refuses_fused_moe_experts(model_factory, tmp_path):
    src = model_factory("qwen3_moe", num_hidden_layers=2, mlp_only_layers=[1])
    _calib_error(src, tmp_path, r"MoE experts of 'model.layers.0.mlp.experts' have no calibration path.*--no-experts")
