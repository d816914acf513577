"""Checkpoints written by the reference SINQ code load in vLLM and match its own forward.

The reference implementation (PyPI ``sinq==0.2.0``) quantizes tiny random models on CPU
and saves them with each of its writers; ``reference_checkpoints`` runs it in a
subprocess and caches the folders with the reference model's own float32 forward
(prompt log-probabilities, 32 greedy tokens). Here vLLM (float32, eager) serves each
folder and is compared with those outputs:

=====================  ======================================================  =======
kind                   how it was written                                      engine
=====================  ======================================================  =======
repo safetensors       ``AutoSINQHFModel.save_quantized_safetensors``: no       3
                       quantization_config, detected from the sidecar (Qwen3
                       4-bit g64, Llama 3-bit g128 with the K fallback, Qwen2
                       with q/k/v biases and ``--quantization sinq``)
repo ``qmodel.pt``     ``AutoSINQHFModel.save_quantized`` then                  1
                       ``sinq-vllm convert`` (Qwen2)
Transformers           ``from_pretrained(quantization_config=SinqConfig(4,     1
                       64))`` + patched ``save_pretrained``: lm_head quantized,
                       q/k/v biases dropped (Qwen2)
legacy variants        a repo checkpoint rewritten with the extra ``model.``    1
                       prefix (reference commit 9a9812f), unpacked ``W_q`` in
                       layer 1 (gemlite era) and fp16 non-aux scales/zeros in
                       layer 0 (paper-eval ``sinq_nogemlite``)
NF4 / NF3              the repo API with ``method="sinq_nf4"`` (Qwen3, fp16     2
                       scales/zeros) and ``"sinq_nf3_quantAux"`` (Llama,
                       g128 with the K fallback)
A-SINQ                 the repo API with ``method="asinq"`` on its built-in     1
                       calibration prompts (Llama with SmolLM2's tokenizer)
=====================  ======================================================  =======

Transformers' ``SinqConfig`` cannot write NF4/NF3 or A-SINQ checkpoints (it accepts
``method`` "sinq" or "asinq", and "asinq" only for already quantized checkpoints);
``test_transformers_writes_no_nf_or_asinq`` guards that fact, so the day it changes the
missing layout shows up here.

The reference's NF branch computes ``(CB[Q] - z) * s * t`` in fp16 (each step rounded,
docs/format.md §1.7) where its uniform branch uses the compute dtype; its forward here runs
that branch in float32 on the same stored values and fp16 codebook (tests/reference_checkpoints.py),
and what the fp16 arithmetic alone moves is printed and bounded separately.

Tolerance: both sides dequantize the same codes/scales/zeros to float32 (the reference
as ``((Q - z) * s) * t``, vLLM applying ``t`` to the activations) and run float32
transformer blocks, so the only differences are float32 rounding and summation order:
we require max |prompt logprob diff| < 2e-3 (measured 1.7e-5 to 2.5e-5 for every kind)
and identical greedy tokens for 32 steps with EOS ignored (the reference's smallest top-2
logit margin on these prompts is 4e-4, far above float32 noise).
"""

from __future__ import annotations

import json
import sys
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import vllm_engine
from reference_checkpoints import (
    ASINQ_SPEC,
    GREEDY_STEPS,
    HF_SPEC,
    NF_SPECS,
    REPO_SPECS,
    hf_checkpoint,
    prefetch_all,
    repo_checkpoint,
    skip_reason,
    smollm2_tokenizer_reason,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason())),
]

LOGPROB_TOL = 2e-3
SIDECAR = "model.safetensors.index.json.meta.json"
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def repo():
    prefetch_all()  # all reference processes at once on a cold cache
    return {spec[0]: repo_checkpoint(*spec) for spec in REPO_SPECS}


@pytest.fixture(scope="module")
def hf():
    prefetch_all()
    return hf_checkpoint(*HF_SPEC)


def vllm_outputs(model_dir, prompt_ids, **engine_kwargs):
    """Prompt log-probabilities of the actual next tokens and GREEDY_STEPS greedy tokens."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=GREEDY_STEPS, temperature=0, prompt_logprobs=0, ignore_eos=True)
    with vllm_engine(model_dir, dtype="float32", **engine_kwargs) as llm:
        outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    logprobs = [[pl[ids[i]].logprob for i, pl in enumerate(o.prompt_logprobs) if i > 0]
                for o, ids in zip(outs, prompt_ids)]
    return logprobs, [list(o.outputs[0].token_ids) for o in outs]


def _max_diff(prompt_ids, logprobs, ref_logprobs) -> float:
    worst = 0.0
    for ids, got, want in zip(prompt_ids, logprobs, ref_logprobs):
        expect = [want[i - 1, ids[i]].item() for i in range(1, len(ids))]
        worst = max(worst, max(abs(a - b) for a, b in zip(got, expect)))
    return worst


def compare_with_reference(label, ref, model_dir, oracle_tol: float | None = None,
                           **engine_kwargs) -> float:
    """vLLM (float32) vs the reference's own forward: prompt log-probs within LOGPROB_TOL, the
    same greedy tokens. ``oracle_tol``: also vs Transformers on our
    independent float32 dequantization (tests/reference_dequant.py), within that tolerance."""
    logprobs, greedy = vllm_outputs(model_dir, ref.prompt_ids, **engine_kwargs)
    worst = _max_diff(ref.prompt_ids, logprobs, ref.logprobs)
    print(f"{label}: max |prompt logprob diff| vs the reference forward = {worst:.3g}")
    assert worst < LOGPROB_TOL, f"{label}: max |logprob diff| {worst:.3g} >= {LOGPROB_TOL}"
    for p, (got, want, margins) in enumerate(zip(greedy, ref.greedy, ref.margins)):
        if got != want:
            step = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
            pytest.fail(f"{label}: prompt {p}: greedy tokens differ from step {step} (reference top-2 logit "
                        f"margin there {margins[step]:.3g}): vLLM {got} vs reference {want}")
    if oracle_tol is not None:
        from reference_dequant import dequantized_model

        model = dequantized_model(model_dir, dtype=torch.float32)
        with torch.no_grad():
            exact = [torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1) for ids in ref.prompt_ids]
        diff = _max_diff(ref.prompt_ids, logprobs, exact)
        print(f"{label}: max |prompt logprob diff| vs Transformers on the float32 dequantization = {diff:.3g}")
        assert diff < oracle_tol
    return worst


# ---------------------------------------------------------------------------------------
# repo API: save_quantized_safetensors


@pytest.mark.parametrize("arch", [s[0] for s in REPO_SPECS])
def test_repo_safetensors_checkpoint_matches_reference(arch, repo):
    ckpt = repo[arch]
    config = json.loads((ckpt.safetensors_dir / "config.json").read_text())
    assert "quantization_config" not in config  # what makes it a sidecar-only checkpoint
    # Qwen2 also checks the explicit flag; the others rely on sidecar auto-detection.
    kwargs = {"quantization": "sinq"} if arch == "qwen2" else {}
    compare_with_reference(f"repo safetensors {arch}", ckpt.outputs, ckpt.safetensors_dir, **kwargs)


# ---------------------------------------------------------------------------------------
# the rest of the family: NF4 / NF3 codebooks and A-SINQ, written by the repo API


@pytest.mark.parametrize("spec", NF_SPECS, ids=[s[3] for s in NF_SPECS])
def test_repo_nf_checkpoint_matches_reference(spec):
    prefetch_all()
    ckpt = repo_checkpoint(*spec)
    side = json.loads((ckpt.safetensors_dir / SIDECAR).read_text())
    assert {e["meta"]["method"] for e in side.values()} == {spec[3]}
    label = f"repo {spec[3]} {spec[0]} {spec[1]}-bit g{spec[2]}"
    compare_with_reference(label, ckpt.outputs, ckpt.safetensors_dir, oracle_tol=1e-4)
    # the reference's fp16 NF arithmetic (three roundings per weight) against its float32 run
    fp16 = _max_diff(ckpt.outputs.prompt_ids, [[lp[i - 1, ids[i]].item() for i in range(1, len(ids))]
                                               for ids, lp in zip(ckpt.outputs.prompt_ids, ckpt.outputs.logprobs)],
                     ckpt.outputs_nf_fp16.logprobs)
    print(f"{label}: the reference's own fp16 NF arithmetic moves its prompt log-probs by {fp16:.3g}")
    assert 0 < fp16 < 1e-2


@pytest.mark.skipif(smollm2_tokenizer_reason() is not None, reason=str(smollm2_tokenizer_reason()))
def test_repo_asinq_checkpoint_matches_reference():
    prefetch_all()
    ckpt = repo_checkpoint(*ASINQ_SPEC)
    side = json.loads((ckpt.safetensors_dir / SIDECAR).read_text())
    assert {e["meta"]["method"] for e in side.values()} == {"sinq_awq_l1_quantAux"}
    compare_with_reference("repo asinq llama 4-bit g64", ckpt.outputs, ckpt.safetensors_dir)


def test_transformers_writes_no_nf_or_asinq():
    from transformers import SinqConfig

    for method in ("sinq_nf4", "sinq_nf3", "sinq_awq_l1"):
        with pytest.raises(ValueError, match="method"):
            SinqConfig(method=method)
    assert SinqConfig(method="asinq").method == "asinq"  # accepted, but only for pre-quantized models:
    from transformers.quantizers.quantizer_sinq import SinqHfQuantizer

    with pytest.raises(ValueError, match="asinq"):
        SinqHfQuantizer(SinqConfig(method="asinq"), pre_quantized=False).validate_environment()


# ---------------------------------------------------------------------------------------
# repo API: save_quantized -> qmodel.pt -> sinq-vllm convert


def test_repo_pt_checkpoint_converted_matches_reference(repo, tmp_path):
    from sinq_vllm.cli import main

    ckpt = repo["qwen2"]
    out = tmp_path / "converted"
    assert main(["convert", str(ckpt.pt_dir), str(out)]) == 0
    compare_with_reference("repo qmodel.pt converted (qwen2)", ckpt.outputs, out)


# ---------------------------------------------------------------------------------------
# Transformers SinqConfig + save_pretrained


def test_transformers_sinqconfig_checkpoint_matches_reference(hf, capfd):
    ckpt, outputs = hf
    config = json.loads((ckpt / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "sinq"
    side = json.loads((ckpt / SIDECAR).read_text())
    assert "lm_head" in side  # SinqConfig's default quantizes the output head
    index = json.loads((ckpt / INDEX).read_text())["weight_map"]
    assert not any(k.endswith("proj.bias") for k in index)  # and drops the Linear biases
    # vLLM must serve the SINQ lm_head packed and zero the missing q/k/v biases (the
    # reference forward has none either).
    compare_with_reference("transformers SinqConfig (qwen2)", outputs, ckpt)
    out, err = capfd.readouterr()  # the engine processes share the test's stdout/stderr
    assert "no bias for" in out + err  # the loader says that it zeroed the missing biases
    assert "'lm_head' is served packed" in out + err
    sys.__stdout__.write("".join(line + "\n" for line in out.splitlines() if "max |prompt logprob diff|" in line))


# ---------------------------------------------------------------------------------------
# legacy variants (docs/format.md §2.11), one engine for all three


def make_legacy_variant(src, dst, *, prefix=True, unpacked_layer=1, plain_layer=0):
    """Copy a repo checkpoint and rewrite it the way older reference versions wrote it.

    * ``prefix``: every tensor and sidecar name gets one extra ``model.`` (commit 9a9812f).
    * ``unpacked_layer``: W_q of that decoder layer stored unpacked, codes as uint8 ``[R, g]``
      (numel == N*K) while the sidecar still says the packed format (gemlite era).
    * ``plain_layer``: that layer without quantAux: fp16 ``meta.scale``/``meta.zero`` [R, 1]
      equal to the dequantized aux values, method without ``quantAux`` and, as the
      reference's writer does for plain tensors, no ``scale.shape``/``zero.shape`` in the sidecar.
    The dequantized weights are unchanged, so the reference outputs still apply.
    """
    from sinq_vllm.format.packing import unpack_planar

    shutil.copytree(src, dst)
    side = json.loads((dst / SIDECAR).read_text())
    index = json.loads((dst / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 1, shards
    tensors = load_file(dst / shards[0])

    def in_layer(name, layer):
        return layer is not None and f".layers.{layer}." in name

    for name, entry in side.items():
        meta = entry["meta"]
        n, k = meta["shape"]
        rows = meta["scale.shape"][0]
        if in_layer(name, unpacked_layer):
            tensors[f"{name}.W_q"] = unpack_planar(tensors[f"{name}.W_q"], meta["packing"], rows).reshape(rows, -1)
        if in_layer(name, plain_layer):
            for what in ("scale", "zero"):
                x, s, m = (tensors.pop(f"{name}.meta.{what}.{p}") for p in "xsm")
                tensors[f"{name}.meta.{what}"] = (x * s + m).view(rows, 1)
                meta.pop(f"{what}.shape")
            meta["method"] = "sinq_nogemlite"
    if prefix:
        tensors = {f"model.{k}": v for k, v in tensors.items()}
        side = {f"model.{k}": v for k, v in side.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, dst / shards[0])
    index["weight_map"] = {k: shards[0] for k in tensors}
    (dst / INDEX).write_text(json.dumps(index))
    (dst / SIDECAR).write_text(json.dumps(side))
    return dst


def test_legacy_variants_match_reference(repo, tmp_path):
    ckpt = repo["qwen3"]
    legacy = make_legacy_variant(ckpt.safetensors_dir, tmp_path / "legacy")
    names = json.loads((legacy / INDEX).read_text())["weight_map"]
    assert "model.model.layers.1.mlp.down_proj.W_q" in names and "model.lm_head.weight" in names
    compare_with_reference("legacy: model. prefix + unpacked W_q + non-aux (qwen3)", ckpt.outputs, legacy)


# ---------------------------------------------------------------------------------------
# the same variants at the config / assembly level (no engine): which one breaks, if any


def _module_tensors(ckpt_dir, module):
    index = json.loads((ckpt_dir / INDEX).read_text())["weight_map"]
    shard = load_file(ckpt_dir / index[f"{module}.W_q"])
    return {k[len(module) + 1:]: v for k, v in shard.items() if k.startswith(module + ".")}


def test_reference_rotary_buffers_are_dropped_by_the_weight_mapper(repo):
    """save_quantized_safetensors stores rotary_emb.inv_freq and .original_inv_freq;
    vLLM's own mapper drops only inv_freq, so ours must drop original_inv_freq."""
    from vllm.model_executor.models.utils import AutoWeightsLoader

    from sinq_vllm.vllm.config import SinqConfig

    ckpt = repo["qwen3"].safetensors_dir
    names = json.loads((ckpt / INDEX).read_text())["weight_map"]
    buffers = sorted(n for n in names if "rotary_emb." in n)
    assert buffers == ["model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"]
    cfg = SinqConfig()
    cfg.maybe_update_config(str(ckpt))
    mapper = cfg.get_checkpoint_weight_mapper() | AutoWeightsLoader.REMOVE_UNUSED_ROTARY_EMBEDS_MAPPER
    ignored = tuple(getattr(cfg, "_ignore_unexpected_suffixes", None) or ())

    def dropped(name):
        mapped = mapper.map_name(name)
        return mapped is None or (bool(ignored) and mapped.endswith(ignored))

    assert {n: dropped(n) for n in buffers} == {n: True for n in buffers}


def test_legacy_model_prefix_is_mapped(repo, tmp_path):
    from sinq_vllm.vllm.config import SinqConfig

    legacy = make_legacy_variant(repo["qwen3"].safetensors_dir, tmp_path / "prefixed",
                                 unpacked_layer=None, plain_layer=None)
    cfg = SinqConfig()
    cfg.maybe_update_config(str(legacy))
    assert cfg.legacy_model_prefix
    assert "model.layers.0.self_attn.q_proj" in cfg.layer_metas
    mapper = cfg.get_checkpoint_weight_mapper()
    assert mapper.map_name("model.model.layers.0.self_attn.q_proj.W_q") == "model.layers.0.self_attn.q_proj.W_q"
    assert mapper.map_name("model.model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert mapper.map_name("model.lm_head.weight") == "lm_head.weight"


@pytest.mark.parametrize("layout", ["grouped", "matrix"])
def test_unpacked_codes_decode_like_packed(repo, layout):
    """Gemlite-era W_q: the codes unpacked ([R, g] or [N, K]) while meta.packing says packed."""
    from sinq_vllm.vllm.assembly import ShardSlice, decode_shard
    from sinq_vllm.format.checkpoint import read_layer_metas
    from sinq_vllm.format.packing import unpack_planar

    for arch in ("qwen3", "llama"):  # 4-bit u8 and 3-bit int32 planar packing
        ckpt = repo[arch].safetensors_dir
        for name, meta in read_layer_metas(str(ckpt)).items():
            tensors = _module_tensors(ckpt, name)
            n, k, r = meta.out_features, meta.in_features, meta.grouped_rows
            codes = unpack_planar(tensors["W_q"], meta.packing, r)
            legacy = dict(tensors, W_q=codes if layout == "grouped" else codes.reshape(n, k))
            part = ShardSlice(0, n, 0, k)
            want, got = decode_shard(meta, tensors, part), decode_shard(meta, legacy, part)
            assert all(torch.equal(a, b) for a, b in zip(want, got)), name


def test_plain_reference_sidecar_entries_parse(repo, tmp_path):
    """Non-aux layers as the reference writes them: fp16 meta.scale/meta.zero and no
    scale.shape/zero.shape in the sidecar (its writer records shapes only for quantAux)."""
    from sinq_vllm.format.checkpoint import read_layer_metas

    legacy = make_legacy_variant(repo["llama"].safetensors_dir, tmp_path / "plain", prefix=False,
                                 unpacked_layer=None, plain_layer=0)
    metas = read_layer_metas(str(legacy))
    down = metas["model.layers.0.mlp.down_proj"]  # K=192 at g128: the tile fallback to 64
    assert not down.aux and down.group_size == 64 and down.grouped_rows == 128 * 3
    assert all(not m.aux for n, m in metas.items() if ".layers.0." in n)
