"""`PeftSpec`: what to inject into a backbone. Defaults follow SPEC 2.1-2.3 (official SIBO scripts)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import PeftDsError

METHODS = ("lora", "adapter", "adamix_lora", "adamix_adapter", "bilora")
ADAPTER_FAMILY = ("adapter", "adamix_adapter")
NON_LINEARITIES = ("tanh", "relu", "gelu", "silu")
# LLM-Adapters: lora_dropout 0.05, adapter_dropout 0.0.
DEFAULT_DROPOUT = {"lora": 0.05, "adapter": 0.0, "adamix_lora": 0.05, "adamix_adapter": 0.0, "bilora": 0.05}
SINGULAR_VALUES = ("softmax", "real", "binary")
HYPERGRADIENTS = ("darts", "first_order", "exact")


@dataclass
class PeftSpec:
    method: str = "lora"
    r: int = 32
    alpha: float = 64.0
    dropout: float | None = None  # None: the method's default (DEFAULT_DROPOUT)
    bottleneck_size: int = 256
    non_linearity: str = "tanh"
    adapter_scale: float = 1.0
    target_modules: list[str] | None = None  # None: the architecture's defaults
    sibo_lambda: float = 0.0  # 0: SIBO off
    sibo_sites: list[str] | None = None  # None: SPEC 2.3 defaults for method and architecture
    sibo_learnable: bool = False
    # AdaMix (SPEC 2.4): experts of the adapter's down projection / LoRA's A, the other one shared
    num_experts: int = 4
    share_down: bool = False
    share_up: bool = True
    share_A: bool = False
    share_B: bool = True
    consistency_weight: float = 1.0
    # BiLoRA (SPEC 2.5): lam(E) form, regulariser weights, T1 lower / T2 upper steps per global step,
    # the D1:D2 split, the upper learning rate (None: train.lr), the hypergradient and DARTS's xi
    singular_values: str = "softmax"
    gamma1: float = 0.1
    gamma2: float = 1e-4  # not given by the paper; the lab's BiDoRA code carries lamb=1e-4
    T1: int = 1
    T2: int = 1
    split_ratio: float = 0.8
    upper_lr: float | None = None
    hypergradient: str = "darts"
    # darts' E.grad = g + xi (g- - g+) / (2 eps) ~ g - xi d2L1/dEdV v: xi is DARTS's virtual step. 1 is
    # Betty's darts, which has no xi and which the authors' code runs; train.lr is DARTS's second-order
    # approximation, the hypergradient through one unrolled lower step (an implicit term lr times as large)
    darts_xi: float = 1.0
    extra: dict = field(default_factory=dict, repr=False)  # reserved for later methods; must stay empty

    @property
    def effective_dropout(self) -> float:
        return DEFAULT_DROPOUT[self.method] if self.dropout is None else self.dropout

    @property
    def sibo(self) -> bool:
        return self.sibo_lambda > 0

    def validate(self) -> "PeftSpec":
        """Checks what needs no model; `apply_peft` checks the rest against the architecture."""
        if self.method not in METHODS:
            raise PeftDsError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise PeftDsError(f"r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise PeftDsError(f"alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.effective_dropout < 1.0:
            raise PeftDsError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.bottleneck_size, int) or self.bottleneck_size <= 0:
            raise PeftDsError(f"bottleneck_size must be a positive integer, got {self.bottleneck_size!r}")
        if self.non_linearity not in NON_LINEARITIES:
            raise PeftDsError(
                f"unknown non_linearity {self.non_linearity!r}; choose one of {', '.join(NON_LINEARITIES)}"
            )
        if not 0.0 <= self.sibo_lambda < 1.0:
            raise PeftDsError(f"sibo_lambda must be in [0, 1), got {self.sibo_lambda!r}")
        if self.sibo_learnable and self.sibo_lambda == 0:
            raise PeftDsError(
                "sibo_learnable needs sibo_lambda in (0, 1): lambda = sigmoid(theta) starts at sibo_lambda"
            )
        if self.sibo_sites is not None and not self.sibo:
            raise PeftDsError("sibo_sites given but sibo_lambda is 0 (SIBO off)")
        for name in ("target_modules", "sibo_sites"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (list, tuple)) or not value):
                raise PeftDsError(f"{name} must be a non-empty list of module names or None, got {value!r}")
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise PeftDsError(f"num_experts must be an integer >= 1, got {self.num_experts!r}")
        if self.method == "adamix_adapter" and self.share_down and self.share_up and self.num_experts > 1:
            raise PeftDsError("share_down and share_up are both set: an adapter mixture needs experts of one of them")
        if self.method == "adamix_lora" and self.share_A and self.share_B and self.num_experts > 1:
            raise PeftDsError("share_A and share_B are both set: a LoRA mixture needs experts of one of them")
        if not self.consistency_weight >= 0:
            raise PeftDsError(f"consistency_weight must be >= 0, got {self.consistency_weight!r}")
        if self.singular_values not in SINGULAR_VALUES:
            raise PeftDsError(f"unknown singular_values form {self.singular_values!r}; choose one of "
                              f"{', '.join(SINGULAR_VALUES)}")
        for name in ("T1", "T2"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise PeftDsError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0.0 < self.split_ratio < 1.0:
            raise PeftDsError(f"split_ratio must be in (0, 1), got {self.split_ratio!r}")
        if self.hypergradient not in HYPERGRADIENTS:
            raise PeftDsError(f"unknown hypergradient {self.hypergradient!r}; choose one of {', '.join(HYPERGRADIENTS)}")
        for name in ("gamma1", "gamma2"):
            if not getattr(self, name) >= 0:
                raise PeftDsError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.upper_lr is not None and not self.upper_lr > 0:
            raise PeftDsError(f"upper_lr must be > 0, got {self.upper_lr!r}")
        if self.extra:
            raise PeftDsError(f"unknown PeftSpec fields: {', '.join(sorted(self.extra))}")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PeftSpec":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = {k: v for k, v in d.items() if k not in known}
        return cls(**{k: v for k, v in d.items() if k in known}, extra=unknown)
