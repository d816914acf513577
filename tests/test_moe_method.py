"""``SinqMoEMethod`` without an engine (tests/moe_fakes.py): weights fed through its receivers
as vLLM's RoutedExperts.load_weights does, tensor-parallel and expert-parallel slicing, and
the per-expert forward vs a float64 reference on the dequantized checkpoint (reference_dequant).
Tolerance: float32 activations, 1e-4 of the largest output.
"""

from __future__ import annotations

import pytest
import torch

from moe_fakes import load_experts, make_checkpoint_experts, reference_moe_output


def _routing(m, num_experts, top_k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 128, generator=gen)
    w, ids = torch.softmax(torch.randn(m, num_experts, generator=gen), -1).topk(top_k, -1)
    return x, w / w.sum(-1, keepdim=True), ids.to(torch.int32)


def _close(out, ref, tol=1e-4):
    err = (out.double() - ref).abs().max().item()
    assert err <= tol * ref.abs().max().item(), f"max error {err:.3g}, max |ref| {ref.abs().max().item():.3g}"


def test_tensor_parallel_ranks_sum_to_the_full_layer():
    ckpt = make_checkpoint_experts(4, 128, 128, seed=1)
    x, w, ids = _routing(7, 4, 2)
    full = reference_moe_output(ckpt, x, w, ids)
    total = torch.zeros_like(full)
    for rank in range(2):
        method, layer = load_experts(ckpt, 4, 128, 128, tp_rank=rank, tp_size=2)
        assert layer.sinq_w13_col_scales.shape[:2] == (4, 2)  # one column-scale vector per shard
        out = method.apply(layer, x, w, ids)
        _close(out, reference_moe_output(ckpt, x, w, ids, slice(rank * 64, rank * 64 + 64)))
        total += out.double()
    _close(total, full)


def test_row_parallel_split_off_the_group_grid_is_refused():
    from sinq_vllm.errors import SinqCheckpointError

    ckpt = make_checkpoint_experts(2, 128, 64, seed=2)
    with pytest.raises(SinqCheckpointError, match=r"tensor parallel sizes that work: \[1\]"):
        load_experts(ckpt, 2, 128, 64, tp_rank=0, tp_size=2)


def test_expert_parallel_loads_and_runs_only_local_experts():
    from moe_fakes import FakeRoutedExperts

    ckpt = make_checkpoint_experts(4, 128, 64, seed=3)
    expert_map = torch.tensor([0, -1, 1, -1], dtype=torch.int32)  # this rank holds experts 0 and 2

    class EPExperts(FakeRoutedExperts):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.local_num_experts = 2
            self.expert_map = expert_map

        def _map_global_expert_id_to_local_expert_id(self, expert_id):
            return int(expert_map[expert_id])

    import moe_fakes

    orig = moe_fakes.FakeRoutedExperts
    moe_fakes.FakeRoutedExperts = EPExperts
    try:
        method, layer = load_experts(ckpt, 4, 128, 64)
    finally:
        moe_fakes.FakeRoutedExperts = orig
    assert layer.sinq_w2_col_scales.shape[0] == 2
    x, w, ids = _routing(9, 4, 2, seed=4)
    out = method.apply(layer, x, w, ids)
    local_only = {k: v for k, v in ckpt.items()}
    for e in (1, 3):  # remote experts contribute nothing on this rank
        for sid in ("w1", "w3", "w2"):
            t, m = local_only[(e, sid)]
            local_only[(e, sid)] = ({**t, "meta.scale.s": torch.zeros_like(t["meta.scale.s"]),
                                     "meta.scale.m": torch.zeros_like(t["meta.scale.m"])}, m)
    _close(out, reference_moe_output(local_only, x, w, ids))
