"""Loggers of sinq-vllm, children of vLLM's ``vllm`` logger so they share its handlers and level."""

import logging


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger("vllm.sinq." + name.rsplit(".", 1)[-1])
