"""The ``sinq-vllm`` command line: ``quantize``, ``inspect``, ``convert``."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
