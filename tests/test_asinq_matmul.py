"""A-SINQ's two ways to score its 20 candidate scales (sinq_vllm/quantizer/awq.py).

``"exact"`` runs the reference's fp16 matmuls (bit-identical checkpoints:
test_reference_parity.py per layer, test_family_quantizer.py per model, both inside
``reference_matmul()``). ``"fast"``, the default, runs them as fp32 GEMMs rounded to fp16:
the same products, summed in another order. What it may change is which alpha wins a
near-tie, so its parity is stated on the search's own objective here (the exact L1 output
error of the chosen scale, within 0.2% of the exact path's) and on perplexity in
benchmarks/results/quality_family_*.md. No reference package needed: the exact path is
torch's own fp16 matmul.
"""

from __future__ import annotations

import pytest
import torch

from reference_checkpoints import PARITY_CASES, _case, make_activations, make_weight
from reference_dequant import dequant_layer
from sinq_vllm.quantizer import quantize_weight_detailed
from sinq_vllm.quantizer.awq import fp16_matmul, reference_matmul

# the layer cases of the parity suite, plus SmolLM2-135M's shapes (q/o, k/v, gate/up, down)
# with its calibration length, where products are long enough for the orders to differ
CASES = [c for c in PARITY_CASES if c["method"] == "asinq"] + [
    _case("smollm2_q", (576, 576), 4, 64, method="asinq", acts=(2, 128)),
    _case("smollm2_kv", (192, 576), 3, 64, method="asinq", acts=(2, 128)),
    _case("smollm2_up", (1536, 576), 4, 64, method="asinq", acts=(2, 128)),
    _case("smollm2_down", (576, 1536), 4, 128, method="asinq", acts=(2, 128)),
]


def _quantize(case, matmul: str):
    w, x = make_weight(case), make_activations(case)
    if matmul == "exact":
        with reference_matmul():
            q = quantize_weight_detailed(w, case["nbits"], case["group_size"], method="asinq", aux=case["aux"],
                                         activations=x)
    else:
        q = quantize_weight_detailed(w, case["nbits"], case["group_size"], method="asinq", aux=case["aux"],
                                     activations=x)
    return q, dequant_layer(q.tensors, q.meta.to_sidecar())


def _l1_error(case, wq: torch.Tensor) -> float:
    """mean |x W^T - x Wq^T| in float64: what the scale search minimises, without its rounding."""
    w = make_weight(case).to(torch.float16).double()  # the search's weight (fp16, as the reference's)
    x = make_activations(case).to(torch.float16).double().reshape(-1, w.shape[1])
    return float((x @ (w - wq.double()).T).abs().mean())


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_fast_scale_search_within_0p2_percent_of_exact(case):
    q_exact, w_exact = _quantize(case, "exact")
    q_fast, w_fast = _quantize(case, "fast")
    assert q_fast.calibrated == q_exact.calibrated
    same = all(torch.equal(q_fast.tensors[k], q_exact.tensors[k]) for k in q_exact.tensors)
    e_exact, e_fast = _l1_error(case, w_exact), _l1_error(case, w_fast)
    print(f"{case['name']}: {'same tensors' if same else 'another alpha'}; L1 error exact {e_exact:.6g}, "
          f"fast {e_fast:.6g} ({(e_fast / e_exact - 1) * 100:+.3f}%)")
    assert same or abs(e_fast / e_exact - 1) <= 0.002


@pytest.mark.parametrize("m, k, n", [(256, 576, 576), (256, 1536, 576), (80, 100, 48)])
def test_fast_products_differ_from_fp16_matmul_only_by_summation_order(m, k, n):
    """The claim behind the fast path: fp16 inputs, exact fp32 products, only the order of the
    fp32 sums differs. So under 1% of the outputs differ, and each by at most one fp16 spacing
    plus twice the fp32 summation error bound ``K * 2^-24 * sum|x_k w_k|`` (the two sums each
    within it of the exact one; that term dominates where the sum cancels)."""
    gen = torch.Generator().manual_seed(m * k + n)
    x = (torch.randn(2, m // 2, k, generator=gen) * torch.exp(torch.randn(k, generator=gen))).to(torch.float16)
    w = (0.05 * torch.randn(n, k, generator=gen)).to(torch.float16).T  # the [K, N] view the search passes
    exact, fast = fp16_matmul(x, "exact")(w), fp16_matmul(x, "fast")(w)
    assert fast.dtype == exact.dtype == torch.float16 and fast.shape == exact.shape
    assert float((fast != exact).float().mean()) < 0.01
    inf = torch.tensor(float("inf"), dtype=torch.float16)
    top = torch.maximum(exact.abs(), fast.abs())
    spacing = torch.nextafter(top, inf).float() - top.float()
    bound = spacing + 2 * k * 2.0**-24 * (x.float().abs() @ w.float().abs())
    assert bool(((fast.float() - exact.float()).abs() <= bound).all())


def test_unknown_matmul_mode_is_refused():
    with pytest.raises(ValueError, match=r"A-SINQ matmul='fp8' is not one of \['fast', 'exact'\]"):
        fp16_matmul(torch.zeros(1, 1, 4, dtype=torch.float16), "fp8")


def test_reference_matmul_is_scoped():
    x = torch.ones(1, 2, 4, dtype=torch.float16)
    w = torch.ones(4, 3, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="inside"):
        with reference_matmul():
            assert torch.equal(fp16_matmul(x)(w), x @ w)
            raise RuntimeError("inside")
    import sinq_vllm.quantizer.awq as awq

    assert awq._matmul_mode == "fast"  # restored after the exception
