"""SINQ quantizer: writes checkpoints in the reference SINQ format (docs/format.md §1-§2).

``quantize_weight`` handles one nn.Linear weight; ``quantize_model`` streams a local
Hugging Face safetensors folder into a sharded SINQ checkpoint.
"""

from .layer import QuantizedWeight, quantize_weight, quantize_weight_detailed, quantized_layout, stored_method
from .methods import METHODS, QuantMethod, get_method
from .model import QuantizeSummary, quantize_model
from .sinkhorn import sinkhorn_log

__all__ = [
    "METHODS",
    "QuantMethod",
    "QuantizeSummary",
    "QuantizedWeight",
    "get_method",
    "quantize_model",
    "quantize_weight",
    "quantize_weight_detailed",
    "quantized_layout",
    "sinkhorn_log",
    "stored_method",
]
