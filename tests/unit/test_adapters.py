"""The diffusers UNet adapter: units, TIB, FP rules, split points, attention quantizers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel, UNet2DModel
from torch import nn

from tfmq_exp.models.adapters import (
    Unit,
    attention_modules,
    attention_quantizers,
    describe,
    fp_rules,
    install_attention_quantizers,
    reconstruction_units,
    resnet_blocks,
    split_points,
    temporal_layer_names,
    tib_features,
    tib_modules,
    time_embedding_output,
)
from tfmq_exp.models.attention import QuantAttnProcessor
from tfmq_exp.models.loader import build_unet
from tfmq_exp.quant.modules import QuantMixin
from tfmq_exp.quant.recipe import QuantizerSpec, QuantRecipe
from tfmq_exp.quant.swap import swap_modules

torch.set_num_threads(1)
MNIST_YAML = Path(__file__).resolve().parents[2] / "conf" / "model" / "mnist.yaml"


def tiny_unet2d(**kw) -> UNet2DModel:
    torch.manual_seed(0)
    args = dict(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    )
    args.update(kw)
    return UNet2DModel(**args).eval()


def tiny_cond(**kw) -> UNet2DConditionModel:
    torch.manual_seed(0)
    args = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=4,
        attention_head_dim=2,
    )
    args.update(kw)
    return UNet2DConditionModel(**args).eval()


def mnist_unet() -> UNet2DModel:
    torch.manual_seed(0)
    arch = yaml.safe_load(MNIST_YAML.read_text())["arch"]
    return build_unet(arch).eval()


def inputs(unet: nn.Module, batch: int = 2, labels: torch.Tensor | None = None) -> dict:
    torch.manual_seed(1)
    size = unet.config.sample_size
    kw = {
        "sample": torch.randn(batch, unet.config.in_channels, size, size),
        "timestep": torch.tensor([3, 811][:batch]),
    }
    if isinstance(unet, UNet2DConditionModel):
        kw["encoder_hidden_states"] = torch.randn(batch, 3, unet.config.cross_attention_dim)
    if labels is not None:
        kw["class_labels"] = labels
    return kw


ALL_MODELS = {"unet2d": tiny_unet2d, "cond": tiny_cond, "mnist": mnist_unet}


def _hook_time_emb_proj(unet: nn.Module, kw: dict) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    handles = [
        res.time_emb_proj.register_forward_hook(lambda _m, _a, out, n=name: seen.__setitem__(n, out.detach()))
        for name, res in resnet_blocks(unet)
    ]
    with torch.no_grad():
        unet(**kw)
    for h in handles:
        h.remove()
    return seen


# -- units ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", list(ALL_MODELS))
def test_units_cover_every_layer_outside_tib_once_in_registration_order(model):
    unet = ALL_MODELS[model]()
    units = reconstruction_units(unet)
    assert all(isinstance(u, Unit) and u.kind in ("block", "layer") for u in units)
    order = {n: i for i, (n, _) in enumerate(unet.named_modules())}
    idx = [order[u.name] for u in units]
    assert idx == sorted(idx)
    covered: list[str] = []
    for u in units:
        assert dict(unet.named_modules())[u.name] is u.module
        if u.kind == "layer":
            assert isinstance(u.module, nn.Conv2d | nn.Linear)
            covered.append(u.name)
        else:
            covered += [f"{u.name}.{n}" for n, m in u.module.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    tib_prefixes = tuple(f"{n}." for n in tib_modules(unet))
    expected = [n for n, m in unet.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    expected = [n for n in expected if not n.startswith(tib_prefixes)]
    assert len(covered) == len(set(covered))
    assert sorted(covered) == sorted(expected)
    names = {u.name for u in units}
    assert {"conv_in", "conv_out"} <= names
    forward = reconstruction_units(unet, order="forward")
    assert sorted(u.name for u in forward) == sorted(names) and forward[0].name == "conv_in"
    assert not any(n.startswith("time_embedding") for n in names)


def test_unit_kinds_unet2d():
    unet = tiny_unet2d()
    kinds = {u.name: (u.kind, type(u.module).__name__) for u in reconstruction_units(unet)}
    assert kinds["down_blocks.0.resnets.0"] == ("block", "ResnetBlock2D")
    assert kinds["down_blocks.1.attentions.0"] == ("block", "Attention")
    assert kinds["down_blocks.0.downsamplers.0.conv"] == ("layer", "Conv2d")
    assert kinds["up_blocks.0.upsamplers.0.conv"] == ("layer", "Conv2d")
    assert list(kinds)[0] == "conv_in" and list(kinds)[-1] == "conv_out"


def test_unit_kinds_cond_and_forward_order():
    unet = tiny_cond()
    units = reconstruction_units(unet)
    kinds = {u.name: (u.kind, type(u.module).__name__) for u in units}
    assert kinds["down_blocks.0.attentions.0.proj_in"] == ("layer", "Conv2d")
    assert kinds["down_blocks.0.attentions.0.transformer_blocks.0"] == ("block", "BasicTransformerBlock")
    assert kinds["down_blocks.0.attentions.0.proj_out"] == ("layer", "Conv2d")
    reg = [u.name for u in units]
    # diffusers registers the mid block after the up blocks and attentions before resnets
    assert reg.index("mid_block.resnets.0") > reg.index("up_blocks.1.resnets.0")
    assert reg.index("down_blocks.0.attentions.0.proj_in") < reg.index("down_blocks.0.resnets.0")
    fwd = [u.name for u in reconstruction_units(unet, order="forward")]
    assert sorted(fwd) == sorted(reg)
    assert fwd.index("mid_block.resnets.0") < fwd.index("up_blocks.0.resnets.0")
    assert fwd.index("down_blocks.0.resnets.0") < fwd.index("down_blocks.0.attentions.0.proj_in")
    assert fwd.index("mid_block.resnets.0") < fwd.index("mid_block.attentions.0.proj_in")
    assert fwd.index("mid_block.attentions.0.proj_out") < fwd.index("mid_block.resnets.1")
    assert fwd[0] == "conv_in" and fwd[-1] == "conv_out"


# -- TIB -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", list(ALL_MODELS))
def test_one_temporal_projection_per_resnet(model):
    unet = ALL_MODELS[model]()
    names = temporal_layer_names(unet)
    resnets = resnet_blocks(unet)
    n_proj = sum(1 for n, _ in unet.named_modules() if n.endswith("time_emb_proj"))
    assert n_proj == len(resnets) == sum(n.endswith("time_emb_proj") for n in names)
    assert names[:2] == ["time_embedding.linear_1", "time_embedding.linear_2"]
    modules = dict(unet.named_modules())
    assert all(isinstance(modules[n], nn.Linear) for n in names)


@pytest.mark.parametrize(
    "model, extra, labels",
    [
        ("unet2d", {}, None),
        ("mnist", {}, None),
        ("cond", {}, None),
        ("cond", {"time_embedding_act_fn": "silu", "resnet_time_scale_shift": "scale_shift"}, None),
        ("unet2d", {"num_class_embeds": 10}, torch.tensor([1, 7])),
        ("unet2d", {"class_embed_type": "timestep"}, torch.tensor([4, 9])),
        ("cond", {"class_embed_type": "timestep"}, torch.tensor([4, 9])),
        ("cond", {"num_class_embeds": 5, "class_embeddings_concat": True}, torch.tensor([0, 3])),
    ],
)
def test_tib_features_equal_in_model_values(model, extra, labels):
    unet = ALL_MODELS[model](**extra) if extra else ALL_MODELS[model]()
    kw = inputs(unet, labels=labels)
    hooked = _hook_time_emb_proj(unet, kw)
    with torch.no_grad():
        feats = tib_features(unet, kw["timestep"], class_labels=labels)
    assert set(feats) == {n for n, _ in resnet_blocks(unet)} == set(hooked)
    for name, value in feats.items():
        assert torch.equal(value, hooked[name]), name
    if labels is not None and isinstance(unet.class_embedding, nn.Embedding):
        assert all(not n.startswith("class_embedding") for n in temporal_layer_names(unet))
    if "class_embed_type" in extra:
        assert "class_embedding.linear_1" in temporal_layer_names(unet)


def test_tib_features_scalar_timestep_broadcast_and_label_errors():
    unet = tiny_unet2d()
    with torch.no_grad():
        emb = time_embedding_output(unet, 5, batch_size=3)
        ref = time_embedding_output(unet, torch.tensor([5, 5, 5]))
    assert emb.shape[0] == 3 and torch.equal(emb, ref)
    with pytest.raises(ValueError):
        time_embedding_output(unet, 5, class_labels=torch.tensor([1]))
    with pytest.raises(ValueError):
        time_embedding_output(tiny_unet2d(num_class_embeds=3), 5)


def test_tib_features_on_quantized_linears():
    unet = tiny_unet2d()
    recipe = QuantRecipe(weight=QuantizerSpec(n_bits=4, per_channel=True), act=QuantizerSpec(n_bits=8, enabled=False))
    swap_modules(unet, recipe)
    assert isinstance(unet.down_blocks[0].resnets[0].time_emb_proj, QuantMixin)
    kw = inputs(unet)
    hooked = _hook_time_emb_proj(unet, kw)
    with torch.no_grad():
        feats = tib_features(unet, kw["timestep"])
        fp = {
            n: nn.functional.linear(nn.functional.silu(time_embedding_output(unet, kw["timestep"])), r.weight, r.bias)
            for n, r in ((n, r.time_emb_proj) for n, r in resnet_blocks(unet))
        }
    for name, value in feats.items():
        assert torch.equal(value, hooked[name])
        assert not torch.allclose(value, fp[name])  # 4-bit weights do change it


# -- FP rules ------------------------------------------------------------------------------------


def _plans(unet, rules):
    recipe = QuantRecipe(rules=rules)
    return {n: recipe.plan(n) for n, m in unet.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}


@pytest.mark.parametrize("model", list(ALL_MODELS))
def test_fp_rules_names_exist_and_mean_what_they_say(model):
    unet = ALL_MODELS[model]()
    layer_names = {n for n, m in unet.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    assert fp_rules(unet, "rtn") == fp_rules(unet, "qdiff") == fp_rules(unet, "brecq") == []
    brecq = fp_rules(unet, "brecq", brecq_8bit_head_stem=True)
    assert [(r.pattern, r.weight_bits, r.act_bits) for r in brecq] == [("conv_in", 8, 8), ("conv_out", 8, 8)]
    rules = fp_rules(unet, "tfmq")
    assert rules and all(r.pattern in layer_names for r in rules)
    plans = _plans(unet, rules)
    for n, plan in plans.items():
        leaf = n.rsplit(".", 1)[-1]
        if "shortcut" in leaf or ".downsamplers." in n:
            assert not plan.wrap, n
    assert any(".downsamplers." in n and not p.wrap for n, p in plans.items())
    assert any(n.endswith("conv_shortcut") and not p.wrap for n, p in plans.items())
    for n in ("conv_in", "conv_out", "time_embedding.linear_1"):
        assert plans[n].wrap and not plans[n].quantize_weight and not plans[n].quantize_input
    assert plans["time_embedding.linear_2"].quantize_weight and not plans["time_embedding.linear_2"].quantize_input
    first = "down_blocks.0.resnets.0.conv1"
    assert plans[first].quantize_weight and not plans[first].quantize_input
    assert plans["down_blocks.0.resnets.0.conv2"].quantize_input
    assert plans["down_blocks.0.resnets.0.time_emb_proj"].wrap


def test_fp_rules_tfmq_attention():
    unet = tiny_unet2d()
    plans = _plans(unet, fp_rules(unet, "tfmq"))
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        assert not plans[f"mid_block.attentions.0.{proj}"].wrap
    plans = _plans(unet, fp_rules(unet, "tfmq", tfmq_attention_fp=False))
    assert plans["mid_block.attentions.0.to_q"].wrap
    cond = tiny_cond()
    plans = _plans(cond, fp_rules(cond, "tfmq"))
    assert plans["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"].wrap
    assert plans["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"].wrap
    with pytest.raises(ValueError):
        fp_rules(cond, "gptq")


def test_fp_rules_apply_through_swap():
    unet = tiny_unet2d()
    swap_modules(unet, QuantRecipe(rules=fp_rules(unet, "tfmq")))
    assert not isinstance(unet.up_blocks[0].resnets[0].conv_shortcut, QuantMixin)
    assert not isinstance(unet.down_blocks[0].downsamplers[0].conv, QuantMixin)
    assert not unet.conv_in.allow_weight_quant and not unet.conv_in.allow_input_quant
    assert unet.time_embedding.linear_2.allow_weight_quant and not unet.time_embedding.linear_2.allow_input_quant


# -- split shortcut ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", list(ALL_MODELS))
def test_split_points_match_the_concatenation(model):
    unet = ALL_MODELS[model]()
    splits = split_points(unet)
    up_resnets = [f"up_blocks.{b}.resnets.{j}" for b, blk in enumerate(unet.up_blocks) for j in range(len(blk.resnets))]
    assert set(splits) == {f"{r}.conv_shortcut" for r in up_resnets if dict(unet.named_modules())[r].conv_shortcut}
    assert splits

    seen_in: dict[str, torch.Tensor] = {}
    h_before: dict[str, torch.Tensor] = {}
    skips: list[torch.Tensor] = []
    handles = []
    modules = dict(unet.named_modules())
    for b, blk in enumerate(unet.up_blocks):
        handles.append(
            blk.register_forward_pre_hook(
                lambda _m, args, kwargs, b=b: h_before.__setitem__(
                    f"up_blocks.{b}.resnets.0", (args[0] if args else kwargs["hidden_states"]).detach()
                ),
                with_kwargs=True,
            )
        )
        for j, res in enumerate(blk.resnets):
            name = f"up_blocks.{b}.resnets.{j}"
            handles.append(res.register_forward_pre_hook(lambda _m, a, n=name: seen_in.__setitem__(n, a[0].detach())))
            if j + 1 < len(blk.resnets):  # the h of resnet j+1 is the output of attention j, else resnet j
                prev = blk.attentions[j] if getattr(blk, "attentions", None) else res
                nxt = f"up_blocks.{b}.resnets.{j + 1}"
                handles.append(
                    prev.register_forward_hook(
                        lambda _m, _a, out, n=nxt: h_before.__setitem__(
                            n, (out[0] if isinstance(out, tuple) else out).detach()
                        )
                    )
                )
    handles.append(unet.conv_in.register_forward_hook(lambda _m, _a, out: skips.append(out.detach())))
    for blk in unet.down_blocks:  # a down block returns (h, res_samples): the tensors the up path pops
        handles.append(blk.register_forward_hook(lambda _m, _a, out: skips.extend(t.detach() for t in out[1])))
    with torch.no_grad():
        unet(**inputs(unet))
    for h in handles:
        h.remove()
    for name, c_h in splits.items():
        res_name = name.rsplit(".", 1)[0]
        x = seen_in[res_name]
        assert x.shape[1] == modules[res_name].in_channels
        assert torch.equal(x[:, :c_h], h_before[res_name]), name
        s = x[:, c_h:]
        assert any(t.shape == s.shape and torch.equal(t, s) for t in skips), name


def test_split_points_apply_through_swap():
    unet = tiny_unet2d()
    splits = split_points(unet)
    swap_modules(unet, QuantRecipe(), splits)
    conv = unet.up_blocks[0].resnets[0].conv_shortcut
    assert conv.split == splits["up_blocks.0.resnets.0.conv_shortcut"] == 16
    assert splits["up_blocks.1.resnets.0.conv_shortcut"] == 16  # prev_output_channel of the 2nd up block
    assert splits["up_blocks.1.resnets.1.conv_shortcut"] == 8  # out_channels for j > 0


# -- attention processor -------------------------------------------------------------------------


def _attn_io(unet, kw):
    """Inputs each Attention receives in a forward pass."""
    got: dict[str, tuple] = {}
    handles = [
        a.register_forward_pre_hook(
            lambda _m, args, kwargs, n=n: got.setdefault(n, (args, dict(kwargs))), with_kwargs=True
        )
        for n, a in attention_modules(unet)
    ]
    with torch.no_grad():
        unet(**kw)
    for h in handles:
        h.remove()
    return got


@pytest.mark.parametrize("model", ["unet2d", "cond"])
def test_quant_processor_disabled_reproduces_default(model):
    unet = ALL_MODELS[model]()
    kw = inputs(unet)
    if model == "cond":
        kw["encoder_attention_mask"] = torch.tensor([[1, 1, 0], [1, 1, 1]])
    attn_inputs = _attn_io(unet, kw)
    with torch.no_grad():
        ref_each = {n: a(*attn_inputs[n][0], **attn_inputs[n][1]) for n, a in attention_modules(unet)}
        ref = unet(**kw).sample
    names = install_attention_quantizers(unet, act_bits=8, softmax_bits=16 if model == "cond" else 8, enabled=False)
    assert names == [n for n, _ in attention_modules(unet)]
    if model == "cond":
        assert any(n.endswith("attn2") for n in names) and any(n.endswith("attn1") for n in names)
        assert any(v[1].get("encoder_hidden_states") is not None for v in attn_inputs.values())
    with torch.no_grad():
        for n, a in attention_modules(unet):
            assert isinstance(a.processor, QuantAttnProcessor)
            out = a(*attn_inputs[n][0], **attn_inputs[n][1])
            torch.testing.assert_close(out, ref_each[n], atol=1e-6, rtol=0)
        out = unet(**kw).sample
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model", ["unet2d", "cond"])
def test_quant_processor_enabled_is_close_and_saved(model):
    unet = ALL_MODELS[model]()
    kw = inputs(unet)
    with torch.no_grad():
        ref = unet(**kw).sample
    names = install_attention_quantizers(unet, act_bits=8, softmax_bits=8, enabled=True)
    qs = attention_quantizers(unet)
    assert len(qs) == 4 * len(names)
    assert all(q.always_zero for n, q in qs.items() if n.endswith("softmax_quantizer"))
    for q in qs.values():
        q.observing = True
    with torch.no_grad():
        unet(**kw)
    for q in qs.values():
        q.observing = False
    assert all(q.initialized for q in qs.values())
    with torch.no_grad():
        out = unet(**kw).sample
    assert not torch.equal(out, ref)
    assert (out - ref).norm() / ref.norm() < 0.05
    state = unet.state_dict()
    assert f"{names[0]}.processor.q_quantizer.scale" in state
    assert f"{names[0]}.processor.softmax_quantizer.scale" in state
    module_names = {n for n, _ in unet.named_modules()}
    assert f"{names[0]}.processor.k_quantizer" in module_names
    # a fresh model with processors installed loads the saved ranges
    fresh = ALL_MODELS[model]()
    install_attention_quantizers(fresh, act_bits=8, softmax_bits=8, enabled=True)
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**kw).sample, out)


# -- describe ------------------------------------------------------------------------------------


def test_describe_counts():
    unet = mnist_unet()
    d = describe(unet)
    assert d["family"] == "unet2d"
    assert d["resnets"] == len(resnet_blocks(unet))
    assert d["temporal_layers"] == d["resnets"] + 2
    assert d["split_layers"] == len(split_points(unet))
    assert d["units"]["block"] + d["units"]["layer"] == len(reconstruction_units(unet))
    assert d["attention_modules"] == d["ldm_style_attention_modules"] > 0
    assert d["attention_quantizers_installed"] == 0
    c = describe(tiny_cond())
    assert c["family"] == "unet2d_condition" and c["ldm_style_attention_modules"] == 0
    assert c["units_by_class"]["BasicTransformerBlock"] == 4  # 1 down + 1 mid + 2 up
