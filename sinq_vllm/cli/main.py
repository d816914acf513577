"""``sinq-vllm`` command line.

Each subcommand lives in a pair of functions: ``add_<name>_parser(subparsers)`` sets up
its options and stores its handler as ``func``; the handler takes the parsed args and
returns an exit code. New subcommands register themselves in ``SUBCOMMANDS``. The
parsers live together here and import nothing heavy, so ``sinq-vllm --help`` is instant;
each handler imports its implementation (``quantizer.model``, ``cli.inspect``,
``cli.convert``, ``cli.doctor``) when it runs. ``quantize`` and ``inspect`` take Hub model
ids too (``--revision``, ``--cache-dir``; format/hub.py).
Errors raised on purpose (``SinqError``) are printed as one line, without a traceback,
with exit code 2, like argparse's own usage errors.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import SinqError

EXIT_USAGE = 2
_NBITS_CHOICES = "{2,3,4,5,6,8}"
# The rows of quantizer/methods.py (not imported here: it pulls in torch); tests/test_asinq.py
# checks that both list the same methods.
QUANTIZE_METHODS = ("sinq", "asinq", "sinq_nf4", "sinq_nf3", "sinq_fit", "sinq_gptq", "rtn")


def _command(subparsers, name: str, func, help: str, description: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help=help, description=description)
    p.set_defaults(func=func)
    return p


def add_quantize_parser(subparsers) -> None:
    p = _command(
        subparsers, "quantize", run_quantize,
        help="quantize a Hugging Face safetensors model (a folder or a Hub id) to a SINQ checkpoint",
        description=(
            "Quantize every nn.Linear except the output head (lm_head, unless --quantize-lm-head) with SINQ and write the "
            "reference SINQ sharded-safetensors layout plus a config.json quantization_config."
        ),
    )
    p.add_argument("src_dir", metavar="SRC",
                   help="Hugging Face model folder (config.json + *.safetensors), or a Hub model id ORG/NAME")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (must differ from SRC_DIR)")
    # Types stay plain int so the quantizer's own validation gives the one error message.
    p.add_argument("--nbits", type=int, default=None, metavar=_NBITS_CHOICES,
                   help="bits per weight (default 4; 3 for sinq_nf3)")
    p.add_argument("--group-size", type=int, default=64, metavar="N",
                   help="weights per scale/zero group along in_features, a multiple of 8, >= 16 (default 64)")
    p.add_argument("--method", default="sinq", metavar="{" + ",".join(QUANTIZE_METHODS) + "}",
                   help="sinq: Sinkhorn-normalized (default); asinq: A-SINQ, SINQ plus an activation-aware scale "
                   "from calibration text; sinq_nf4 / sinq_nf3: SINQ with the NF4 (4-bit) / NF3 (3-bit) codebook; "
                   "sinq_fit: SINQ's format with scales, zeros and column scales fitted to the weights (better "
                   "quality, no calibration); sinq_gptq: sinq_fit plus codes chosen by error feedback on "
                   "calibration text (best quality, calibrated); "
                   "rtn: plain round-to-nearest baseline")
    p.add_argument("--calib-data", default=None, metavar="FILE",
                   help="asinq, sinq_gptq: calibration text, UTF-8 plain text or .jsonl (one JSON string or {\"text\": ...} "
                   "per line). Default: the reference's built-in prompts")
    p.add_argument("--calib-samples", type=int, default=None, metavar="N",
                   help="asinq, sinq_gptq: at most N calibration samples (default 128; sinq_gptq with --calib-data: 32)")
    p.add_argument("--calib-seqlen", type=int, default=None, metavar="L",
                   help="asinq, sinq_gptq: tokens per calibration sample (default 128; sinq_gptq with --calib-data: 512)")
    p.add_argument("--no-aux", dest="aux", action="store_false",
                   help="store scales and zeros in fp16 instead of the default 8-bit quantAux")
    p.add_argument("--no-experts", dest="experts", action="store_false",
                   help="MoE models: keep the routed experts in full precision (default: quantize each expert)")
    p.add_argument("--quantize-routers", dest="routers", action="store_true",
                   help="MoE models: quantize the router gates too (default: keep them in full precision, as vLLM does)")
    p.add_argument("--quantize-lm-head", dest="lm_head", action="store_true",
                   help="quantize the output head too (served packed; a tied head is untied, the embeddings "
                   "stay in full precision). Default: keep it in full precision")
    p.add_argument("--skip", nargs="+", action="extend", default=[], metavar="MODULE",
                   help="keep modules matching these names in full precision (fnmatch pattern or substring)")
    p.add_argument("--max-shard-size", default="4GB", help="largest output shard, e.g. 4GB, 500MB (default 4GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a SINQ checkpoint already in OUT_DIR")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    _add_hub_options(p)
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log per-layer details")


def _add_hub_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--revision", default=None, metavar="REV",
                   help="Hub model ids: the branch, tag or commit to use (default: main)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="Hub model ids: download into this cache folder (like vLLM's --download-dir; default: the "
                   "Hugging Face cache). HF_HUB_OFFLINE=1 reads the cache only")


#: the files of a Hub model that quantizing it needs (weights, config, tokenizer, generation defaults)
_SOURCE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja", "tokenizer*", "vocab*",
                    "LICENSE*", "NOTICE*"]


def _source_dir(model: str, revision: str | None, cache_dir: str | None) -> str:
    """A local folder for ``model``: itself, or the Hub snapshot downloaded into the cache."""
    from ..format.hub import download_snapshot, is_hub_id

    if not is_hub_id(model):
        return model
    print(f"downloading {model}" + (f" (revision {revision})" if revision else "") + " ...", file=sys.stderr)
    return download_snapshot(model, revision, cache_dir, allow_patterns=_SOURCE_PATTERNS)


def run_quantize(args: argparse.Namespace) -> int:
    from ..quantizer.model import quantize_model  # keeps `sinq-vllm --help` fast

    s = quantize_model(
        _source_dir(args.src_dir, args.revision, args.cache_dir),
        args.out_dir,
        nbits=args.nbits,
        group_size=args.group_size,
        method=args.method,
        aux=args.aux,
        skip=args.skip,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        progress=args.progress,
        experts=args.experts,
        routers=args.routers,
        lm_head=args.lm_head,
        calib_data=args.calib_data,
        calib_samples=args.calib_samples,
        calib_seqlen=args.calib_seqlen,
    )
    print(
        f"wrote {s.out_dir}: {len(s.quantized)} quantized Linear layers, {s.copied} tensors copied, "
        f"{len(s.shards)} shard(s), {s.total_size / 1e6:.1f} MB (source {s.source_size / 1e6:.1f} MB), "
        f"{s.seconds:.1f}s"
    )
    if s.experts_kept:
        print(f"{len(s.experts_kept)} MoE experts module(s) kept in full precision")
    if s.calibration:
        print(f"{s.method} calibration on {s.calibration}; {len(s.calibrated_layers)} of {len(s.quantized)} layers "
              "quantized with their calibration inputs (the others: kurtosis-gated or outside the decoder blocks)")
    if s.kurtosis_gated:
        print(f"{len(s.kurtosis_gated)} layer(s) had kurtosis > 5 and were quantized without Sinkhorn (the reference's gate)")
    return 0


def add_inspect_parser(subparsers) -> None:
    p = _command(
        subparsers, "inspect", run_inspect,
        help="show what a SINQ checkpoint holds and whether sinq-vllm can serve it",
        description=(
            "Read a checkpoint folder's config, sidecar meta and safetensors headers (no tensor data) and "
            "print per-layer bits, group size, method, quantAux and tiling, the modules kept in full "
            "precision, the bytes of codes, scales and other tensors vs an estimated bf16 size, and "
            "whether sinq-vllm can serve it (and why not). Exit status 0 if it can, 1 if not."
        ),
    )
    p.add_argument("model_dir", metavar="MODEL", help="checkpoint folder, or a Hub model id ORG/NAME")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--layers", action="store_true", help="list every quantized module")
    _add_hub_options(p)


def run_inspect(args: argparse.Namespace) -> int:
    import json

    from .inspect import format_report, inspect_checkpoint

    report = inspect_checkpoint(args.model_dir, args.revision, args.cache_dir)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(format_report(report, show_layers=args.layers))
    return 0 if report.servable else 1


def add_convert_parser(subparsers) -> None:
    p = _command(
        subparsers, "convert", run_convert,
        help="convert a reference SINQ qmodel.pt checkpoint into sharded safetensors",
        description=(
            "Rewrite a checkpoint saved by the reference AutoSINQHFModel.save_quantized (config.json, "
            "tokenizer, qmodel.pt) in the sharded safetensors + sidecar layout vLLM loads. The .pt file "
            "is read with torch.load(weights_only=True) only: files holding arbitrary Python objects "
            "are refused."
        ),
    )
    p.add_argument("src", metavar="SRC", help="folder holding qmodel.pt (and config.json), or the .pt file")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder")
    p.add_argument("--max-shard-size", default="4GB", help="largest output shard, e.g. 4GB, 500MB (default 4GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in OUT_DIR")


def run_convert(args: argparse.Namespace) -> int:
    from .convert import convert_pt

    s = convert_pt(args.src, args.out_dir, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    print(
        f"wrote {s.out_dir}: {len(s.quantized)} SINQ modules, {len(s.plain)} other modules, {s.tensors} tensors "
        f"in {len(s.shards)} shard(s), {s.total_size / 1e6:.1f} MB"
        + (f"; left out {len(s.dropped)} rotary buffers" if s.dropped else "")
    )
    return 0


def add_doctor_parser(subparsers) -> None:
    p = _command(
        subparsers, "doctor", run_doctor,
        help="show which kernel backend SINQ layers will use on this machine, and why",
        description=(
            "Report the versions (sinq-vllm, torch, vLLM), whether the native CPU/CUDA kernels are built and load "
            "(and why not), and per layer kind and activation dtype the kernel backend vLLM's SINQ layers will use "
            "here, with the reasons preferred backends are skipped. Exit status 1 when SINQ layers would run on "
            "the slow torch fallback on a CPU the native kernel supports."
        ),
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run_doctor(args: argparse.Namespace) -> int:
    import json

    from .doctor import doctor, format_doctor

    report = doctor()
    print(json.dumps(report.to_json(), indent=2) if args.json else format_doctor(report))
    return 1 if report.warnings else 0


SUBCOMMANDS = [add_quantize_parser, add_inspect_parser, add_convert_parser, add_doctor_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sinq-vllm", description="Tools for SINQ-quantized models and vLLM.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log per-layer details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except SinqError as e:
        print(f"sinq-vllm {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
