"""Helpers that copy a valid SINQ checkpoint and break one thing in it (for error tests)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

SIDECAR = "model.safetensors.index.json.meta.json"
INDEX = "model.safetensors.index.json"


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_sidecar(ckpt: Path, fn) -> None:
    path = ckpt / SIDECAR
    side = json.loads(path.read_text())
    fn(side)
    path.write_text(json.dumps(side))


def edit_config(ckpt: Path, fn) -> None:
    path = ckpt / "config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


def edit_tensors(ckpt: Path, fn) -> None:
    """``fn(tensors: dict)`` mutates the name->tensor dict of every shard in place."""
    index_path = ckpt / INDEX
    index = json.loads(index_path.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(ckpt / shard)
        fn(tensors)
        save_file({k: v.contiguous() for k, v in tensors.items()}, ckpt / shard)
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
        index["weight_map"].update({k: shard for k in tensors})
    index_path.write_text(json.dumps(index))


def first_module(ckpt: Path, suffix: str) -> str:
    side = json.loads((ckpt / SIDECAR).read_text())
    return next(n for n in side if n.endswith(suffix))
