"""The hardware catalogue: memory, bandwidth and peak dense FLOP/s per dtype.

Numbers are the vendors' datasheet figures for *dense* math (no 2:4 sparsity), in decimal units
(1 GB = 1e9 bytes, 1 TB/s = 1e12 bytes/s) as the planner's arithmetic uses them. They are
ceilings: real kernels reach perhaps 60-90% of bandwidth and less of peak FLOP/s.

Example:
    >>> h = find_hardware("h100")
    >>> h.name, h.bandwidth
    ('H100 SXM 80GB', 3350000000000.0)
    >>> round(h.ridge_point("fp16"))  # FLOP per byte where memory- and compute-bound meet
    295
"""

from __future__ import annotations

from dataclasses import dataclass, field

from modelpress.errors import UserError


@dataclass(frozen=True)
class Hardware:
    """One accelerator (or CPU socket).

    Attributes:
        name: display name.
        memory: device memory in bytes.
        bandwidth: memory bandwidth in bytes/s.
        flops: peak dense FLOP/s by compute dtype (``fp16`` covers bf16; ``int8``, ``fp8``, ``fp4``).
        aliases: lower-case names that select it; the first is the short display name.
    """

    name: str
    memory: float
    bandwidth: float
    flops: dict[str, float] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    @property
    def short(self) -> str:
        return self.aliases[0] if self.aliases else self.name

    def peak_flops(self, dtype: str = "fp16") -> float:
        """Peak dense FLOP/s for ``dtype``, falling back to fp16 when the chip lacks a faster path."""
        return self.flops.get(dtype) or self.flops["fp16"]

    def ridge_point(self, dtype: str = "fp16") -> float:
        """Arithmetic intensity (FLOP/byte) above which a kernel is compute-bound."""
        return self.peak_flops(dtype) / self.bandwidth


# name, memory, bandwidth, dense peak FLOP/s by dtype, aliases (the first alias is the short name)
CATALOGUE: tuple[Hardware, ...] = (
    Hardware("A100 SXM 40GB", 40e9, 1.555e12, {"fp16": 312e12, "int8": 624e12}, ("a100-40", "a100-40gb")),
    Hardware("A100 SXM 80GB", 80e9, 2.039e12, {"fp16": 312e12, "int8": 624e12}, ("a100", "a100-80", "a100-80gb")),
    Hardware("H100 SXM 80GB", 80e9, 3.35e12, {"fp16": 989e12, "fp8": 1979e12, "int8": 1979e12}, ("h100", "h100-sxm")),
    Hardware("H100 PCIe 80GB", 80e9, 2.0e12, {"fp16": 756e12, "fp8": 1513e12, "int8": 1513e12}, ("h100-pcie",)),
    Hardware("H200 SXM 141GB", 141e9, 4.8e12, {"fp16": 989e12, "fp8": 1979e12, "int8": 1979e12}, ("h200",)),
    Hardware("B200 180GB", 180e9, 8.0e12, {"fp16": 2250e12, "fp8": 4500e12, "int8": 4500e12, "fp4": 9000e12}, ("b200",)),
    Hardware("L4 24GB", 24e9, 0.3e12, {"fp16": 121e12, "fp8": 242.5e12, "int8": 242.5e12}, ("l4",)),
    Hardware("L40S 48GB", 48e9, 0.864e12, {"fp16": 362e12, "fp8": 733e12, "int8": 733e12}, ("l40s",)),
    Hardware("RTX 3090 24GB", 24e9, 0.936e12, {"fp16": 71e12, "int8": 142e12}, ("rtx3090", "rtx 3090", "3090")),
    Hardware("RTX 4090 24GB", 24e9, 1.008e12, {"fp16": 165e12, "fp8": 330e12, "int8": 330e12}, ("rtx4090", "rtx 4090", "4090")),
    Hardware("RTX 5090 32GB", 32e9, 1.792e12, {"fp16": 210e12, "fp8": 419e12, "int8": 419e12, "fp4": 838e12},
             ("rtx5090", "rtx 5090", "5090")),
    Hardware("Apple M2 Ultra 192GB", 192e9, 0.8e12, {"fp16": 27e12}, ("m2-ultra", "m2 ultra")),
    Hardware("Apple M4 Max 128GB", 128e9, 0.546e12, {"fp16": 34e12}, ("m4-max", "m4 max")),
    Hardware("CPU 2x DDR5-4800 64GB", 64e9, 76.8e9, {"fp16": 2e12}, ("cpu", "ddr5")),
    Hardware("CPU 12x DDR5-4800 768GB", 768e9, 460.8e9, {"fp16": 20e12}, ("cpu-server", "epyc")),
)


def _key(text: str) -> str:
    return " ".join(text.lower().replace("_", " ").split())


def find_hardware(name: str) -> Hardware:
    """The catalogue entry called ``name`` (case-insensitive; an alias or a unique prefix), or
    this machine measured for ``local`` (:mod:`modelpress.plan.local`).

    Raises:
        UserError: no entry, or several, match.
    """
    key = _key(name)
    if key == "local":  # this machine: measured, not catalogued
        from modelpress.plan.local import LOCAL_NAME, measure_local

        memory, bandwidth, flops = measure_local()
        return Hardware(LOCAL_NAME, memory, bandwidth, {"fp16": flops, "fp32": flops}, ("local",))
    for hw in CATALOGUE:
        if key == _key(hw.name) or key in {_key(a) for a in hw.aliases}:
            return hw
    matches = [hw for hw in CATALOGUE if _key(hw.name).startswith(key)]
    if len(matches) == 1:
        return matches[0]
    names = ", ".join(hw.aliases[0] if hw.aliases else hw.name for hw in CATALOGUE)
    what = "matches several entries" if matches else "is not in the catalogue"
    raise UserError(f"hardware {name!r} {what}; choose one of: {names}, or local (this machine, measured)")
