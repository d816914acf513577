"""sinq-vllm: serve SINQ-quantized checkpoints with vLLM.

vLLM loads this module in every process through the ``vllm.general_plugins`` entry
point and calls :func:`register`. Importing the package must stay cheap: no kernel
builds, no CUDA initialisation, no vLLM import at module level.
"""

__version__ = "0.1.0"

_REGISTERED = False


def register() -> None:
    """Register the ``sinq`` quantization method with vLLM (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from .vllm.plugin import register_with_vllm

    register_with_vllm()
    _REGISTERED = True
