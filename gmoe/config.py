"""GMoEConfig: every knob of a GMoE adapter, validated at construction, saved as JSON."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from gmoe_kernels.backend import BACKENDS

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_TYPE = "GMOE"
FORMAT_VERSION = 3  # 2: λ and σ of shape (1,) (0-dim in 1); token_coupling, load_decay, freeze_loss_params; 3: token_readout
READABLE_FORMAT_VERSIONS = (1, 2, 3)  # older adapters lack the newer fields: their defaults are the older behaviour
ROUTERS = ("graph", "linear")
TOKEN_COUPLINGS = ("degree", "uniform")
ADAPTER_DTYPES = ("float32", "base")
EXPERT_MODULES = ("gate_proj", "up_proj", "down_proj")


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _fail(name, value, allowed):
    raise ValueError(f"GMoEConfig.{name}={value!r} is invalid: {allowed}")


@dataclass
class GMoEConfig:
    """Configuration of a GMoE adapter (see README, "Config fields").

    Defaults follow the paper's best setting (E 8, K 2, r 2, GCN 2 x 256).
    """

    num_experts: int = 8
    top_k: int = 2
    r: int = 2
    lora_alpha: float = 4.0
    lora_dropout: float = 0.0
    router: str = "graph"
    gcn_layers: int = 2
    gcn_dim: int = 256
    edge_density: float = 0.1
    poisson_loss_coef: float = 0.005
    normal_loss_coef: float = 8.0
    aux_loss_coef: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    expert_modules: list[str] = field(default_factory=lambda: list(EXPERT_MODULES))
    token_init_gain: float = 100.0
    token_coupling: str = "degree"
    token_readout: bool = False
    load_decay: float = 1.0
    freeze_loss_params: bool = False
    adapter_dtype: str = "float32"
    backend: str = "auto"
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        def integer(name, low, high=None):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                _fail(name, value, f"must be an int >= {low}")
            if value < low or (high is not None and value > high):
                _fail(name, value, f"must be in [{low}, {high}]" if high is not None else f"must be >= {low}")

        def number(name, low, high=None, low_open=False):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
                _fail(name, value, "must be a finite number")
            if value < low or (low_open and value == low) or (high is not None and value > high):
                bound = "(" if low_open else "["
                _fail(name, value, f"must be in {bound}{low}, {high if high is not None else 'inf'}]")

        integer("num_experts", 1, 256)
        integer("top_k", 1)
        if self.top_k > self.num_experts:
            _fail("top_k", self.top_k, f"must be <= num_experts ({self.num_experts})")
        integer("r", 1)
        number("lora_alpha", 0, low_open=True)
        number("lora_dropout", 0.0, 1.0)
        if self.lora_dropout >= 1.0:
            _fail("lora_dropout", self.lora_dropout, "must be in [0, 1)")
        if self.router not in ROUTERS:
            _fail("router", self.router, f"choose one of {ROUTERS}")
        integer("gcn_layers", 1, 8)
        integer("gcn_dim", 1)
        number("edge_density", 0.0, 1.0)
        for name in ("poisson_loss_coef", "normal_loss_coef", "aux_loss_coef"):
            number(name, 0.0)
        number("token_init_gain", 0.0, low_open=True)
        if self.token_coupling not in TOKEN_COUPLINGS:
            _fail("token_coupling", self.token_coupling, f"choose one of {TOKEN_COUPLINGS}")
        number("load_decay", 0.0, 1.0, low_open=True)
        for name in ("freeze_loss_params", "token_readout"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be true or false")
        if self.token_readout and self.router != "graph":
            _fail("token_readout", self.token_readout,
                  f"reads the graph router's expert states; set router='graph' (got {self.router!r}) or turn it off")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            _fail("adapter_dtype", self.adapter_dtype, f"choose one of {ADAPTER_DTYPES}")
        if self.backend not in BACKENDS:
            _fail("backend", self.backend, f"choose one of {BACKENDS}")
        for name in ("target_modules", "expert_modules"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                _fail(name, value, "must be a list of module names")
            setattr(self, name, list(value))
        unknown = [m for m in self.expert_modules if m not in EXPERT_MODULES]
        if unknown or not self.expert_modules:
            _fail("expert_modules", self.expert_modules,
                  f"must be a non-empty subset of {list(EXPERT_MODULES)}")
        clash = [m for m in self.target_modules if m in EXPERT_MODULES]
        if clash:
            _fail("target_modules", self.target_modules,
                  f"{clash} belong to the MLP experts; list them in expert_modules instead")
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            _fail("base_model_name_or_path", self.base_model_name_or_path, "must be a string or None")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def to_dict(self) -> dict:
        """The adapter_config.json content. `backend` is left out: it is a choice of the machine
        that runs the adapter, not part of the adapter."""
        data = asdict(self)
        del data["backend"]
        return {"peft_type": PEFT_TYPE, "format_version": FORMAT_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict) -> "GMoEConfig":
        data = dict(data)
        peft_type = data.pop("peft_type", None)
        if peft_type != PEFT_TYPE:
            raise ValueError(
                f"adapter_config.json has peft_type={peft_type!r}, not {PEFT_TYPE!r}: this is not a "
                "GMoE adapter (for MixLoRA or published-GMoE adapters use gmoe.convert)"
            )
        version = data.pop("format_version", None)
        if version not in READABLE_FORMAT_VERSIONS:
            raise ValueError(f"adapter format_version={version!r} is not supported (this version reads "
                             f"{list(READABLE_FORMAT_VERSIONS)}); upgrade gmoe-kernels to read newer adapters")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"adapter_config.json has unknown fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    def save(self, directory: str | Path) -> None:
        Path(directory, CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "GMoEConfig":
        path = Path(directory, CONFIG_NAME)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {directory} a folder written by save_pretrained?")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}); the adapter folder is corrupt") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}; the adapter folder is corrupt")
        return cls.from_dict(data)
