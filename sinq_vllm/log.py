"""Loggers of sinq-vllm, children of vLLM's ``vllm`` logger so they share its handlers and level."""

import logging


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger("vllm.sinq." + name.rsplit(".", 1)[-1])


_said: set[tuple] = set()


def log_once(logger: logging.Logger, msg: str, *args, level: int = logging.INFO) -> None:
    """Log ``msg % args`` the first time this exact message is asked for in this process."""
    key = (logger.name, level, msg, args)
    if key not in _said:
        _said.add(key)
        logger.log(level, msg, *args)
