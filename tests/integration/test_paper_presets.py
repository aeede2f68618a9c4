"""The TFMQ-DM paper presets (conf/experiment/paper/<model>_<bits>.yaml, docs/presets.md).

Every preset is composed with Hydra's compose API under each method (tfmq by default, qdiff and brecq from
the command line): the protocol of the paper's table (sampler, pool, budgets, evaluation) must come from the
preset whatever the method, the method settings from conf/recipe/<method>/<model>.yaml only, and the weight
pool the method's code builds from such a config must be the official one.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tfmq_exp.config import register_configs, validate_config
from tfmq_exp.diffusion.calib_pool import CalibRecord
from tfmq_exp.diffusion.sampling import ddim_timesteps
from tfmq_exp.methods.reconstruction import weight_pool
from tfmq_exp.models.convert.class_embedder import ClassEmbedder
from tfmq_exp.tasks.conditioning import conditioning_for

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
PAPER = CONF / "experiment" / "paper"
BITS = {"w4a32": (4, 32), "w8a8": (8, 8), "w4a8": (4, 8)}
METHODS = ("tfmq", "qdiff", "brecq")

LDM_DDIM = {"kind": "ddim", "skip": "uniform", "guidance": 1.0, "timestep_offset": 1, "final_alpha_one": False,
            "uniform_steps": "exact", "clip_x0": False}
RECON = {"iters": 20000, "batch_size": 32, "act_iters": 5000, "act_lr": 0.0004}
UNCOND_EVAL = {"n_samples": 50000, "metrics": ["fid", "sfid"], "save_npz": True}
# Q-Diffusion's recipes (conf/recipe/qdiff/, docs/methods.md §4.5), checked through the presets
QD_LDM4 = {"weight.init": "lp", "act.init": "max", "act.symmetric": True, "act.ema": "raw",
           "options.running_stat": True, "options.running_stat_batch": 64, "options.act_init_order": "first",
           "options.running_stat_order": "sequential", "options.split_shortcut": False, "options.calib_steps": 20}
TFMQ = {"act.ema": "zero_forced", "act_calib_samples": 16, "options.fsc_scope": "all",
        "options.quant_attention": False, "options.fsc_init_samples": 16, "options.fsc_batch_size": 16,
        "options.fsc_momentum": 0.95}
BRECQ = {"options.lsq": True, "options.head_stem_8bit": False, "options.running_stat": False, "act_calib_samples": 64}


def every(step: int, n: int) -> list[int]:
    return list(range(0, n, step))


def effective_pool_size(cfg) -> int:
    """What reconstruction.weight_pool takes: recon.pool_size x the recipe's quantizer.options.pool_size_factor."""
    return round(int(cfg.recon.pool_size) * float(OmegaConf.select(cfg.quantizer, "options.pool_size_factor") or 1))


# short name -> what the paper's table (docs/methods.md §10.1, §4.5; docs/presets.md) asks for.
# guided: classifier-free guidance, every trajectory gives two entries per step ({c, uc});
# pool: method -> (effective entries, steps kept, trajectories used); paper: TFMQ-DM's published value per bits
EXPECTED = {
    "cifar10": {
        "model": "ddim_cifar10", "seed": 1234, "steps_run": 100,
        "sampler": {"kind": "ddim", "steps": 100, "eta": 0.0, "skip": "quad", "guidance": 1.0,
                    "timestep_offset": 0, "final_alpha_one": True, "uniform_steps": "exact", "clip_x0": False},
        "dataset": {"name": "cifar10", "conditioning": "none", "resolution": 32},
        "calib": {"n_trajectories": 256, "per_step": 256, "step_every": 5, "seed": 1234,
                  "classes": None},
        "recon": {**RECON, "pool_size": 5120},
        "evaluator": {"n_samples": 50000, "metrics": ["fid", "sfid", "is"]},
        "pool": dict.fromkeys(METHODS, (5120, every(5, 100), 256)),
        "recipe": {
            "tfmq": {**TFMQ, "options.calib_steps": 20, "options.fsc_per_step": 256},
            "qdiff": {"weight.init": "max", "act.init": "max", "act.symmetric": True, "options.calib_steps": 20,
                      "options.split_shortcut": True, "options.running_stat": False, "options.softmax_bits": 8},
            "brecq": {**BRECQ, "options.calib_steps": 20},
        },
        "paper": {"w4a32": "TFMQ-DM 4.73", "w8a8": "TFMQ-DM not known", "w4a8": "TFMQ-DM 4.78"},
    },
    "bedroom": {
        "model": "ldm_bedroom", "seed": 40, "steps_run": 200,
        "sampler": {**LDM_DDIM, "steps": 200, "eta": 1.0},
        "dataset": {"name": "lsun_bedroom", "kind": "adm_npz", "conditioning": "none", "resolution": 256},
        "calib": {"n_trajectories": 256, "per_step": 256, "step_every": 10, "seed": 40, "classes": None},
        "recon": {**RECON, "pool_size": 5120},
        "evaluator": UNCOND_EVAL,
        "pool": dict.fromkeys(METHODS, (5120, every(10, 200), 256)),
        "recipe": {
            "tfmq": {**TFMQ, "options.calib_steps": 20, "options.fsc_per_step": 256},
            "qdiff": QD_LDM4,
            "brecq": {**BRECQ, "options.calib_steps": 20},
        },
        "paper": {"w4a32": "TFMQ-DM 3.60 / 7.61", "w8a8": "TFMQ-DM 3.14 / 7.26", "w4a8": "TFMQ-DM 3.68 / 7.65"},
    },
    "churches": {
        # 400 asked, 500 run (stride 2) as the official code; tables cover all 500 (docs/methods.md §9 T4)
        "model": "ldm_churches", "seed": 40, "steps_run": 500,
        "sampler": {**LDM_DDIM, "steps": 400, "eta": 0.0, "uniform_steps": "stride"},
        "dataset": {"name": "lsun_churches", "conditioning": "none", "resolution": 256},
        "calib": {"n_trajectories": 256, "per_step": 256, "step_every": 25, "seed": 40, "classes": None},
        "recon": {**RECON, "pool_size": 5120},
        "evaluator": UNCOND_EVAL,
        "pool": dict.fromkeys(METHODS, (5120, every(25, 500), 256)),
        "recipe": {
            "tfmq": {**TFMQ, "options.calib_steps": 20, "options.fsc_per_step": 256},
            "qdiff": {"weight.init": "lp", "act.init": "lp", "act.symmetric": False, "options.running_stat": False,
                      "options.act_init_order": "first", "options.split_shortcut": False, "options.calib_steps": 20},
            "brecq": {**BRECQ, "options.calib_steps": 20},
        },
        "paper": {"w4a32": "TFMQ-DM 4.07 / 11.41", "w8a8": "TFMQ-DM 4.01 / 10.98", "w4a8": "TFMQ-DM 4.14 / 11.46"},
    },
    "celebahq": {
        "model": "ldm_celebahq", "seed": 40, "steps_run": 200,
        "sampler": {**LDM_DDIM, "steps": 200, "eta": 0.0},
        "dataset": {"name": "celebahq", "conditioning": "none", "resolution": 256},
        "calib": {"n_trajectories": 256, "per_step": 256, "step_every": 10, "seed": 40, "classes": None},
        "recon": {**RECON, "pool_size": 5120},
        "evaluator": UNCOND_EVAL,
        "pool": dict.fromkeys(METHODS, (5120, every(10, 200), 256)),
        "recipe": {
            "tfmq": {**TFMQ, "options.calib_steps": 20, "options.fsc_per_step": 256},
            "qdiff": QD_LDM4,
            "brecq": {**BRECQ, "options.calib_steps": 20},
        },
        "paper": {"w4a32": "TFMQ-DM 8.74 / 10.18", "w8a8": "TFMQ-DM 8.71 / 10.20", "w4a8": "TFMQ-DM 8.76 / 10.26"},
    },
    "ffhq": {
        "model": "ldm_ffhq", "seed": 40, "steps_run": 200,
        "sampler": {**LDM_DDIM, "steps": 200, "eta": 1.0},
        "dataset": {"name": "ffhq", "conditioning": "none", "resolution": 256},
        "calib": {"n_trajectories": 256, "per_step": 256, "step_every": 10, "seed": 40, "classes": None},
        "recon": {**RECON, "pool_size": 5120},
        "evaluator": UNCOND_EVAL,
        "pool": dict.fromkeys(METHODS, (5120, every(10, 200), 256)),
        "recipe": {
            "tfmq": {**TFMQ, "options.calib_steps": 20, "options.fsc_per_step": 256},
            "qdiff": QD_LDM4,
            "brecq": {**BRECQ, "options.calib_steps": 20},
        },
        "paper": {"w4a32": "TFMQ-DM 9.89 / 9.06", "w8a8": "TFMQ-DM 9.46 / 8.73", "w4a8": "TFMQ-DM 9.97 / 9.14"},
    },
    "imagenet": {
        # 512 entries per step = 256 trajectories x {class, null class}; 32 classes 0, 32, ..., 992 x 8 trajectories
        "model": "ldm_cin256", "seed": 40, "steps_run": 20, "guided": True,
        "sampler": {**LDM_DDIM, "steps": 20, "eta": 0.0, "guidance": 3.0},
        "dataset": {"name": "imagenet", "kind": "adm_npz", "conditioning": "class", "classes": None,
                    "resolution": 256},
        "calib": {"n_trajectories": 256, "per_step": 512, "step_every": 1, "seed": 40,
                  "classes": list(range(0, 1000, 32))},
        "recon": {**RECON, "batch_size": 8, "pool_size": 10240},
        "evaluator": {"n_samples": 50000, "metrics": ["is", "fid", "sfid"], "save_npz": True},
        "pool": dict.fromkeys(METHODS, (10240, every(1, 20), 256)),
        "recipe": {
            "tfmq": {**TFMQ, "options.calib_steps": 20, "options.fsc_per_step": 512},
            "qdiff": {"weight.init": "lp", "act.init": "lp", "act.symmetric": False, "act_calib_samples": 16,
                      "options.running_stat": True, "options.running_stat_batch": 16,
                      "options.running_stat_order": "shuffled", "options.split_shortcut": False,
                      "options.calib_steps": 20},
            "brecq": {**BRECQ, "options.calib_steps": 20},
        },
        "paper": {"w4a32": "TFMQ-DM 223.81 / 10.50 / 7.98", "w8a8": "TFMQ-DM 198.86 / 10.79 / 7.65",
                  "w4a8": "TFMQ-DM 221.82 / 10.29 / 7.35"},
    },
    "sd": {
        # 256 entries per step = 128 prompts x {caption, empty}; recon.pool_size is Q-Diffusion's 6,400, the tfmq
        # and brecq recipes double it (options.pool_size_factor 2): all 50 steps at the same entries per step
        "model": "sd14", "seed": 40, "steps_run": 50, "guided": True,
        "sampler": {"kind": "plms", "steps": 50, "eta": 0.0, "skip": "uniform", "guidance": 7.5,
                    "timestep_offset": 1, "final_alpha_one": False, "uniform_steps": "exact", "clip_x0": False},
        "dataset": {"name": "coco", "conditioning": "text", "prompts": None, "resolution": 512},
        "calib": {"n_trajectories": 128, "per_step": 256, "step_every": 1, "seed": 40, "classes": None},
        "recon": {**RECON, "batch_size": 8, "pool_size": 6400},
        "evaluator": {"n_samples": 30000, "metrics": ["fid", "sfid", "clip"], "save_npz": True},
        "pool": {"tfmq": (12800, every(1, 50), 128), "qdiff": (6400, every(2, 50), 128),
                 "brecq": (12800, every(1, 50), 128)},
        "recipe": {
            "tfmq": {**TFMQ, "options.calib_steps": 50, "options.fsc_per_step": 256, "options.pool_size_factor": 2},
            "qdiff": {"weight.init": "lp", "act.init": "lp", "act.symmetric": False, "act_calib_samples": 16,
                      "options.calib_steps": 25, "options.softmax_bits": 16, "options.split_shortcut": True,
                      "options.running_stat": True, "options.running_stat_batch": 16, "options.pool_size_factor": None},
            "brecq": {**BRECQ, "options.calib_steps": 50, "options.pool_size_factor": 2},
        },
        "paper": {"w4a32": "TFMQ-DM 13.21 / 19.03 / 0.3144", "w8a8": "TFMQ-DM 13.09 / 19.91 / 0.3134",
                  "w4a8": "TFMQ-DM 13.36 / 20.14 / 0.3128"},
    },
}
PRESETS = [f"{short}_{bits}" for short in EXPECTED for bits in BITS]
CASES = [(p, m) for p in PRESETS for m in METHODS]


def make(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def preset_cfg(preset: str, method: str):
    """The command line a user types: the preset alone runs TFMQ-DM, quantizer=... picks another method."""
    return make(f"experiment=paper/{preset}", *([] if method == "tfmq" else [f"quantizer={method}"]))


def split(preset: str) -> tuple[str, str]:
    short, bits = preset.rsplit("_", 1)
    return short, bits


@pytest.fixture(scope="module")
def composed():
    """Each (preset, method) composed once for the whole module."""
    return {case: preset_cfg(*case) for case in CASES}


def test_the_21_cells_exist():
    names = {p.stem for p in PAPER.glob("*.yaml")}
    assert set(PRESETS) <= names
    assert len(PRESETS) == 21


@pytest.mark.parametrize(("preset", "method"), CASES, ids=[f"{p}-{m}" for p, m in CASES])
def test_preset_sets_the_table_protocol_and_the_method_recipe(composed, preset, method):
    short, bits = split(preset)
    exp = EXPECTED[short]
    cfg = composed[(preset, method)]
    validate_config(cfg, with_paths=False)  # ranges and choices of every field (no paths, no model loading)
    assert cfg.quantizer.name == method
    assert cfg.model.name == exp["model"]
    assert cfg.seed == exp["seed"]
    assert cfg.task == "quantize"
    assert (cfg.quantizer.weight.n_bits, cfg.quantizer.act.n_bits) == BITS[bits]
    assert (cfg.trainer.accelerator, cfg.trainer.devices) == ("gpu", 1)
    for group in ("sampler", "dataset", "calib", "recon", "evaluator"):
        node = cfg[group]
        for key, want in exp[group].items():
            got = node[key]
            got = list(got) if OmegaConf.is_list(got) else got
            assert got == want, f"{preset} {method}: {group}.{key} = {got!r}, expected {want!r}"
    for key, want in exp["recipe"][method].items():
        got = OmegaConf.select(cfg.quantizer, key)
        assert got == want, f"{preset} {method}: quantizer.{key} = {got!r}, expected {want!r}"
    assert effective_pool_size(cfg) == exp["pool"][method][0]


@pytest.mark.parametrize(("preset", "method"), CASES, ids=[f"{p}-{m}" for p, m in CASES])
def test_presets_carry_no_method_settings(composed, preset, method):
    """quantizer.* under a preset is exactly what model= quantizer= bits= give without it: the method settings
    live in conf/recipe/<method>/<model>.yaml, so quantizer=qdiff gets Q-Diffusion's recipe and nothing of TFMQ."""
    short, bits = split(preset)
    plain = make(f"model={EXPECTED[short]['model']}", f"quantizer={method}", f"bits={bits}")
    assert OmegaConf.to_container(composed[(preset, method)].quantizer) == OmegaConf.to_container(plain.quantizer)


@pytest.mark.parametrize(("preset", "method"), CASES, ids=[f"{p}-{m}" for p, m in CASES])
def test_the_method_code_builds_the_official_weight_pool(composed, preset, method):
    """reconstruction.weight_pool on a record shaped as the preset's calibration run would make it."""
    short, _ = split(preset)
    exp = EXPECTED[short]
    cfg = composed[(preset, method)]
    s = cfg.sampler
    ts = ddim_timesteps(1000, int(s.steps), str(s.skip), int(s.timestep_offset), str(s.uniform_steps))
    assert len(ts) == exp["steps_run"]
    n = int(cfg.calib.n_trajectories)
    xs = torch.arange(n, dtype=torch.float32).view(1, n, 1).expand(len(ts), n, 1)  # value = trajectory index
    guided = cfg.dataset.conditioning != "none" and float(s.guidance) != 1.0  # as Conditioning.guided
    assert guided == exp.get("guided", False)
    # conditional: one context per trajectory (value = its index), the null context last (row n)
    contexts = torch.arange(n + 1, dtype=torch.float32).view(n + 1, 1, 1) if guided else None
    rec = CalibRecord(xs=xs, ts=torch.tensor(ts), contexts=contexts, guided=guided)
    assert rec.entries_per_step == n * (2 if guided else 1)
    pool = weight_pool(SimpleNamespace(record=rec, quantizer=cfg.quantizer, recon=cfg.recon))
    size, steps, trajectories = exp["pool"][method]
    assert effective_pool_size(cfg) == size
    assert len(pool) == size
    assert sorted(set(pool.step.tolist())) == steps
    assert int(pool.x.max()) + 1 == trajectories
    if guided:  # entries interleaved (trajectory, null) per step: half with c, half with uc, same trajectories
        null = pool.ctx_idx == n
        assert int(null.sum()) == size // 2
        assert int(pool.ctx_idx[~null].max()) + 1 == trajectories
        assert torch.equal(pool.ctx_idx[~null].float(), pool.x[~null].flatten())
    if method == "tfmq":  # FSC: every step's table from the first fsc_per_step entries
        per = int(cfg.quantizer.options.fsc_per_step)
        one = rec.pool(steps=[len(ts) - 1], per_step=per)
        assert len(one) == per and int(one.x.max()) + 1 == trajectories


@pytest.mark.parametrize("bits", BITS)
def test_imagenet_calibrates_on_the_official_32_classes(composed, bits):
    """calib.classes: trajectory i gets classes[i % 32], 8 trajectories per class; evaluation keeps every class."""
    cfg = composed[(f"imagenet_{bits}", "tfmq")]
    assert cfg.dataset.classes is None
    model = SimpleNamespace(name="ldm_cin256", unet=torch.nn.Identity(), class_embedder=ClassEmbedder(1001, 4))
    cond, info = conditioning_for(cfg, model, int(cfg.calib.n_trajectories), int(cfg.calib.seed),
                                  classes=cfg.calib.classes)
    labels = info["labels"]
    assert labels[:33] == [*range(0, 1000, 32), 0]
    assert sorted(set(labels)) == list(range(0, 1000, 32))
    assert all(labels.count(c) == 8 for c in range(0, 1000, 32))
    assert cond.guided and cond.context.shape[0] == 256


def test_churches_runs_the_500_steps_of_the_official_code():
    cfg = preset_cfg("churches_w4a8", "tfmq")
    s = cfg.sampler
    ts = ddim_timesteps(1000, int(s.steps), str(s.skip), int(s.timestep_offset), str(s.uniform_steps))
    assert (len(ts), ts[0], ts[-1]) == (500, 999, 1)


def test_command_line_overrides_still_win():
    cfg = make("experiment=paper/sd_w4a8", "recon.pool_size=3200", "sampler.steps=25", "quantizer=qdiff",
               "bits=w8a8")
    assert (cfg.recon.pool_size, cfg.sampler.steps, cfg.quantizer.name) == (3200, 25, "qdiff")
    assert (cfg.quantizer.weight.n_bits, cfg.quantizer.act.n_bits) == (8, 8)
    rtn = make("experiment=paper/bedroom_w4a8", "quantizer=rtn")
    assert rtn.quantizer.name == "rtn" and rtn.sampler.steps == 200 and rtn.calib.step_every == 10


@pytest.mark.parametrize("method", ["rtn", "qdiff", "tfmq"])
def test_the_older_cifar10_presets_still_compose(method):
    cfg = make(f"experiment=paper/cifar10_{method}_w4a8")
    assert cfg.quantizer.name == method and cfg.model.name == "ddpm_cifar10" and cfg.sampler.skip == "quad"


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_comment_names_its_cell_and_commands(preset):
    short, bits = split(preset)
    text = (PAPER / f"{preset}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    head = text.split("\ndefaults:")[0]
    assert f"at {bits.upper()}:" in head and EXPECTED[short]["paper"][bits] in head
    assert head.count(f"python -m tfmq_exp experiment=paper/{preset} ") == 3
    assert "quantizer=qdiff" in head and "quantizer=brecq" in head

def test_no_path_outside_the_repository():
    files = [*PAPER.glob("*.yaml"), *(CONF / "recipe" / "tfmq").glob("*.yaml"),
             *(CONF / "recipe" / "brecq").glob("*.yaml"), ROOT / "docs" / "presets.md"]
    for f in files:
        text = f.read_text()
        # spelled in pieces so that this file does not itself name the notes outside the repository
        for bad in ("../" + "shared", "ALGORITHMS" + ".md", "RESULTS" + ".md", "/" + "work/"):
            assert bad not in text, f"{f.name} mentions {bad}"
