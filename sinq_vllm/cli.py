"""``sinq-vllm`` command line.

Each subcommand lives in a pair of functions: ``add_<name>_parser(subparsers)`` sets up
its options and stores its handler as ``func``; the handler takes the parsed args and
returns an exit code. New subcommands register themselves in ``SUBCOMMANDS``.
Errors raised on purpose (``SinqError``) are printed as one line, without a traceback,
with exit code 2, like argparse's own usage errors.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import SinqError

EXIT_USAGE = 2
_NBITS_CHOICES = "{2,3,4,5,6,8}"


def add_quantize_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "quantize",
        help="quantize a local Hugging Face safetensors model to a SINQ checkpoint",
        description=(
            "Quantize every nn.Linear except the output head (lm_head) with SINQ and write the "
            "reference SINQ sharded-safetensors layout plus a config.json quantization_config."
        ),
    )
    p.add_argument("src_dir", metavar="SRC_DIR", help="Hugging Face model folder (config.json + *.safetensors)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (must differ from SRC_DIR)")
    # Types stay plain int so the quantizer's own validation gives the one error message.
    p.add_argument("--nbits", type=int, default=4, metavar=_NBITS_CHOICES, help="bits per weight (default 4)")
    p.add_argument("--group-size", type=int, default=64, metavar="N",
                   help="weights per scale/zero group along in_features, a multiple of 8, >= 16 (default 64)")
    p.add_argument("--method", default="sinq", metavar="{sinq,rtn}",
                   help="sinq: Sinkhorn-normalized (default); rtn: plain round-to-nearest baseline")
    p.add_argument("--no-aux", dest="aux", action="store_false",
                   help="store scales and zeros in fp16 instead of the default 8-bit quantAux")
    p.add_argument("--skip", nargs="+", action="extend", default=[], metavar="MODULE",
                   help="keep modules matching these names in full precision (fnmatch pattern or substring)")
    p.add_argument("--max-shard-size", default="4GB", help="largest output shard, e.g. 4GB, 500MB (default 4GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a SINQ checkpoint already in OUT_DIR")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log per-layer details")
    p.set_defaults(func=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    from .quantizer.model import quantize_model  # keeps `sinq-vllm --help` fast

    s = quantize_model(
        args.src_dir,
        args.out_dir,
        nbits=args.nbits,
        group_size=args.group_size,
        method=args.method,
        aux=args.aux,
        skip=args.skip,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        progress=args.progress,
    )
    print(
        f"wrote {s.out_dir}: {len(s.quantized)} quantized Linear layers, {s.copied} tensors copied, "
        f"{len(s.shards)} shard(s), {s.total_size / 1e6:.1f} MB (source {s.source_size / 1e6:.1f} MB), "
        f"{s.seconds:.1f}s"
    )
    if s.kurtosis_gated:
        print(f"{len(s.kurtosis_gated)} layer(s) had kurtosis > 5 and were quantized with plain RTN")
    return 0


SUBCOMMANDS = [add_quantize_parser]


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
