"""4-bit codes two per byte, and packed checkpoints that rebuild the same model."""

from __future__ import annotations

import pytest
import torch
from export_models import quantize_rtn, tiny_unet

from tfmq_exp.export.packing import load_packed, pack_checkpoint, pack_int4, unpack, unpack_int4
from tfmq_exp.quant.recipe import QuantizerSpec, QuantRecipe
from tfmq_exp.quant.state import load_quantized, save_quantized


def test_pack_int4_layout_by_hand():
    codes = torch.tensor([1, 2, 15, 0, 7], dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.tolist() == [0x21, 0x0F, 0x07]  # low nibble first; odd tail padded with 0
    assert unpack_int4(packed, (5,)).tolist() == [1, 2, 15, 0, 7]


def test_pack_int4_round_trip_and_range_check():
    codes = torch.randint(0, 16, (6, 5, 3, 3), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(codes), tuple(codes.shape)), codes)
    with pytest.raises(ValueError, match=r"codes in \[0, 15\]"):
        pack_int4(torch.tensor([16]))


def _recipe(w_bits: int) -> QuantRecipe:
    return QuantRecipe(weight=QuantizerSpec(n_bits=w_bits, per_channel=True), act=QuantizerSpec(n_bits=8))


@pytest.mark.parametrize("w_bits", [4, 8])
def test_packed_checkpoint_rebuilds_the_same_model(tmp_path, w_bits):
    q = quantize_rtn(tiny_unet(), w_bits, tables=True)
    src = save_quantized(q, _recipe(w_bits), tmp_path / "q.safetensors", {"model": "tiny"})
    info = pack_checkpoint(src, tmp_path / "p.safetensors")
    n_int = sum(1 for k in unpack(src)[0] if k.endswith(".weight_int"))
    assert info["packed_layers"] == (n_int if w_bits == 4 else 0)
    if w_bits == 4:  # every packed layer stores ceil(n / 2) bytes for its n codes
        from safetensors.torch import load_file

        plain, packed = load_file(str(src)), load_file(str(tmp_path / "p.safetensors"))
        for key, codes in plain.items():
            if key.endswith(".weight_int"):
                stored = packed[key + "4"]
                assert stored.dtype == torch.uint8 and stored.numel() == (codes.numel() + 1) // 2
        assert info["bytes_out"] < info["bytes_in"]
    a = load_quantized(tiny_unet(), src)[0].state_dict()
    b = load_packed(tiny_unet(), tmp_path / "p.safetensors")[0].state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
