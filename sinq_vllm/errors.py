"""Error types raised by sinq-vllm.

One type per audience: a checkpoint that cannot be served faithfully, and a user
option that is not valid. Both carry enough context (file, tensor, option) for the
message alone to say what to fix.
"""


class SinqError(Exception):
    """Base class of every error sinq-vllm raises on purpose."""


class SinqCheckpointError(SinqError, ValueError):
    """A checkpoint (file, tensor or sidecar entry) is missing, malformed or unsupported."""


class SinqConfigError(SinqError, ValueError):
    """An option (CLI flag, quantization_config key, environment variable) is invalid."""
