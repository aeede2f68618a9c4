"""Forward unit order on a diffusers UNet2DModel: the order asym input caching depends on.

diffusers registers attentions before resnets and the mid block after the up blocks, so the
forward order must be traced, not read from registration.
"""

from __future__ import annotations

import torch
from tiny_unets import tiny_unet

from tfmq_exp.models import adapters

torch.set_num_threads(1)

FORWARD = [
    ("conv_in", "layer"),
    ("down_blocks.0.resnets.0", "block"),
    ("down_blocks.0.downsamplers.0.conv", "layer"),
    ("down_blocks.1.resnets.0", "block"),  # resnet before the attention it feeds
    ("down_blocks.1.attentions.0", "block"),
    ("mid_block.resnets.0", "block"),  # the mid block before every up block
    ("mid_block.attentions.0", "block"),
    ("mid_block.resnets.1", "block"),
    ("up_blocks.0.resnets.0", "block"),
    ("up_blocks.0.attentions.0", "block"),
    ("up_blocks.0.resnets.1", "block"),
    ("up_blocks.0.attentions.1", "block"),
    ("up_blocks.0.upsamplers.0.conv", "layer"),
    ("up_blocks.1.resnets.0", "block"),
    ("up_blocks.1.resnets.1", "block"),
    ("conv_out", "layer"),
]




def test_forward_order_is_the_exact_call_order():
    unet = tiny_unet()
    units = adapters.reconstruction_units(unet, order="forward")
    assert [(u.name, u.kind) for u in units] == FORWARD
    mods = dict(unet.named_modules())
    assert all(u.module is mods[u.name] for u in units)


def test_forward_order_matches_a_traced_forward_pass():
    """Independent of the adapter's own tracing: the first call of every unit in a real forward pass."""
    unet = tiny_unet()
    units = adapters.reconstruction_units(unet, order="registration")
    calls: list[str] = []
    handles = [u.module.register_forward_pre_hook(lambda _m, _a, n=u.name: calls.append(n)) for u in units]
    with torch.no_grad():
        unet(torch.randn(2, 1, 8, 8), torch.tensor([10, 900]))
    for h in handles:
        h.remove()
    first_calls = list(dict.fromkeys(calls))
    assert first_calls == [n for n, _ in FORWARD]


def test_registration_order_differs_where_diffusers_registers_out_of_order():
    """The two orders hold the same units; registration puts the mid block last and attentions first."""
    names = [u.name for u in adapters.reconstruction_units(tiny_unet(), order="registration")]
    assert sorted(names) == sorted(n for n, _ in FORWARD)
    assert names.index("mid_block.resnets.0") > names.index("up_blocks.1.resnets.1")
    assert names.index("down_blocks.1.attentions.0") < names.index("down_blocks.1.resnets.0")
    assert names != [n for n, _ in FORWARD]
