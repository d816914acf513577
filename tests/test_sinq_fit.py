"""sinq_fit: the calibration-free method that fits SINQ's scales, zeros and column scales to
the weights (sinq_vllm/quantizer/groupfit.py, sinq_fit.py, csrc/cpu/sinq_group_fit.cpp).

Checked here: the least-squares group fit never does worse than min-max RTN on any group;
each refinement step (Lloyd step, column-scale step) never raises the error it minimizes;
the native ops agree with the torch versions; a layer written by sinq_fit is a SINQ layer
(same tensors, method strings, format) with a lower weight error than SINQ's; and the
reference implementation (sinq==0.2.0) loads a sinq_fit checkpoint and dequantizes it to
exactly our weights.
"""

from __future__ import annotations

import json

import pytest
import torch

from sinq_vllm.quantizer import groupfit, sinq_fit
from sinq_vllm.quantizer.layer import quantize_weight, quantize_weight_detailed
from sinq_vllm.quantizer.native_ops import native_op


def _slabs(t=3, n=40, g=64, seed=0, heavy=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n, g, generator=gen)
    if heavy:  # per-column spread and a few outliers, as real weights have
        x = x * torch.exp(0.5 * torch.randn(t, 1, g, generator=gen))
        x[0, 3, 5] = 12.0
    return x


def _group_err(x, s, z, nbits):
    q = groupfit.nearest_codes(x, s, z, nbits)
    return ((x - (q - z) * s) ** 2).sum(-1, keepdim=True)


def _rtn(x, nbits, float_zero=False):
    """min-max RTN's scale and zero (rtn.py rounds the zero; ``float_zero`` keeps it exact,
    which is the range search's ``delta = 0`` candidate)."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    s = (hi - lo).clamp(min=1e-4) / (2**nbits - 1)
    return s, (-lo / s) if float_zero else -torch.round(lo / s)


def _native_or_skip(name):
    op = native_op(name)
    if op is None:
        pytest.skip(f"the CPU extension ({name}) is not built")
    return op


@pytest.mark.parametrize("nbits", [2, 3, 4])
@pytest.mark.parametrize("native", [False, True])
def test_group_fit_never_worse_than_min_max(nbits, native):
    if native:
        _native_or_skip("group_fit")
    x = _slabs()
    s, z = groupfit.fit_groups(x, nbits, native=native)
    assert s.shape == z.shape == (3, 40, 1) and s.dtype == torch.float32
    assert bool((s > 0).all()) and bool(torch.isfinite(z).all())
    fit = _group_err(x, s, z, nbits)
    # min-max codes are one of the candidates: per group, never worse than min-max with a float zero
    assert bool((fit <= _group_err(x, *_rtn(x, nbits, float_zero=True), nbits) * (1 + 1e-5) + 1e-9).all())
    # and clearly better in total than RTN (integer zero), which single groups can beat by luck
    assert float(fit.sum()) < 0.85 * float(_group_err(x, *_rtn(x, nbits), nbits).sum())


def test_group_fit_native_matches_torch():
    _native_or_skip("group_fit")
    x = _slabs(t=4, n=96, seed=1)
    for nbits in (3, 4):
        sn, zn = groupfit.fit_groups(x, nbits)
        st, zt = groupfit.fit_groups(x, nbits, native=False)
        en, et = _group_err(x, sn, zn, nbits), _group_err(x, st, zt, nbits)
        # double vs fp32 sums may pick a different, equally good candidate in rare groups
        same = torch.isclose(sn, st, rtol=1e-4) & torch.isclose(zn, zt, rtol=1e-4, atol=1e-4)
        assert float(same.float().mean()) > 0.97
        # where they differ, the candidates were tied in the fit: the totals agree
        assert abs(float(en.sum()) / float(et.sum()) - 1) < 1e-3


def test_group_fit_constant_and_weighted_groups():
    x = _slabs(t=2, n=8, heavy=False)
    x[1, 2] = 0.25  # a constant group: min-max RTN's floor scale, finite zero
    for native in (False, True):
        if native and native_op("group_fit") is None:
            continue
        s, z = groupfit.fit_groups(x, 4, native=native)
        assert torch.isfinite(s).all() and torch.isfinite(z).all()
        assert float(_group_err(x, s, z, 4)[1, 2]) < 1e-8
        # weights: a column with a huge weight is reproduced far better than unweighted
        w = torch.ones(2, 64)
        w[:, 7] = 1e4
        sw, zw = groupfit.fit_groups(x, 4, weights=w, native=native)
        col = lambda s_, z_: (x - (groupfit.nearest_codes(x, s_, z_, 4) - z_) * s_)[..., 7].pow(2).sum()  # noqa: E731
        assert float(col(sw, zw)) < float(col(s, z))


@pytest.mark.parametrize("native", [False, True])
def test_refine_and_column_step_never_raise_the_error(native):
    if native:
        _native_or_skip("column_scale_step")
    x = _slabs(seed=2)
    t = torch.exp(0.3 * torch.randn(3, 64, generator=torch.Generator().manual_seed(5)))
    s, z = groupfit.fit_groups(x / t[:, None, :], 4, native=native)

    def err(t_, s_, z_):  # the weight-domain error of t * s * (Q - z), Q nearest to x / t
        q = groupfit.nearest_codes(x / t_[:, None, :], s_, z_, 4)
        return float(((x - t_[:, None, :] * (q - z_) * s_) ** 2).sum())

    e0 = err(t, s, z)
    t1 = sinq_fit.column_scale_step(x, t, s, z, 4, native=native)
    # for the codes of the old t the new t is the least-squares optimum; recomputed codes only help
    q_old = groupfit.nearest_codes(x / t[:, None, :], s, z, 4)
    fixed = float(((x - t1[:, None, :] * (q_old - z) * s) ** 2).sum())
    assert fixed <= e0 * (1 + 1e-5)
    s1, z1 = groupfit.refine_groups(x / t1[:, None, :], s, z, 4, native=native)
    before = _group_err(x / t1[:, None, :], s, z, 4)
    after = _group_err(x / t1[:, None, :], s1, z1, 4)
    assert bool((after <= before * (1 + 1e-5) + 1e-12).all())
    assert err(t1, s1, z1) < e0


def test_column_step_native_matches_torch():
    _native_or_skip("column_scale_step")
    x = _slabs(t=2, n=64, seed=3)
    t = torch.ones(2, 64)
    s, z = groupfit.fit_groups(x, 4, native=False)
    a = sinq_fit.column_scale_step(x, t, s, z, 4)
    b = sinq_fit.column_scale_step(x, t, s, z, 4, native=False)
    assert torch.allclose(a, b, rtol=1e-5)


def _weight(n=256, k=384, seed=4):
    gen = torch.Generator().manual_seed(seed)
    w = 0.02 * torch.randn(n, k, generator=gen) * torch.exp(0.5 * torch.randn(1, k, generator=gen))
    w[7, 11] = 0.5  # an outlier weight
    return w.bfloat16()


@pytest.mark.parametrize("nbits,group,aux", [(4, 64, True), (3, 64, True), (4, 128, False)])
def test_sinq_fit_layer_is_a_sinq_layer_with_lower_error(nbits, group, aux):
    w = _weight()
    fit, meta = quantize_weight(w, nbits, group, method="sinq_fit", aux=aux)
    ref, ref_meta = quantize_weight(w, nbits, group, method="sinq", aux=aux)
    assert meta.method == ref_meta.method == ("sinq_quantAux" if aux else "sinq")
    assert meta == ref_meta
    assert {k: (v.dtype, v.shape) for k, v in fit.items()} == {k: (v.dtype, v.shape) for k, v in ref.items()}
    from sinq_vllm.format.decode import decode_module

    def err(tensors, m):
        d = decode_module(m, tensors)
        g = m.group_size
        wq = ((d.codes.float().view(256, -1, g) - d.zeros.float()[..., None]) * d.scales.float()[..., None])
        wq = wq.view(256, -1) * d.col_scale.float()
        return float(((wq - w.float()) ** 2).sum())

    assert err(fit, meta) < 0.9 * err(ref, ref_meta)


def test_sinq_fit_codes_nearest_to_the_stored_values():
    """Codes are chosen last, against the fp16 / quantAux values a reader gets back: no code
    moves the reconstruction farther from the weight than its neighbours do."""
    from sinq_vllm.format.decode import decode_module

    w = _weight(seed=6)
    tensors, meta = quantize_weight(w, 4, 64, method="sinq_fit", aux=True)
    d = decode_module(meta, tensors)
    x = w.float().half().float() / d.col_scale.float()
    s = d.scales.float().repeat_interleave(64, 1)
    z = d.zeros.float().repeat_interleave(64, 1)
    q = d.codes.float()
    err = ((q - z) * s - x).abs()
    for step in (-1, 1):
        alt = (q + step).clamp(0, 15)
        assert bool((err <= ((alt - z) * s - x).abs() * (1 + 1e-3) + 1e-6).all())


def test_sinq_fit_has_no_kurtosis_gate():
    w = _weight(seed=8).float()
    w[:, :4] *= 40  # heavy tails: SINQ's gate sends this layer to RTN
    q = quantize_weight_detailed(w.bfloat16(), 4, 64, method="sinq_fit")
    assert not q.kurtosis_gated
    assert quantize_weight_detailed(w.bfloat16(), 4, 64, method="sinq").kurtosis_gated
    assert not bool((q.tensors["meta.scale2"] == 1).all())


def test_sinq_fit_checkpoint_config_is_sinq(sinq_factory):
    d = sinq_factory("llama", method="sinq_fit")
    cfg = json.loads((d / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "sinq" and cfg["method"] == "sinq"  # Transformers' SinqConfig accepts it
    side = json.loads((d / "model.safetensors.index.json.meta.json").read_text())
    assert {v["meta"]["method"] for v in side.values()} == {"sinq_quantAux"}


def test_cli_quantize_method_sinq_fit(model_factory, tmp_path, capsys):
    from sinq_vllm.cli.main import main

    out = tmp_path / "fit"
    src = model_factory("llama")
    rc = main(["quantize", str(src), str(out), "--method", "sinq_fit", "--nbits", "3", "--no-progress"])
    assert rc == 0 and "quantized Linear layers" in capsys.readouterr().out
    side = json.loads((out / "model.safetensors.index.json.meta.json").read_text())
    assert side and all(e["meta"]["method"] == "sinq_quantAux" and e["meta"]["nbits"] == 3 for e in side.values())


def test_reference_loader_reads_a_sinq_fit_checkpoint(sinq_factory, tmp_path):
    """The reference implementation (sinq==0.2.0) reads a sinq_fit checkpoint with its own
    safetensors reader and ``SINQLinear.load_state_dict``, and its ``dequantize()`` equals the
    weights our loader decodes (sinq_vllm.format.decode), bit for bit in float32."""
    from reference_checkpoints import reference_reads, skip_reason
    from reference_dequant import load_checkpoint_layer, quantized_modules

    if skip_reason():
        pytest.skip(skip_reason())
    from sinq_vllm.format.decode import decode_module
    from sinq_vllm.format.layer_meta import LayerMeta

    d = sinq_factory("llama", method="sinq_fit")
    theirs = reference_reads(d, tmp_path / "reference.pt")["weights"]
    mods = quantized_modules(d)
    assert len(theirs) == len(mods) > 0
    by_layer = {name.split("layers.", 1)[-1]: w for name, w in theirs.items()}
    for mod in mods:
        tensors, meta = load_checkpoint_layer(d, mod)
        m = decode_module(LayerMeta.from_sidecar(mod, meta, "sidecar"), tensors)
        n, k = m.codes.shape
        g = k // m.scales.shape[1]
        ours = (m.codes.float().view(n, -1, g) - m.zeros.float()[..., None]) * m.scales.float()[..., None]
        ours = ours.view(n, k) * m.col_scale.float()
        assert torch.equal(by_layer[mod.split("layers.", 1)[-1]], ours), mod
