"""A quantization recipe is data: quantizer specs plus name-pattern rules (fnmatch).

Rules apply in order, later ones overriding earlier ones, so a method writes e.g.
``QuantRule("conv_in", quantize_weight=False, quantize_input=False)`` for an FP exception.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Any

BITS_RE = re.compile(r"^w(\d+)a(\d+)$")
ALLOWED_BITS = (2, 3, 4, 5, 6, 7, 8, 16, 32)


@dataclass
class QuantizerSpec:
    n_bits: int = 8
    per_channel: bool = False
    init: str = "lp"  # lp (clipping search, p below) | minmax
    p: float = 2.4
    symmetric: bool = False
    enabled: bool = True
    ema: str = "zero_forced"  # running-stat range rule: zero_forced (TFMQ) | raw (Q-Diffusion)


@dataclass
class QuantRule:
    pattern: str
    weight_bits: int | None = None
    act_bits: int | None = None
    quantize_weight: bool | None = None
    quantize_input: bool | None = None
    skip: bool = False  # leave the module as it is (not wrapped at all)

    def matches(self, name: str) -> bool:
        return fnmatchcase(name, self.pattern)


@dataclass
class LayerPlan:
    """What the rules decide for one layer."""

    wrap: bool
    weight_bits: int
    act_bits: int
    quantize_weight: bool
    quantize_input: bool


@dataclass
class QuantRecipe:
    weight: QuantizerSpec = field(default_factory=lambda: QuantizerSpec(n_bits=8, per_channel=True))
    act: QuantizerSpec = field(default_factory=lambda: QuantizerSpec(n_bits=8))
    rules: list[QuantRule] = field(default_factory=list)

    def plan(self, name: str) -> LayerPlan:
        plan = LayerPlan(True, self.weight.n_bits, self.act.n_bits, self.weight.enabled, self.act.enabled)
        for rule in self.rules:
            if not rule.matches(name):
                continue
            if rule.skip:
                plan.wrap = False
            for attr in ("weight_bits", "act_bits", "quantize_weight", "quantize_input"):
                value = getattr(rule, attr)
                if value is not None:
                    setattr(plan, attr, value)
        return plan

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantRecipe:
        return cls(
            weight=QuantizerSpec(**d["weight"]),
            act=QuantizerSpec(**d["act"]),
            rules=[QuantRule(**r) for r in d.get("rules", [])],
        )

    def with_bits(self, w_bits: int, a_bits: int) -> QuantRecipe:
        """32 bits means that side stays full precision."""
        return replace(
            self,
            weight=replace(self.weight, n_bits=w_bits, enabled=w_bits < 32),
            act=replace(self.act, n_bits=a_bits, enabled=a_bits < 32),
        )


def parse_bits(bits: str) -> tuple[int, int]:
    """'w4a8' -> (4, 8); 'fp' -> (32, 32). Raises ValueError with the accepted forms."""
    s = str(bits).strip().lower()
    if s == "fp":
        return 32, 32
    m = BITS_RE.match(s)
    if not m or int(m.group(1)) not in ALLOWED_BITS or int(m.group(2)) not in ALLOWED_BITS:
        raise ValueError(
            f"invalid bits '{bits}': expected 'fp' or 'w<W>a<A>' with W and A in {list(ALLOWED_BITS)} (e.g. w4a8)"
        )
    return int(m.group(1)), int(m.group(2))
