"""LSUN-Churches features without a fixture: scale-shift norm, ResBlock up/down, a fixed head count.

The fixtures' tiny LDM UNet has none of them. This test re-implements the original UNetModel
forward from its definition (a reference written here, creating original-layout weights as it
goes), first checks that reference against the original outputs of the tiny fixture, then runs
it on a small Churches-like config and compares the converted diffusers UNet with it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from original_fixtures import close, original_config, tiny

from tfmq_exp.models.convert import ldm_unet
from tfmq_exp.models.convert.keymap import load_converted, strip_prefix


class ReferenceUNet:
    """The original UNetModel forward (AttentionBlock variant); unknown weights are drawn on first use."""

    def __init__(self, p: dict, state: dict | None = None, seed: int = 0) -> None:
        self.p = p
        self.sd = dict(state or {})
        self.used: set[str] = set()
        self.g = torch.Generator().manual_seed(seed)

    def _w(self, key: str, shape: tuple, kind: str) -> torch.Tensor:
        if key not in self.sd:
            n = torch.randn(shape, generator=self.g)
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            self.sd[key] = {"norm": 1 + 0.2 * n, "bias": 0.1 * n, "weight": n / math.sqrt(fan_in)}[kind]
        self.used.add(key)
        return self.sd[key]

    def conv(self, key, x, cout, k=3, stride=1, pad=1):
        w = self._w(f"{key}.weight", (cout, x.shape[1], k, k), "weight")
        return F.conv2d(x, w, self._w(f"{key}.bias", (cout,), "bias"), stride=stride, padding=pad)

    def linear(self, key, x, cout):
        w = self._w(f"{key}.weight", (cout, x.shape[-1]), "weight")
        return F.linear(x, w, self._w(f"{key}.bias", (cout,), "bias"))

    def gn(self, key, x):
        c = x.shape[1]
        return F.group_norm(x, 32, self._w(f"{key}.weight", (c,), "norm"), self._w(f"{key}.bias", (c,), "bias"))

    def resblock(self, key, x, emb, cout, up=False, down=False):
        h = F.silu(self.gn(f"{key}.in_layers.0", x))
        if up:
            h, x = F.interpolate(h, scale_factor=2.0), F.interpolate(x, scale_factor=2.0)  # nearest
        if down:
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        h = self.conv(f"{key}.in_layers.2", h, cout)
        ss = self.p.get("use_scale_shift_norm", False)
        e = self.linear(f"{key}.emb_layers.1", F.silu(emb), 2 * cout if ss else cout)[..., None, None]
        if ss:
            scale, shift = e.chunk(2, dim=1)
            h = self.gn(f"{key}.out_layers.0", h) * (1 + scale) + shift
        else:
            h = self.gn(f"{key}.out_layers.0", h + e)
        h = self.conv(f"{key}.out_layers.3", F.silu(h), cout)
        skip = x if x.shape[1] == cout else self.conv(f"{key}.skip_connection", x, cout, k=1, pad=0)
        return skip + h

    def attention(self, key, x):
        b, c, hh, ww = x.shape
        heads = self.p["num_heads"] if self.p.get("num_head_channels", -1) == -1 else c // self.p["num_head_channels"]
        xf = x.reshape(b, c, -1)
        qkv = F.conv1d(self.gn(f"{key}.norm", xf), self._w(f"{key}.qkv.weight", (3 * c, c, 1), "weight"),
                       self._w(f"{key}.qkv.bias", (3 * c,), "bias"))
        ch = c // heads
        q, k, v = qkv.reshape(b * heads, 3 * ch, -1).split(ch, dim=1)  # per head [q, k, v]
        s = 1 / math.sqrt(math.sqrt(ch))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s), dim=-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
        w_out = self._w(f"{key}.proj_out.weight", (c, c, 1), "weight")
        h = F.conv1d(a, w_out, self._w(f"{key}.proj_out.bias", (c,), "bias"))
        return (xf + h).reshape(b, c, hh, ww)

    def __call__(self, x, t):
        p = self.p
        mc, mult, nrb = p["model_channels"], p["channel_mult"], p["num_res_blocks"]
        updown, attn_at = p.get("resblock_updown", False), p["attention_resolutions"]
        half = mc // 2
        args = t[:, None].float() * torch.exp(-math.log(10000) * torch.arange(half) / half)[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        emb = self.linear("time_embed.2", F.silu(self.linear("time_embed.0", emb, 4 * mc)), 4 * mc)
        h = self.conv("input_blocks.0.0", x, mc)
        hs, idx, ds = [h], 1, 1
        for level, m in enumerate(mult):
            for _ in range(nrb):
                h = self.resblock(f"input_blocks.{idx}.0", h, emb, m * mc)
                if ds in attn_at:
                    h = self.attention(f"input_blocks.{idx}.1", h)
                hs.append(h)
                idx += 1
            if level != len(mult) - 1:
                if updown:
                    h = self.resblock(f"input_blocks.{idx}.0", h, emb, h.shape[1], down=True)
                else:
                    h = self.conv(f"input_blocks.{idx}.0.op", h, h.shape[1], stride=2)
                hs.append(h)
                idx, ds = idx + 1, ds * 2
        h = self.resblock("middle_block.0", h, emb, h.shape[1])
        h = self.attention("middle_block.1", h)
        h = self.resblock("middle_block.2", h, emb, h.shape[1])
        idx = 0
        for level, m in reversed(list(enumerate(mult))):
            for i in range(nrb + 1):
                h = self.resblock(f"output_blocks.{idx}.0", torch.cat([h, hs.pop()], dim=1), emb, m * mc)
                sub = 1
                if ds in attn_at:
                    h, sub = self.attention(f"output_blocks.{idx}.1", h), 2
                if level and i == nrb:
                    if updown:
                        h = self.resblock(f"output_blocks.{idx}.{sub}", h, emb, h.shape[1], up=True)
                    else:
                        h = self.conv(f"output_blocks.{idx}.{sub}.conv", F.interpolate(h, scale_factor=2.0), h.shape[1])
                    ds //= 2
                idx += 1
        return self.conv("out.2", F.silu(self.gn("out.0", h)), p["out_channels"])


def test_reference_reproduces_the_original_outputs():
    state, io, meta = tiny("ldm_unet_A")
    ref = ReferenceUNet(original_config(meta), strip_prefix(state, "model.diffusion_model."))
    with torch.no_grad():
        out = ref(io["x"], io["timesteps"])
    assert ref.used == set(ref.sd)  # the reference read every original weight and drew none
    close(out, io["out"])


def test_churches_like_unet_matches_the_reference():
    params = {"image_size": 16, "in_channels": 4, "out_channels": 4, "model_channels": 32,
              "attention_resolutions": [1, 2, 4], "num_res_blocks": 1, "channel_mult": [1, 2, 2],
              "num_heads": 8, "use_scale_shift_norm": True, "resblock_updown": True}
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([3, 911])
    ref = ReferenceUNet(params, seed=11)
    with torch.no_grad():
        expected = ref(x, t)
        unet = load_converted(ldm_unet.build(params), ldm_unet.convert(ref.sd, params)).eval()
        out = unet(x, t).sample
    assert any(".emb_layers.1." in k and v.shape[0] == 128 for k, v in ref.sd.items())  # scale and shift
    close(out, expected)
    unet.mid_block.attentions[0].heads = 1  # the head count matters: one head is far off
    with torch.no_grad():
        assert (unet(x, t).sample - expected).abs().max() > 1e-3
