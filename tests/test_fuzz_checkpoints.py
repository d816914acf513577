"""Fuzz: hostile SINQ checkpoints fail with one ``SinqCheckpointError`` naming the file or
tensor, in the right place (front end or load time), without hanging or crashing.

Valid tiny checkpoints (a 3-shard 4-bit quantAux Llama and a 3-bit no-aux Qwen2 with
biases, whose 3-bit codes are int32 words) are mutated programmatically: every SINQ
tensor x {drop, drop from its shard only, rename, wrong dtype, transposed / flattened /
shrunk shape}, seeded value mutations (NaN / Inf / zero scales, NaN zeros, bad column
scales, out-of-range codes), shard-file damage (truncation at seeded offsets, trailing
bytes, empty files, header garbage, bad header lengths, malformed header entries, FIFOs,
directories), index and sidecar corruption and bogus sidecar fields. Each case runs what
vLLM runs, without vLLM:

* front end: ``SinqConfig().maybe_update_config(dir)`` (sidecar, index, shard headers);
* worker: the module's tensors read with ``safe_open`` and ``assembly.decode_shard``.

and must raise ``SinqCheckpointError`` matching the case's file or tensor name, at the
stage the case names (header-level damage never reaches the worker). Cases run in a
child process: a case that takes longer than ``CASE_TIMEOUT_S`` (a hang) or kills the
interpreter is recorded as a failure and the child restarts after it (the harness itself
is checked with a stand-in worker that hangs and crashes). A few control cases (the
pristine checkpoints, a legacy unpacked ``W_q``, a sidecar without ``scale.shape`` as the
reference writes for plain scales) must load without error. One vLLM engine case shows
that a value-level mutation fails the load in the worker and no model is served.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

SEED = 20260823
CASE_TIMEOUT_S = 20
STARTUP_TIMEOUT_S = 240
TOTAL_TIMEOUT_S = 300
MAX_RESTARTS = 8
TAG = "@@SINQFUZZ@@ "
INDEX = "model.safetensors.index.json"
SIDECAR = INDEX + ".meta.json"
MIN_CASES = 400
MIN_CLASSES = 20

# --------------------------------------------------------------------------------------------
# An in-memory checkpoint: JSON files as bytes, shards as {name: [dtype, shape, data]}.


def _parse_shard(path: Path) -> dict:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    header.pop("__metadata__", None)
    data = blob[8 + n :]
    out = {}
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        b, e = info["data_offsets"]
        out[name] = [info["dtype"], list(info["shape"]), data[b:e]]
    return out


def _serialize_shard(entries: dict, header_edit=None) -> bytes:
    header, offset, chunks = {}, 0, []
    for name, (dtype, shape, data) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        chunks.append(data)
    if header_edit is not None:
        header_edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


class Ckpt:
    """Copy-on-write view of a checkpoint folder; ``materialize`` writes a mutated copy."""

    def __init__(self, src: Path):
        self.src = src
        self.files = {f: (src / f).read_bytes() for f in ("config.json", INDEX, SIDECAR)}
        index = json.loads(self.files[INDEX])
        self.shards = {s: _parse_shard(src / s) for s in sorted(set(index["weight_map"].values()))}
        self.dirty: set[str] = set()
        self.raw: dict[str, bytes] = {}  # file -> verbatim bytes (overrides everything)
        self.header_edits: dict[str, object] = {}
        self.special: dict[str, str] = {}  # file -> "missing" | "dir" | "fifo"

    def copy(self) -> "Ckpt":
        c = copy.copy(self)
        c.files, c.shards, c.dirty = dict(self.files), dict(self.shards), set(self.dirty)
        c.raw, c.header_edits, c.special = dict(self.raw), dict(self.header_edits), dict(self.special)
        return c

    # json
    def index(self) -> dict:
        return json.loads(self.files[INDEX])

    def sidecar(self) -> dict:
        return json.loads(self.files[SIDECAR])

    def set_json(self, name: str, value) -> None:
        self.files[name] = json.dumps(value).encode()

    # tensors
    def shard_of(self, name: str) -> str:
        return next(s for s, entries in self.shards.items() if name in entries)

    def edit(self, shard: str) -> dict:
        if shard not in self.dirty:
            self.shards[shard] = {k: list(v) for k, v in self.shards[shard].items()}
            self.dirty.add(shard)
        return self.shards[shard]

    def tensor(self, name: str):
        return self.shards[self.shard_of(name)][name]

    def set_tensor(self, name: str, dtype=None, shape=None, data=None) -> None:
        entry = self.edit(self.shard_of(name))[name]
        if dtype is not None:
            entry[0] = dtype
        if shape is not None:
            entry[1] = list(shape)
        if data is not None:
            entry[2] = data

    def drop(self, name: str, from_index: bool = True) -> None:
        self.edit(self.shard_of(name)).pop(name)
        if from_index:
            index = self.index()
            index["weight_map"].pop(name)
            self.set_json(INDEX, index)

    def rename(self, old: str, new: str) -> None:
        shard = self.shard_of(old)
        entries = self.edit(shard)
        self.shards[shard] = {(new if k == old else k): v for k, v in entries.items()}
        index = self.index()
        index["weight_map"] = {(new if k == old else k): v for k, v in index["weight_map"].items()}
        self.set_json(INDEX, index)

    def shard_bytes(self, shard: str) -> bytes:
        return _serialize_shard(self.shards[shard], self.header_edits.get(shard))

    def materialize(self, pristine: Path, out: Path) -> Path:
        out.mkdir(parents=True)
        for name, blob in self.files.items():
            (out / name).write_bytes(blob)
        for shard in self.shards:
            target = out / shard
            if shard in self.raw:
                target.write_bytes(self.raw[shard])
            elif shard in self.dirty or shard in self.header_edits:
                target.write_bytes(self.shard_bytes(shard))
            else:
                os.link(pristine / shard, target)
        for name, blob in self.raw.items():
            if name not in self.shards:
                (out / name).write_bytes(blob)
        for name, kind in self.special.items():
            target = out / name
            if target.exists():
                target.unlink()
            if kind == "dir":
                target.mkdir()
            elif kind == "fifo":
                os.mkfifo(target)
            elif kind == "devzero":
                target.symlink_to("/dev/zero")
        return out


# --------------------------------------------------------------------------------------------
# Tensor bytes <-> torch


def _to_torch(dtype: str, shape, data: bytes):
    import torch

    dt = {"U8": torch.uint8, "I32": torch.int32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F32": torch.float32}[dtype]
    return torch.frombuffer(bytearray(data), dtype=dt).reshape(shape).clone()


def _to_bytes(t) -> bytes:
    import torch

    return bytes(t.contiguous().view(torch.uint8).reshape(-1).numpy())


_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4,
             "F32": 4, "I64": 8, "F64": 8, "F8_E4M3": 1}


# --------------------------------------------------------------------------------------------
# Cases: (kind, error class, stage, pattern, mutate(ckpt)) with stage "frontend", "worker" or
# "none" (must load). The pattern must match the SinqCheckpointError message.


class Case:
    __slots__ = ("base", "kind", "cls", "stage", "pattern", "mutate")

    def __init__(self, base, kind, cls, stage, pattern, mutate):
        self.base, self.kind, self.cls, self.stage, self.pattern, self.mutate = base, kind, cls, stage, pattern, mutate


def _esc(*names: str) -> str:
    return "(" + "|".join(re.escape(n) for n in names) + ")"


def _sinq_tensors(ck: Ckpt) -> list[tuple[str, str, str]]:
    """(module, key, full name) of every tensor of every SINQ module."""
    modules = sorted(ck.sidecar())
    out = []
    for shard in ck.shards.values():
        for name in shard:
            for m in modules:
                if name.startswith(m + "."):
                    out.append((m, name[len(m) + 1 :], name))
    return sorted(out)


def build_cases(bases: dict[str, Ckpt], seed: int) -> list[Case]:
    rng = random.Random(seed)
    cases: list[Case] = []

    def add(base, kind, cls, stage, pattern, mutate):
        cases.append(Case(base, kind, cls, stage, pattern, mutate))

    for bname, ck in bases.items():
        add(bname, "pristine", "control", "none", "", lambda c: None)
        tensors = _sinq_tensors(ck)
        shards = sorted(ck.shards)
        side = ck.sidecar()
        modules = sorted(side)

        # ---- every SINQ tensor x header-level mutations (front end) ----
        for module, key, full in tensors:
            dtype, shape, data = ck.tensor(full)
            if key == "bias":  # optional: only its dtype and shape are checked
                add(bname, f"dtype {full}", "wrong dtype", "frontend", _esc(full) + ".*has dtype",
                    lambda c, f=full, n=shape[0]: c.set_tensor(f, dtype="I32", data=bytes(4 * n)))
                add(bname, f"shrink {full}", "wrong shape", "frontend", _esc(full) + ".*has shape",
                    lambda c, f=full, n=shape[0], d=data: c.set_tensor(f, shape=[n - 1], data=d[: -len(d) // n]))
                continue
            add(bname, f"drop {full}", "missing tensor", "frontend", _esc(full), lambda c, f=full: c.drop(f))
            add(bname, f"drop-from-shard {full}", "index/shard disagreement", "frontend", _esc(full),
                lambda c, f=full: c.drop(f, from_index=False))
            renamed = f"{module}.{key}_renamed"
            add(bname, f"rename {full}", "unexpected or renamed tensor", "frontend", _esc(full, renamed),
                lambda c, f=full, r=renamed: c.rename(f, r))
            floats = ("F16", "BF16", "F32")  # all accepted for scales: never the "wrong" one for a float tensor
            wrong = rng.choice([d for d in ("U8", "I8", "I16", "I32", *floats, "F64", "F8_E4M3")
                                if d != dtype and not (d in floats and dtype in floats)])
            numel = 1
            for v in shape:
                numel *= v
            add(bname, f"dtype {full} {dtype}->{wrong}", "wrong dtype", "frontend", _esc(full) + ".*has dtype",
                lambda c, f=full, w=wrong, n=numel: c.set_tensor(f, dtype=w, data=bytes(n * _ITEMSIZE[w])))
            if len(shape) == 2 and shape[0] != shape[1]:
                add(bname, f"transpose {full}", "wrong shape", "frontend", _esc(full) + ".*has shape",
                    lambda c, f=full, s=shape: c.set_tensor(f, shape=s[::-1]))
            else:
                add(bname, f"extra-dim {full}", "wrong shape", "frontend", _esc(full) + ".*has shape",
                    lambda c, f=full, s=shape: c.set_tensor(f, shape=[*s, 1]))
            add(bname, f"flatten {full}", "wrong shape", "frontend", _esc(full) + ".*has shape",
                lambda c, f=full, n=numel: c.set_tensor(f, shape=[n]))
            if shape[0] > 1:
                row = len(data) // shape[0]
                add(bname, f"shrink {full}", "wrong shape", "frontend", _esc(full) + ".*has shape",
                    lambda c, f=full, s=shape, r=row, d=data: c.set_tensor(f, shape=[s[0] - 1, *s[1:]], data=d[:-r]))

        # ---- an unexpected full-precision weight next to the codes ----
        m = rng.choice(modules)
        add(bname, f"extra {m}.weight", "unexpected or renamed tensor", "frontend", _esc(m + ".weight"),
            lambda c, m=m: _add_tensor(c, m + ".weight"))

        # ---- value-level mutations (pass the front end, fail at load time) ----
        aux = "quantAux" in side[modules[0]]["meta"]["method"]
        for module in modules:
            for kind, cls, key, value, pattern in _value_mutations(aux, rng):
                full = f"{module}.{key}"
                add(bname, f"{kind} {full}", cls, "worker", re.escape(module) + ".*" + pattern,
                    lambda c, f=full, v=value, r=rng.random(): _poke(c, f, v, r))
        three_bit = side[modules[0]]["meta"]["packing"] == "3bit_32"
        for module in rng.sample(modules, 4):
            full = f"{module}.W_q"
            if three_bit:
                add(bname, f"high-bits {full}", "codes out of range", "worker", re.escape(full) + ".*bits above",
                    lambda c, f=full: _set_high_bit(c, f))
            else:
                add(bname, f"unpacked-out-of-range {full}", "codes out of range", "worker",
                    re.escape(full) + ".*outside", lambda c, f=full: _unpack_codes(c, f, 200))
                add(bname, f"unpacked-legacy {full}", "control", "none", "",
                    lambda c, f=full: _unpack_codes(c, f, None))

        # ---- shard files ----
        for shard in shards:
            blob = ck.shard_bytes(shard)
            (hlen,) = struct.unpack("<Q", blob[:8])
            size = len(blob)
            cuts = sorted({rng.randrange(0, 8), rng.randrange(8, 8 + hlen), rng.randrange(8 + hlen, size),
                           rng.randrange(8 + hlen, size), size - 1})
            for cut in cuts:
                add(bname, f"truncate {shard} at {cut}/{size}", "truncated shard", "frontend", _esc(shard),
                    lambda c, s=shard, k=cut: c.raw.__setitem__(s, c.shard_bytes(s)[:k]))
            add(bname, f"trailing {shard}", "trailing bytes", "frontend", _esc(shard) + ".*trailing",
                lambda c, s=shard, n=rng.randrange(1, 99): c.raw.__setitem__(s, c.shard_bytes(s) + b"\0" * n))
            add(bname, f"empty {shard}", "empty file", "frontend", _esc(shard) + ".*0 bytes",
                lambda c, s=shard: c.raw.__setitem__(s, b""))
            add(bname, f"garbage {shard}", "header garbage", "frontend", _esc(shard),
                lambda c, s=shard, b=rng.randbytes(size): c.raw.__setitem__(s, b))
            for length in (0, 2**64 - 1, size, hlen + 1, hlen - 1):
                add(bname, f"header-length {length} {shard}", "header length", "frontend", _esc(shard),
                    lambda c, s=shard, n=length: c.raw.__setitem__(s, struct.pack("<Q", n) + c.shard_bytes(s)[8:]))
            for label, text in (("non-utf8", b"\xff\xfe" + rng.randbytes(30)), ("not-json", b"{'a': 1,,}"),
                                ("json-list", b"[]"), ("deep-nesting", b"[" * 100000 + b"]" * 100000),
                                ("metadata-list", b'{"__metadata__": []}')):
                add(bname, f"header-{label} {shard}", "header not a JSON object", "frontend", _esc(shard),
                    lambda c, s=shard, t=text: c.raw.__setitem__(s, _with_header(c.shard_bytes(s), t)))
            names = list(ck.shards[shard])
            victim = rng.choice(names)
            for label, edit in (
                ("unknown-dtype", lambda h, v=victim: h[v].update(dtype="Q4")),
                ("shape-negative", lambda h, v=victim: h[v].update(shape=[-1, *h[v]["shape"][1:]])),
                ("shape-bool", lambda h, v=victim: h[v].update(shape=[True] * len(h[v]["shape"]))),
                ("shape-string", lambda h, v=victim: h[v].update(shape="128x64")),
                ("shape-vs-bytes", lambda h, v=victim: h[v].update(shape=[*h[v]["shape"], 2])),
                ("offsets-overlap", lambda h, v=names[-1]: h[v].update(
                    data_offsets=[h[v]["data_offsets"][0] - 1, h[v]["data_offsets"][1] - 1])),
                ("offsets-gap", lambda h, v=names[0]: h[v].update(data_offsets=[1, h[v]["data_offsets"][1] + 1])),
                ("offsets-missing", lambda h, v=victim: h[v].pop("data_offsets")),
                ("entry-not-object", lambda h, v=victim: h.__setitem__(v, [1, 2])),
            ):
                add(bname, f"header-{label} {shard}:{victim}", "malformed header entry", "frontend", _esc(shard),
                    lambda c, s=shard, e=edit: c.header_edits.__setitem__(s, e))
            for kind in ("missing", "dir", "fifo", "devzero"):
                pat = _esc(shard) + (".*does not exist" if kind == "missing" else ".*not a regular file")
                add(bname, f"{kind} {shard}", "missing or unreadable shard", "frontend", pat,
                    lambda c, s=shard, k=kind: c.special.__setitem__(s, k))

        # ---- the index ----
        some = rng.choice(tensors)[2]
        ghost = "model-09999-of-09999.safetensors"
        add(bname, f"index-ghost-shard {some}", "missing or unreadable shard", "frontend", _esc(ghost),
            lambda c, t=some: _index_set(c, t, ghost))
        if len(shards) > 1:
            other = next(s for s in shards if s != ck.shard_of(some))
            add(bname, f"index-wrong-shard {some}", "index/shard disagreement", "frontend", _esc(some),
                lambda c, t=some, o=other: _index_set(c, t, o))
        for label, value in (("parent", "../evil.safetensors"), ("absolute", "/etc/evil.safetensors"),
                             ("not-safetensors", "pytorch_model.bin"), ("number", 7), ("null", None),
                             ("empty-part", "sub//x.safetensors")):
            add(bname, f"index-value-{label}", "index corrupted", "frontend", _esc(INDEX),
                lambda c, t=some, v=value: _index_set(c, t, v))
        index_blob = ck.files[INDEX]
        for label, blob in (("truncated", index_blob[: rng.randrange(1, len(index_blob) - 1)]), ("empty", b""),
                            ("non-utf8", b'{"weight_map": {"\xff": 1}}'), ("list", b"[]"),
                            ("no-weight-map", b'{"metadata": {}}'), ("weight-map-list", b'{"weight_map": []}'),
                            ("deep-nesting", b"[" * 100000 + b"]" * 100000)):
            add(bname, f"index-{label}", "index corrupted", "frontend", _esc(INDEX),
                lambda c, b=blob: c.files.__setitem__(INDEX, b))
        add(bname, "index-fifo", "index corrupted", "frontend", _esc(INDEX),
            lambda c: c.special.__setitem__(INDEX, "fifo"))

        # ---- the sidecar file ----
        side_blob = ck.files[SIDECAR]
        for label, blob in (("truncated", side_blob[: rng.randrange(1, len(side_blob) - 1)]),
                            ("truncated2", side_blob[: rng.randrange(1, len(side_blob) - 1)]), ("empty", b""),
                            ("garbage", rng.randbytes(200)), ("non-utf8", b'{"\xff\xfe": {}}'), ("list", b"[1]"),
                            ("empty-object", b"{}"), ("deep-nesting", b"[" * 100000 + b"]" * 100000),
                            ("entry-not-object", json.dumps({m: 1 for m in modules}).encode())):
            add(bname, f"sidecar-{label}", "sidecar corrupted", "frontend", _esc(SIDECAR),
                lambda c, b=blob: c.files.__setitem__(SIDECAR, b))
        add(bname, "sidecar-fifo", "sidecar corrupted", "frontend", _esc(SIDECAR),
            lambda c: c.special.__setitem__(SIDECAR, "fifo"))

        # ---- bogus sidecar fields, each on a seeded module ----
        for field, value, cls in _sidecar_field_mutations():
            m = rng.choice(modules)
            if callable(value):
                value = value(side[m]["meta"]["scale.shape"][0])
            add(bname, f"sidecar {field}={value if value is not _MISSING else 'missing'!r} on {m}", cls,
                "frontend", _esc(m), lambda c, m=m, f=field, v=value: _edit_meta(c, m, f, v))
        m = rng.choice(modules)  # the reference writes no scale.shape/zero.shape for plain scales: tolerated
        add(bname, f"sidecar-without-scale-shape {m}", "control", "none", "",
            lambda c, m=m: [_edit_meta(c, m, f, _MISSING) for f in ("scale.shape", "zero.shape")])
        m = rng.choice(modules)
        add(bname, f"sidecar-rename {m}", "sidecar/tensor names disagree", "frontend", _esc(m, m + "_x"),
            lambda c, m=m: _rename_meta(c, m, m + "_x"))
        m = rng.choice(modules)
        add(bname, f"sidecar-drop {m}", "sidecar/tensor names disagree", "frontend", _esc(m),
            lambda c, m=m: _rename_meta(c, m, None))

        # ---- the model config ----
        add(bname, "config hidden_size=64", "model config mismatch", "frontend", r"hidden_size=64",
            lambda c: _edit_config(c, hidden_size=64))
    return cases


def _value_mutations(aux: bool, rng: random.Random):
    """(kind, class, key, value, pattern) of value-level damage for one module."""
    scale = ["meta.scale.s", "meta.scale.m"] if aux else ["meta.scale"]
    zero = ["meta.zero.s", "meta.zero.m"] if aux else ["meta.zero"]
    return [
        ("nan-scale", "NaN/Inf scales", rng.choice(scale), float("nan"), r"meta\.scale.*NaN or Inf"),
        ("inf-scale", "NaN/Inf scales", rng.choice(scale), float("inf"), r"meta\.scale.*NaN or Inf"),
        ("zero-scale", "zero scales", "meta.scale.*" if aux else "meta.scale", 0.0, r"meta\.scale.*are zero"),
        ("nan-zero", "NaN/Inf zeros", rng.choice(zero), float("nan"), r"meta\.zero.*NaN or Inf"),
        ("nan-scale2", "bad column scales", "meta.scale2", float("nan"), r"scale2.*finite and positive"),
        ("inf-scale2", "bad column scales", "meta.scale2", float("inf"), r"scale2.*finite and positive"),
        ("zero-scale2", "bad column scales", "meta.scale2", 0.0, r"scale2.*finite and positive"),
        ("negative-scale2", "bad column scales", "meta.scale2", -1.0, r"scale2.*finite and positive"),
    ]


def _poke(c: Ckpt, full: str, value: float, r: float) -> None:
    """Set one element (at a seeded position) of a float tensor; ``*`` zeroes a whole quantAux
    scale column (its ``.s`` and ``.m``)."""
    if full.endswith(".*"):
        base = full[:-2]
        col = None
        for suffix in (".s", ".m"):
            dtype, shape, data = c.tensor(base + suffix)
            t = _to_torch(dtype, shape, data)
            col = int(r * t.numel()) if col is None else col
            t.view(-1)[col] = 0.0
            c.set_tensor(base + suffix, data=_to_bytes(t))
        return
    dtype, shape, data = c.tensor(full)
    t = _to_torch(dtype, shape, data)
    t.view(-1)[int(r * t.numel())] = value
    c.set_tensor(full, data=_to_bytes(t))


def _set_high_bit(c: Ckpt, full: str) -> None:
    dtype, shape, data = c.tensor(full)
    t = _to_torch(dtype, shape, data)
    t.view(-1)[0] |= -(2**31)  # bit 31: unused by 3/5/6-bit int32 packings
    c.set_tensor(full, data=_to_bytes(t))


def _unpack_codes(c: Ckpt, full: str, bad_value) -> None:
    """Store the codes unpacked (the legacy gemlite-era layout), optionally one out of range."""
    import torch

    from sinq_vllm.format.packing import unpack_planar

    module = full[: -len(".W_q")]
    meta = c.sidecar()[module]["meta"]
    n, k = meta["shape"]
    r = meta["scale.shape"][0]
    dtype, shape, data = c.tensor(full)
    codes = unpack_planar(_to_torch(dtype, shape, data), meta["packing"], r).reshape(r, -1)
    if bad_value is not None:
        codes.view(-1)[7] = bad_value
    c.set_tensor(full, dtype="U8", shape=list(codes.shape), data=_to_bytes(codes.to(torch.uint8)))


def _add_tensor(c: Ckpt, name: str) -> None:
    shard = sorted(c.shards)[0]
    c.edit(shard)[name] = ["BF16", [4, 4], bytes(32)]
    index = c.index()
    index["weight_map"][name] = shard
    c.set_json(INDEX, index)


def _with_header(blob: bytes, text: bytes) -> bytes:
    (n,) = struct.unpack("<Q", blob[:8])
    return struct.pack("<Q", len(text)) + text + blob[8 + n :]


def _index_set(c: Ckpt, tensor: str, value) -> None:
    index = c.index()
    index["weight_map"][tensor] = value
    c.set_json(INDEX, index)


_MISSING = object()


def _sidecar_field_mutations():
    """(field, value or f(groups R of the module), class)."""
    out = []
    for v in (7, 0, -4, 1, "4", 4.5, None, True, 10**9, [4]):
        out.append(("nbits", v, "sidecar nbits"))
    for v in ("64", -64, 0, 50, 32, 6.5, True, [64]):
        out.append(("group_size", v, "sidecar group_size"))
    for v in ("4bit_u9", "8bit_u8", "6bit_32", 5, ["4bit_u8"]):
        out.append(("packing", v, "sidecar packing"))
    for v in ([0, 128], [128], "128x128", [128, -1], [128.0, 128], [True, 128], [256, 128], [10**12, 128]):
        out.append(("shape", v, "sidecar shape"))
    for v in (lambda r: [r], lambda r: [r, 2], "x", [0, 1], lambda r: [r * 2, 1], lambda r: [r // 2, 1],
              lambda r: [r, 1, 1, 1, 1], {"a": 1}):
        out.append(("scale.shape", v, "sidecar scale/zero shape"))
    for v in (lambda r: [r + 1, 1], lambda r: [2 * r], "x"):
        out.append(("zero.shape", v, "sidecar scale/zero shape"))
    for v in (0, 2, "1"):
        out.append(("axis", v, "sidecar axis or missing field"))
    for f in ("nbits", "shape"):
        out.append((f, _MISSING, "sidecar axis or missing field"))
    for v in ("sinq_nf4_nf3_quantAux", "sinq_noz_quantAux", "sinq_nf3_nf4"):  # two codebooks; symmetric
        out.append(("method", v, "unsupported option"))
    out.append(("scale.shape", lambda r: [r // 64, 64, 1], "unsupported option"))  # 2D tiling
    return out


def _edit_meta(c: Ckpt, module: str, field: str, value) -> None:
    side = c.sidecar()
    if value is _MISSING:
        side[module]["meta"].pop(field)
    else:
        side[module]["meta"][field] = value
    c.set_json(SIDECAR, side)


def _rename_meta(c: Ckpt, module: str, new) -> None:
    side = c.sidecar()
    entry = side.pop(module)
    if new is not None:
        side[new] = entry
    c.set_json(SIDECAR, side)


def _edit_config(c: Ckpt, **changes) -> None:
    cfg = json.loads(c.files["config.json"])
    cfg.update(changes)
    c.set_json("config.json", cfg)


# --------------------------------------------------------------------------------------------
# The pipeline each case runs (in the worker child process).


def run_pipeline(model_dir: Path) -> str:
    """Front end, then per-module load-time decode, as vLLM runs them. Returns the stage reached."""
    from safetensors import safe_open

    from sinq_vllm.vllm.assembly import ShardSlice, decode_shard
    from sinq_vllm.format.tensor_specs import required_keys
    from sinq_vllm.vllm.config import SinqConfig

    cfg = SinqConfig()
    cfg.maybe_update_config(str(model_dir))
    stage = "worker"
    index = json.loads((model_dir / INDEX).read_text())
    prefix = "model." if cfg.legacy_model_prefix else ""
    handles = {}
    try:
        for name, meta in cfg.layer_metas.items():
            tensors = {}
            for key in required_keys(meta):
                full = f"{prefix}{name}.{key}"
                shard = index["weight_map"][full]
                if shard not in handles:
                    handles[shard] = safe_open(str(model_dir / shard), framework="pt")
                tensors[key] = handles[shard].get_tensor(full)
            decode_shard(meta, tensors, ShardSlice(0, meta.out_features, 0, meta.in_features))
    except Exception as e:
        e.sinq_stage = stage
        raise
    return "loaded"


def _classify(case: Case, model_dir: Path) -> dict:
    from sinq_vllm.errors import SinqCheckpointError

    try:
        run_pipeline(model_dir)
    except SinqCheckpointError as e:
        stage = getattr(e, "sinq_stage", "frontend")
        msg = str(e)
        if case.stage == "none":
            return {"outcome": "unexpected error", "stage": stage, "msg": msg}
        if stage != case.stage:
            return {"outcome": "wrong stage", "stage": stage, "msg": msg}
        if not re.search(case.pattern, msg, re.S):
            return {"outcome": "message does not name the file/tensor", "stage": stage, "msg": msg}
        return {"outcome": "ok", "stage": stage, "msg": msg}
    except Exception as e:  # anything else is a crash-like failure of the loader
        return {"outcome": f"other exception {type(e).__name__}", "stage": getattr(e, "sinq_stage", "frontend"),
                "msg": f"{type(e).__name__}: {e}"[:2000]}
    if case.stage == "none":
        return {"outcome": "ok", "stage": "loaded", "msg": ""}
    return {"outcome": "no error", "stage": "loaded", "msg": ""}


def _worker_main(argv: list[str]) -> None:
    args = json.loads(argv[0])
    import sinq_vllm.vllm.config  # noqa: F401  (imports vLLM: before the per-case watchdog starts)
    import safetensors  # noqa: F401

    bases = {name: Ckpt(Path(p)) for name, p in args["bases"].items()}
    cases = build_cases(bases, args["seed"])
    work = Path(args["work"])
    emit = lambda obj: print(TAG + json.dumps(obj), flush=True)  # noqa: E731
    emit({"ready": len(cases)})
    for i in range(args["start"], len(cases)):
        case = cases[i]
        emit({"start": i, "kind": case.kind, "cls": case.cls, "base": case.base})
        out = work / f"case{i}"
        if out.exists():
            shutil.rmtree(out)
        mutated = bases[case.base].copy()
        case.mutate(mutated)
        mutated.materialize(Path(args["bases"][case.base]), out)
        result = _classify(case, out)
        shutil.rmtree(out, ignore_errors=True)
        emit({"done": i, "base": case.base, "kind": case.kind, "cls": case.cls, "expect": case.stage, **result})
    emit({"end": True})


# --------------------------------------------------------------------------------------------
# Parent side: run the worker with a per-case watchdog.


class _Worker:
    def __init__(self, args: dict, mode: str = "--fuzz-worker"):
        env = {**os.environ, "SINQ_AUTO_PATCH": "0", "PYTHONFAULTHANDLER": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, mode, json.dumps(args)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.buf = b""
        self.tail: list[str] = []

    def next_message(self, timeout: float):
        """The next tagged message, None on timeout, or "EOF" when the child is gone."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                text = line.decode(errors="replace")
                if text.startswith(TAG):
                    return json.loads(text[len(TAG):])
                self.tail = (self.tail + [text])[-30:]
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if self.sel.select(timeout=left):
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    self.proc.wait()
                    return "EOF"
                self.buf += chunk

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.sel.close()
        self.proc.stdout.close()


def run_fuzz(bases: dict[str, Path], seed: int, work: Path, case_timeout: float = CASE_TIMEOUT_S,
             mode: str = "--fuzz-worker") -> tuple[int, list[dict]]:
    """Run every case in a child process; a case that hangs or kills the child is recorded and
    the child restarts after it (at most MAX_RESTARTS times, within TOTAL_TIMEOUT_S)."""
    results: dict[int, dict] = {}
    start, total, restarts = 0, None, 0
    t_end = time.monotonic() + TOTAL_TIMEOUT_S
    while total is None or start < total:
        if restarts > MAX_RESTARTS or time.monotonic() > t_end:
            pytest.fail(f"fuzz stopped after {restarts} restarts / {TOTAL_TIMEOUT_S}s at case {start}")
        worker = _Worker({"bases": {k: str(v) for k, v in bases.items()}, "seed": seed, "start": start,
                          "work": str(work)}, mode)
        try:
            msg = worker.next_message(STARTUP_TIMEOUT_S)
            if not isinstance(msg, dict) or "ready" not in msg:
                pytest.fail(f"fuzz worker did not start ({msg!r}):\n" + "\n".join(worker.tail))
            total = msg["ready"]
            current, started = None, {}
            while True:
                msg = worker.next_message(case_timeout)
                if isinstance(msg, dict) and "start" in msg:
                    current, started = msg["start"], msg
                elif isinstance(msg, dict) and "done" in msg:
                    results[msg["done"]] = msg
                    current = None
                elif isinstance(msg, dict) and "end" in msg:
                    start = total
                    break
                else:  # hang (None) or the interpreter died (EOF)
                    if current is None:
                        pytest.fail(f"fuzz worker failed between cases ({msg!r}):\n" + "\n".join(worker.tail))
                    what = "hang" if msg is None else f"crash (exit {worker.proc.returncode})"
                    results[current] = {
                        "done": current, "outcome": what, "kind": started.get("kind", f"case {current}"),
                        "cls": started.get("cls", "?"), "base": started.get("base"),
                        "msg": "\n".join(worker.tail[-5:]),
                    }
                    start, restarts = current + 1, restarts + 1
                    break
        finally:
            worker.kill()
    return total, [results[i] for i in sorted(results)]


# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_bases(model_factory, sinq_factory, tmp_path_factory):
    from sinq_vllm.quantizer import quantize_model

    llama = tmp_path_factory.mktemp("fuzz-llama-w4-3shards")
    quantize_model(model_factory("llama"), llama, nbits=4, group_size=64, max_shard_size="150KB",
                   overwrite=True, progress=False)
    return {"llama-w4-aux-3shards": llama, "qwen2-w3-noaux": sinq_factory("qwen2", nbits=3, aux=False)}


def test_fuzzed_checkpoints_fail_cleanly(fuzz_bases, tmp_path):
    t0 = time.perf_counter()
    total, results = run_fuzz(fuzz_bases, SEED, tmp_path)
    seconds = time.perf_counter() - t0
    assert len(results) == total
    bad = [r for r in results if r["outcome"] != "ok"]
    classes = Counter(r["cls"] for r in results if r["outcome"] == "ok" and r["cls"] != "control")
    stages = Counter(r.get("stage") for r in results if r["outcome"] == "ok")
    print(f"\nfuzz: {total} mutations tried in {seconds:.1f}s, {total - len(bad)} ok, {len(bad)} failed; "
          f"{len(classes)} error classes covered; stages {dict(stages)}")
    for cls, n in sorted(classes.items()):
        print(f"  {n:4d}  {cls}")
    for r in bad[:20]:
        print(f"  FAILED [{r['outcome']}] {r.get('base')}: {r['kind']} (expected {r.get('expect')}): "
              f"{r.get('msg', '')[:400]}")
    assert not bad, f"{len(bad)} of {total} fuzz cases failed (first: {bad[0]['kind']}: {bad[0]['outcome']})"
    assert total >= MIN_CASES and len(classes) >= MIN_CLASSES, (total, sorted(classes))


def test_hub_snapshot_may_lack_shards_a_local_folder_may_not(fuzz_bases, tmp_path):
    """A Hub cache snapshot gets its weights after the front end runs: listed shards that are
    not there yet are skipped (and reported); in a local folder they are an error."""
    from sinq_vllm.format.checkpoint import read_layer_metas
    from sinq_vllm.errors import SinqCheckpointError
    from sinq_vllm.format.validation import validate_checkpoint

    ckpt = Path(shutil.copytree(fuzz_bases["llama-w4-aux-3shards"], tmp_path / "snap"))
    shard = sorted(set(json.loads((ckpt / INDEX).read_text())["weight_map"].values()))[1]
    (ckpt / shard).unlink()
    metas = read_layer_metas(str(ckpt))
    report = validate_checkpoint(str(ckpt), metas, require_shards=False)
    assert report.skipped_shards == [shard] and report.shards == 2
    with pytest.raises(SinqCheckpointError, match=re.escape(shard) + ".*does not exist"):
        validate_checkpoint(str(ckpt), metas, require_shards=True)


SMOLLM2_SINQ = Path(__file__).resolve().parent.parent / "artifacts" / "smollm2-135m-instruct-sinq-w4g64"


@pytest.mark.skipif(not (SMOLLM2_SINQ / SIDECAR).is_file(), reason="no SmolLM2 SINQ artifact (run `make demo`)")
def test_real_checkpoint_validates_from_headers_only():
    from sinq_vllm.format.validation import validate_model_dir

    report = validate_model_dir(str(SMOLLM2_SINQ))
    data = sum(p.stat().st_size for p in SMOLLM2_SINQ.glob("*.safetensors"))
    print(f"\nSmolLM2 SINQ: {report.sinq_layers} layers, {report.tensors} tensors validated in "
          f"{report.seconds * 1e3:.1f} ms, {report.header_bytes} header bytes read of {data} bytes of shards")
    assert report.sinq_layers > 0 and report.header_bytes < data / 100


def _selftest_worker_main(argv: list[str]) -> None:
    """A stand-in worker whose cases pass, hang and kill the interpreter (harness self-test)."""
    args = json.loads(argv[0])
    kinds = ["ok", "hang", "ok", "crash", "ok"]
    print(TAG + json.dumps({"ready": len(kinds)}), flush=True)
    for i in range(args["start"], len(kinds)):
        print(TAG + json.dumps({"start": i}), flush=True)
        if kinds[i] == "hang":
            time.sleep(600)
        elif kinds[i] == "crash":
            os._exit(3)
        print(TAG + json.dumps({"done": i, "kind": kinds[i], "cls": "selftest", "outcome": "ok"}), flush=True)
    print(TAG + json.dumps({"end": True}), flush=True)


def test_harness_reports_hangs_and_crashes_and_goes_on(tmp_path):
    t0 = time.monotonic()
    total, results = run_fuzz({}, 0, tmp_path, case_timeout=2, mode="--selftest-worker")
    assert total == 5 and [r["outcome"] for r in results] == ["ok", "hang", "ok", "crash (exit 3)", "ok"]
    assert time.monotonic() - t0 < 30


def test_value_mutation_fails_the_engine_load(fuzz_bases, tmp_path, monkeypatch):
    """Through vLLM (engine in-process so the worker's exception reaches us): zero group
    scales in one layer pass the front end, and the load fails before any kernel runs."""
    import torch

    from ckpt_mutation import copy_checkpoint, edit_tensors

    ckpt = copy_checkpoint(fuzz_bases["llama-w4-aux-3shards"], tmp_path / "ckpt")
    module = "model.layers.1.mlp.down_proj"

    def zero_scales(tensors):
        for suffix in (".meta.scale.s", ".meta.scale.m"):
            if module + suffix in tensors:
                tensors[module + suffix] = torch.zeros_like(tensors[module + suffix])

    edit_tensors(ckpt, zero_scales)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    llm = None
    with pytest.raises(Exception) as info:
        llm = LLM(model=str(ckpt), dtype="float32", max_model_len=128, enforce_eager=True)
    assert llm is None  # no model is served
    chain, e = [], info.value
    while e is not None:
        chain.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    assert any("SinqCheckpointError" in c and module in c and "are zero" in c for c in chain), chain


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--fuzz-worker":
    _worker_main(sys.argv[2:])
elif __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--selftest-worker":
    _selftest_worker_main(sys.argv[2:])
