"""The quantization methods of ``sinq-vllm quantize``: one table, one row per method.

The reference encodes a method as substring flags of its method string (docs/format.md
§1.1: ``sinq`` Sinkhorn, ``awq``/``l1`` the A-SINQ activation scale, ``nf4``/``nf3`` a
non-uniform codebook, ``quantAux`` 8-bit scales and zeros). A row here names those flags
once; the layer quantizer (``quantizer/layer.py``) reads the row instead of the name, so
a new method is a new row (plus its algorithm where the existing flags do not cover it).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SinqConfigError
from ..format.codebooks import CODEBOOK_BITS
from ..format.packing import SUPPORTED_BITS


@dataclass(frozen=True)
class QuantMethod:
    name: str  # --method value; config.json quantization_config["method"]
    stored: str  # the sidecar method string; "_quantAux" is appended with quantAux (docs/format.md §2.4)
    summary: str  # one line for --help and errors
    sinkhorn: bool = True  # Sinkhorn normalisation (docs/format.md §1.2)
    # the reference's kurtosis gate: heavy-tailed matrices skip Sinkhorn and get uniform RTN
    # codes (docs/format.md §1.4); off for NF methods, whose label cannot hold uniform codes (§7)
    kurtosis_gate: bool = True
    codebook: str | None = None  # "nf4" | "nf3": codes index that table (docs/format.md §1.4)
    calibrated: bool = False  # needs input activations of each Linear (A-SINQ, docs/format.md §1.5)
    # t, s, z and the codes fitted to the weights (quantizer/sinq_fit.py, docs/design.md §7)
    # instead of SINQ's balancing + min-max; stored exactly as SINQ stores them
    fitted: bool = False
    # codes chosen by error feedback on the calibration inputs (quantizer/sinq_gptq.py, docs/design.md §7)
    error_feedback: bool = False
    # calibration inputs of a block computed through the blocks before it as quantized (GPTQ's
    # order) instead of the original weights (the reference's A-SINQ); quantizer/activations.py
    sequential: bool = False
    # (samples, seqlen) taken from --calib-data when not given; None: 128 x 128, the reference's shape
    calib_shape: tuple[int, int] | None = None
    writes_as: str | None = None  # the method another reader sees (config.json "method"); default: name

    @property
    def format_name(self) -> str:
        """config.json's ``quantization_config["method"]``: Transformers' SinqConfig accepts only its own."""
        return self.writes_as or self.name

    @property
    def bits(self) -> tuple[int, ...]:
        """The code widths this method can write."""
        return (CODEBOOK_BITS[self.codebook],) if self.codebook else tuple(SUPPORTED_BITS)

    @property
    def default_bits(self) -> int:
        return 4 if 4 in self.bits else self.bits[0]

    def stored_method(self, aux: bool) -> str:
        return f"{self.stored}_quantAux" if aux else self.stored


_ROWS = (
    QuantMethod("sinq", "sinq", "Sinkhorn-normalized uniform codes (default)"),
    QuantMethod("asinq", "sinq_awq_l1", "A-SINQ: SINQ plus an activation-aware scale from calibration text",
                calibrated=True),
    QuantMethod("sinq_nf4", "sinq_nf4", "SINQ with the 4-bit NF4 codebook", codebook="nf4", kurtosis_gate=False),
    QuantMethod("sinq_nf3", "sinq_nf3", "SINQ with the 3-bit NF3 codebook", codebook="nf3", kurtosis_gate=False),
    QuantMethod("sinq_fit", "sinq", "SINQ's format with scales, zeros and column scales fitted to the weights "
                "(better quality, no calibration; readers see a SINQ checkpoint)", kurtosis_gate=False, fitted=True,
                writes_as="sinq"),
    QuantMethod("sinq_gptq", "sinq", "sinq_fit plus codes chosen by error feedback on calibration text (GPTQ-style; "
                "best quality; readers see a SINQ checkpoint)", kurtosis_gate=False, fitted=True, calibrated=True,
                error_feedback=True, sequential=True, calib_shape=(32, 512), writes_as="sinq"),
    # RTN layers carry no "sinq" substring, so readers know t == 1.
    QuantMethod("rtn", "rtn", "plain round-to-nearest baseline (no Sinkhorn)", sinkhorn=False, kurtosis_gate=False),
)
#: name -> method, in --help order
METHODS: dict[str, QuantMethod] = {m.name: m for m in _ROWS}


def calibrated_methods() -> list[str]:
    """The methods that take calibration text (``--calib-data``), in --help order."""
    return [m.name for m in _ROWS if m.calibrated]


def get_method(name: str) -> QuantMethod:
    """The row of ``name``; an unknown name is an error listing the valid ones."""
    method = METHODS.get(name) if isinstance(name, str) else None
    if method is None:
        raise SinqConfigError(f"method={name!r} is not supported; choose one of {list(METHODS)}")
    return method
