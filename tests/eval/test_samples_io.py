import numpy as np
import torch
from PIL import Image

from tfmq_exp.eval.samples_io import load_adm_npz, save_adm_npz, save_png_folder


def test_adm_npz_round_trip_rgb(tmp_path):
    images = torch.randint(
        0, 256, (4, 3, 8, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    path = save_adm_npz(images, tmp_path / "samples_4x8x6x3.npz", labels=np.arange(4))
    arr = load_adm_npz(path)
    assert arr.dtype == np.uint8 and arr.shape == (4, 8, 6, 3)
    np.testing.assert_array_equal(arr, images.permute(0, 2, 3, 1).numpy())
    with np.load(path) as npz:
        assert sorted(npz.files) == ["arr_0", "arr_1"]
    assert not list(tmp_path.glob("*.tmp*"))


def test_adm_npz_grayscale_nhwc_input_becomes_rgb(tmp_path):
    gray = torch.randint(0, 256, (2, 5, 5, 1), dtype=torch.uint8)  # NHWC
    arr = load_adm_npz(save_adm_npz(gray, tmp_path / "g.npz"))
    assert arr.shape == (2, 5, 5, 3)
    np.testing.assert_array_equal(arr[..., 2], gray[..., 0].numpy())


def test_png_folder(tmp_path):
    images = torch.randint(0, 256, (3, 1, 7, 7), dtype=torch.uint8)
    folder = save_png_folder(images, tmp_path / "png")
    files = sorted(folder.glob("*.png"))
    assert [f.name for f in files] == ["000000.png", "000001.png", "000002.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(files[1])), images[1, 0].numpy())
