"""Shared test set-up: offline, small vLLM CPU engines, tiny models built once per session."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from pathlib import Path

# Before anything imports vLLM or Transformers: no hub, a small KV cache, and the
# reference SINQ package's start-up patch (if installed) kept out of our processes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("SINQ_AUTO_PATCH", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# LLM.apply_model ships a function to the worker process (memory accounting tests).
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
# the benchmarks' support package (shipped model and text, GGUF conversion); appended, never
# the repo root (its triton_kernels/ folder would shadow the package vLLM imports)
sys.path.append(str(Path(__file__).resolve().parent.parent / "benchmarks"))

from tiny_models import make_tiny_model, make_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory, tokenizer_dir):
    """``make(arch, **overrides)`` -> a tiny bf16 HF folder, built once per distinct request."""
    cache: dict = {}

    def make(arch: str, seed: int = 0, **overrides) -> Path:
        key = (arch, seed, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{arch}-bf16")
            cache[key] = make_tiny_model(arch, out, tokenizer_dir=tokenizer_dir, seed=seed, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def sinq_factory(tmp_path_factory, model_factory):
    """``make(arch, nbits=4, group_size=64, method="sinq", aux=True, skip=(), experts=True, routers=False,
    lm_head=False, **model_overrides)`` -> SINQ folder."""
    from sinq_vllm.quantizer import quantize_model

    cache: dict = {}

    def make(arch: str, nbits=4, group_size=64, method="sinq", aux=True, skip=(), experts=True, routers=False,
             lm_head=False, **overrides) -> Path:
        key = (arch, nbits, group_size, method, aux, tuple(skip), experts, routers, lm_head,
               tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in cache:
            src = model_factory(arch, **overrides)
            out = tmp_path_factory.mktemp(f"{arch}-sinq{nbits}g{group_size}")
            quantize_model(src, out, nbits=nbits, group_size=group_size, method=method, aux=aux,
                           skip=skip, overwrite=True, progress=False, experts=experts, routers=routers,
                           lm_head=lm_head)
            cache[key] = out
        return cache[key]

    return make


@contextlib.contextmanager
def vllm_engine(model_dir, **kwargs):
    """One vLLM CPU engine, shut down on exit so the next one gets the cores and memory."""
    from vllm import LLM

    opts = dict(dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
    opts.update(kwargs)
    llm = LLM(model=str(model_dir), **opts)
    try:
        yield llm
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
