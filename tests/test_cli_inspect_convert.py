"""``sinq-vllm inspect`` and ``sinq-vllm convert`` (no vLLM engine involved).

* convert: the reference's ``qmodel.pt`` (``AutoSINQHFModel.save_quantized``) becomes
  exactly what its ``save_quantized_safetensors`` writes (same tensor names, dtypes,
  shapes and bytes; same sidecar fields), minus the rotary buffers; legacy ``.pt``
  contents (unpacked codes, plain fp16 scales) convert and decode like the originals; a
  pickle that is not plain tensors is refused with an error naming the file and never
  executed.
* inspect: per-layer options, byte accounting and the serve verdict on our checkpoints,
  the reference's (repo API and Transformers), a ``.pt`` folder and unsupported variants.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from reference_checkpoints import HF_SPEC, REPO_SPECS, hf_checkpoint, prefetch_all, repo_checkpoint, skip_reason
from sinq_vllm.cli import main
from sinq_vllm.errors import SinqCheckpointError

SIDECAR = "model.safetensors.index.json.meta.json"
INDEX = "model.safetensors.index.json"
needs_reference = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))


def read_checkpoint(d: Path) -> tuple[dict[str, torch.Tensor], dict]:
    index = json.loads((d / INDEX).read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(index.values())):
        with safe_open(str(d / shard), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    assert set(tensors) == set(index)
    return tensors, json.loads((d / SIDECAR).read_text())


@pytest.fixture(scope="module")
def reference_repo():
    prefetch_all()
    return {spec[0]: repo_checkpoint(*spec) for spec in REPO_SPECS}


def synthetic_pt(sinq_dir: Path, out: Path, mutate=None) -> Path:
    """A ``qmodel.pt`` folder laid out like the reference's ``save_quantized`` (docs/format.md
    §2.8), built from one of our safetensors checkpoints (no reference package needed)."""
    tensors, side = read_checkpoint(sinq_dir)
    weights: dict = {}
    for key, t in tensors.items():
        module = next((m for m in side if key.startswith(m + ".")), None)
        if module is None:
            leaf, _, param = key.rpartition(".")
            weights.setdefault(leaf, {})[param] = t
            continue
        rest = key[len(module) + 1:]
        entry = weights.setdefault(module, {"meta": {}})
        if rest.startswith("meta."):
            path = rest[len("meta."):].split(".")
            d = entry["meta"]
            for p in path[:-1]:
                d = d.setdefault(p, {})
            d[path[-1]] = t
        else:
            entry[rest] = t
    for module, e in side.items():
        meta = weights[module]["meta"]
        for k, v in e["meta"].items():
            if k.endswith(".shape"):
                if isinstance(meta.get(k.split(".")[0]), dict):
                    meta[k.split(".")[0]]["shape"] = v
            else:
                meta[k] = getattr(torch, v[len("torch."):]) if isinstance(v, str) and v.startswith("torch.") else v
    if mutate:
        mutate(weights)
    out.mkdir(parents=True)
    for f in sinq_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (INDEX, SIDECAR):
            shutil.copyfile(f, out / f.name)
    torch.save(weights, out / "qmodel.pt")
    return out


# ---------------------------------------------------------------------------------------
# convert


@needs_reference
@pytest.mark.parametrize("arch", [s[0] for s in REPO_SPECS])
def test_convert_reference_pt_equals_its_safetensors_writer(arch, reference_repo, tmp_path, capsys):
    ckpt = reference_repo[arch]
    out = tmp_path / "converted"
    assert main(["convert", str(ckpt.pt_dir), str(out)]) == 0
    assert "rotary buffers" in capsys.readouterr().out
    got, got_side = read_checkpoint(out)
    want, want_side = read_checkpoint(ckpt.safetensors_dir)
    rotary = {k for k in want if "rotary_emb." in k}
    assert rotary and set(got) == set(want) - rotary
    for key, t in got.items():
        assert t.dtype == want[key].dtype and t.shape == want[key].shape, key
        assert torch.equal(t, want[key]), key
    assert got_side == want_side  # quantAux layers: every field identical
    assert json.loads((out / "config.json").read_text()) == json.loads((ckpt.pt_dir / "config.json").read_text())
    assert (out / "tokenizer.json").is_file()


def test_convert_synthetic_pt_with_legacy_layers(sinq_factory, tmp_path):
    """Unpacked W_q and plain fp16 scales/zeros in a .pt convert and decode like the originals."""
    from sinq_vllm.vllm.assembly import ShardSlice, decode_shard
    from sinq_vllm.format.checkpoint import read_layer_metas
    from sinq_vllm.format.packing import unpack_planar

    src = sinq_factory("qwen3", nbits=4, group_size=64)
    plain = "model.layers.0.self_attn.o_proj"
    unpacked = "model.layers.1.mlp.down_proj"

    def mutate(weights):
        meta = weights[plain]["meta"]
        for what in ("scale", "zero"):
            d = meta[what]
            meta[what] = (d["x"] * d["s"] + d["m"]).view(d["shape"])  # as the reference stores non-aux
        meta["method"] = "sinq"
        m = weights[unpacked]["meta"]
        rows = m["scale"]["shape"][0]
        weights[unpacked]["W_q"] = unpack_planar(weights[unpacked]["W_q"], m["packing"], rows)

    pt = synthetic_pt(src, tmp_path / "pt", mutate)
    out = tmp_path / "out"
    assert main(["convert", str(pt / "qmodel.pt"), str(out)]) == 0
    got, side = read_checkpoint(out)
    want, _ = read_checkpoint(src)
    assert f"{plain}.meta.scale" in got and f"{plain}.meta.scale.x" not in got
    assert side[plain]["meta"]["scale.shape"] == list(got[f"{plain}.meta.scale"].shape)
    assert got[f"{unpacked}.W_q"].numel() == 128 * 192
    metas_got, metas_want = read_layer_metas(str(out)), read_layer_metas(str(src))
    for name in (plain, unpacked):
        n, k = metas_want[name].out_features, metas_want[name].in_features

        def local(ts, name=name):
            return {key[len(name) + 1:]: v for key, v in ts.items() if key.startswith(name + ".")}

        a = decode_shard(metas_got[name], local(got), ShardSlice(0, n, 0, k))
        b = decode_shard(metas_want[name], local(want), ShardSlice(0, n, 0, k))
        assert all(torch.equal(x, y) for x, y in zip(a, b)), name


class _RunsCode:
    """Pickles as a call to os.mkdir: what a malicious checkpoint does with __reduce__."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_convert_refuses_malicious_pickle(tmp_path, capsys):
    src = tmp_path / "evil"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}))
    marker = tmp_path / "pwned"
    torch.save({"model.layers.0.self_attn.q_proj": {"W_q": torch.zeros(2, 2, dtype=torch.uint8),
                                                     "meta": {"payload": _RunsCode(marker)}}},
               src / "qmodel.pt")
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(src / "qmodel.pt") in err and "refused" in err and "weights_only" in err
    assert "posix.mkdir" in err  # names what it refused
    assert not marker.exists()  # the payload never ran
    assert not (tmp_path / "out").exists()


def test_convert_rejects_non_checkpoint_objects(tmp_path):
    from sinq_vllm.cli.convert import convert_pt

    src = tmp_path / "odd"
    src.mkdir()
    (src / "config.json").write_text("{}")
    torch.save([torch.zeros(3)], src / "qmodel.pt")
    with pytest.raises(SinqCheckpointError, match=r"qmodel\.pt: expected a non-empty dict"):
        convert_pt(src, tmp_path / "out")
    torch.save({"lm_head": {"weight": torch.zeros(4, 4)}}, src / "qmodel.pt")
    with pytest.raises(SinqCheckpointError, match="no module has a W_q tensor"):
        convert_pt(src, tmp_path / "out2")


def test_convert_refuses_to_overwrite_without_flag(sinq_factory, tmp_path):
    pt = synthetic_pt(sinq_factory("qwen3", nbits=4, group_size=64), tmp_path / "pt")
    out = tmp_path / "out"
    assert main(["convert", str(pt), str(out)]) == 0
    assert main(["convert", str(pt), str(out)]) == 2
    assert main(["convert", str(pt), str(out), "--overwrite", "--max-shard-size", "100kB"]) == 0
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1


# ---------------------------------------------------------------------------------------
# inspect


def inspect_json(path, capsys) -> tuple[int, dict]:
    rc = main(["inspect", str(path), "--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_inspect_our_checkpoint(sinq_factory, capsys):
    ckpt = sinq_factory("qwen2", nbits=4, group_size=64)
    rc, r = inspect_json(ckpt, capsys)
    assert rc == 0 and r["servable"] and r["reasons"] == []
    assert r["format"] == "sinq-safetensors" and r["written_by"] == "sinq-vllm quantize"
    assert r["architectures"] == ["Qwen2ForCausalLM"]
    assert r["kinds"] == {"4-bit g64 sinq_quantAux 1D": 14}
    assert {layer["nbits"] for layer in r["layers"]} == {4} and all(layer["aux"] for layer in r["layers"])
    assert r["unquantized_modules"] == ["lm_head", "model.embed_tokens"]
    # byte accounting: every tensor counted once, codes = W_q bytes
    tensors, _ = read_checkpoint(ckpt)
    nbytes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    assert r["total_bytes"] == sum(nbytes.values())
    assert r["code_bytes"] == sum(v for k, v in nbytes.items() if k.endswith(".W_q"))
    assert r["scale_bytes"] == sum(v for k, v in nbytes.items() if ".meta." in k)
    assert 4.0 < r["bits_per_weight"] < 4.6
    assert r["total_bytes"] < r["bf16_bytes"]
    rc = main(["inspect", str(ckpt), "--layers"])
    text = capsys.readouterr().out
    assert rc == 0 and "can serve it" in text and "model.layers.1.mlp.down_proj: 4-bit g64" in text


@needs_reference
def test_inspect_reference_checkpoints(reference_repo, capsys):
    llama = reference_repo["llama"]
    rc, r = inspect_json(llama.safetensors_dir, capsys)
    assert r["written_by"].startswith("reference SINQ save_quantized_safetensors")
    down = next(layer for layer in r["layers"] if layer["name"] == "model.layers.0.mlp.down_proj")
    assert (down["nbits"], down["group_size"], down["declared_group_size"]) == (3, 64, 128)  # tile fallback
    assert r["kinds"] == {"3-bit g128 sinq_quantAux 1D": 12, "3-bit g64 sinq_quantAux 1D": 2}
    rc, r = inspect_json(llama.pt_dir, capsys)
    assert rc == 1 and r["format"] == "reference-pt" and not r["servable"]
    assert "sinq-vllm convert" in r["reasons"][0]
    hf_dir, _ = hf_checkpoint(*HF_SPEC)
    rc, r = inspect_json(hf_dir, capsys)
    assert r["written_by"] == "Transformers SinqConfig + save_pretrained"
    assert "lm_head" in {layer["name"] for layer in r["layers"]} and "lm_head" not in r["unquantized_modules"]


def test_inspect_reports_unsupported_and_legacy_variants(sinq_factory, tmp_path, capsys):
    from ckpt_mutation import copy_checkpoint, edit_sidecar, edit_tensors

    src = sinq_factory("qwen3", nbits=4, group_size=64)
    noz = copy_checkpoint(src, tmp_path / "noz")
    edit_sidecar(noz, lambda s: s["model.layers.0.mlp.up_proj"]["meta"].update(method="sinq_noz_quantAux"))
    rc, r = inspect_json(noz, capsys)
    assert rc == 1 and not r["servable"]
    assert any("model.layers.0.mlp.up_proj" in why and "noz" in why for why in r["reasons"])
    rc = main(["inspect", str(noz)])
    assert rc == 1 and "cannot serve it" in capsys.readouterr().out

    two_d = copy_checkpoint(src, tmp_path / "twod")
    edit_sidecar(two_d, lambda s: s["model.layers.1.self_attn.o_proj"]["meta"].update(**{"scale.shape": [4, 64, 1]}))
    rc, r = inspect_json(two_d, capsys)
    assert rc == 1 and any("2D tiling" in why for why in r["reasons"])

    legacy = copy_checkpoint(src, tmp_path / "legacy")

    def add_prefix(tensors):
        for k in list(tensors):
            tensors["model." + k] = tensors.pop(k)

    edit_tensors(legacy, add_prefix)
    edit_sidecar(legacy, lambda s: s.update({"model." + k: s.pop(k) for k in list(s)}))
    rc, r = inspect_json(legacy, capsys)
    assert r["legacy_model_prefix"] and r["unquantized_modules"] == ["lm_head", "model.embed_tokens"]
    assert rc == 0 and r["servable"], r["reasons"]


def test_inspect_non_sinq_folder(model_factory, capsys):
    rc, r = inspect_json(model_factory("llama"), capsys)
    assert rc == 1 and r["format"] == "not-sinq" and "not a SINQ checkpoint" in r["reasons"][0]
