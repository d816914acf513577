"""Layer-level screening of sinq_gptq's choices (benchmarks/results/quality_ablation.md §4).

For 12 Linear layers of a model (q_proj, o_proj, gate_proj, down_proj of an early, a middle
and a late decoder block) the inputs on 128 samples x 128 tokens of the first half of
c4.utf8 are collected block by block (the quantizer's own collector, bf16, unquantized
model). Samples 0-63 calibrate (their Hessian), samples 64-127 evaluate: the relative output
error ``|X (W - W_hat)^T|^2 / |X W^T|^2`` on held-out tokens, with ``W_hat`` read back from
the stored tensors (quantAux). Printed per layer and as the geometric mean over layers.

    python benchmarks/ablation_gptq.py --model smollm2-135m --setting 4:64
    python benchmarks/ablation_gptq.py --model gemma3-270m --setting 3:64 --variants fit,gptq,one

Variants: ``fit`` (sinq_fit, no calibration), ``gptq`` (sinq_gptq's defaults), ``one`` /
``sinkhorn`` (its column scale: t = 1 / Sinkhorn's without refinement), ``damp001`` /
``damp03`` (Hessian damping 0.01 / 0.3 instead of 0.1), ``calib16`` (calibrated on 16 samples
only), ``cd1`` / ``cd3`` / ``cd8`` (then 1 / 3 / 8 passes of coordinate descent on the codes),
``cd3damp001`` (3 passes, damping 0.01).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import common as C

VARIANTS = {
    "fit": None,
    "gptq": {},
    "one": {"column_scale": "one"},
    "sinkhorn": {"column_scale": "sinkhorn"},
    "damp001": {"damp": 0.01},
    "damp03": {"damp": 0.3},
    "calib16": {},
    "cd0": {"cd_passes": 0},
    "cd1": {"cd_passes": 1},
    "cd3": {"cd_passes": 3},
    "cd8": {"cd_passes": 8},
    "cd3damp001": {"cd_passes": 3, "damp": 0.01},
}
MODELS = {"smollm2-135m": C.smollm2_bf16, "gemma3-270m": C.gemma3_bf16}
SUBLAYERS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def collect(name: str):
    """``{module: (weight, inputs [128, 128, K] bf16)}``, cached under artifacts/bench."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from sinq_vllm.quantizer.activations import BlockActivations
    from sinq_vllm.quantizer.calibration import calibration_set

    cache = C.artifacts_dir("bench") / f"{name}-ablation-layers-c4-first-half-128x128.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    src = MODELS[name]()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(src)), attn_implementation="sdpa")
    handles = {f: safe_open(f, framework="pt") for f in sorted(src.glob("*.safetensors"))}
    where = {k: h for h in handles.values() for k in h.keys()}
    calib = calibration_set(AutoTokenizer.from_pretrained(str(src)), str(C.corpus_half_file("c4", 0)), 128, 128)
    acts = BlockActivations(model, lambda k: where[k].get_tensor(k), set(where), calib.samples)
    blocks = len(acts.blocks)
    out = {}
    for b in (1, blocks // 2, blocks - 2):
        for sub in SUBLAYERS:
            module = f"{acts.prefix}.{b}.{sub}"
            out[module] = (where[module + ".weight"].get_tensor(module + ".weight"), acts.for_module(module))
    torch.save(out, cache)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2-135m")
    ap.add_argument("--setting", default="4:64", help="NBITS:GROUP (default 4:64)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {','.join(VARIANTS)}")
    args = ap.parse_args(argv)
    C.setup_env()
    import torch

    from sinq_vllm.format.decode import decode_module
    from sinq_vllm.quantizer.layer import quantize_weight_detailed

    torch.set_num_threads(1)
    nbits, group = (int(v) for v in args.setting.split(":"))
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    C.log(f"{args.model} {nbits}-bit g{group}: collecting layer inputs ...")
    layers = collect(args.model)
    import sinq_vllm.quantizer.layer as layer_mod

    gptq = layer_mod.gptq_tile_quantize
    errors: dict[str, list[float]] = {v: [] for v in variants}
    for module, (w, x) in layers.items():
        n, k = w.shape
        held_out = x[64:].float().reshape(-1, k)
        ref = float((held_out @ w.float().T).pow(2).sum())
        cells = []
        for v in variants:
            opts = VARIANTS[v]
            calib = x[:16] if v == "calib16" else x[:64]
            method = "sinq_fit" if opts is None else "sinq_gptq"
            layer_mod.gptq_tile_quantize = (lambda *a, _o=opts or {}, **kw: gptq(*a, **kw, **_o))
            t0 = time.process_time()
            try:
                q = quantize_weight_detailed(w, nbits, group, method=method, aux=True, name=module,
                                             activations=calib if method == "sinq_gptq" else None)
            finally:
                layer_mod.gptq_tile_quantize = gptq
            d = decode_module(q.meta, q.tensors)
            g = q.meta.group_size
            w_hat = ((d.codes.float().view(n, -1, g) - d.zeros.float()[..., None]) * d.scales.float()[..., None])
            w_hat = w_hat.view(n, k) * d.col_scale.float()
            err = float((held_out @ (w.float() - w_hat).T).pow(2).sum()) / ref
            errors[v].append(err)
            cells.append(f"{v}={err:.5f} ({time.process_time() - t0:.1f} s)")
        print(module, " ".join(cells), flush=True)
    geo = {v: math.exp(sum(map(math.log, e)) / len(e)) for v, e in errors.items()}
    print(C.md_table(["variant", "output error, geo-mean", "vs fit"],
                     [[v, f"{geo[v]:.6f}", f"{geo[v] / geo['fit']:.2f}x" if "fit" in geo else ""] for v in variants]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
