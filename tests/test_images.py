"""Image, mask and depth conversion: one function per conversion, one value whatever form the input takes."""

import numpy as np
import pytest
import torch
from PIL import Image

import kontext_helpers as kh


@pytest.fixture(scope="module")
def depth_forms(tmp_path_factory):
    """One smooth depth map as a 16-bit PNG, as an 8-bit PNG and as floats in [0, 1]."""
    folder = tmp_path_factory.mktemp("depth")
    yy, xx = np.mgrid[0:64, 0:64]
    levels = np.round((0.2 + 0.6 * (xx + yy) / 126.0) * 65535).astype(np.uint16)  # [H, W], near = bright
    unit = levels / 65535.0
    Image.fromarray(levels).save(folder / "depth16.png")
    Image.fromarray(np.round(unit * 255).astype(np.uint8)).save(folder / "depth8.png")
    return {
        "16-bit PNG": Image.open(folder / "depth16.png"),
        "8-bit PNG": Image.open(folder / "depth8.png"),
        "floats [1, H, W]": torch.from_numpy(unit).float()[None],
        "numpy [H, W]": unit,
    }


def test_depth_to_pil_is_the_same_picture_for_every_form(depth_forms):
    pictures = {name: np.asarray(kh.depth_to_pil(d)) for name, d in depth_forms.items()}
    reference = pictures["floats [1, H, W]"]
    assert depth_forms["16-bit PNG"].mode.startswith("I"), "the fixture must hold a real 16-bit image"
    for name, picture in pictures.items():
        assert picture.shape == (64, 64, 3), f"{name}: depth_to_pil gives an RGB picture, got {picture.shape}"
        np.testing.assert_array_equal(picture, reference, err_msg=f"{name} differs from the same map as floats")
    assert 60 < reference.mean() < 200, f"a mid-grey map must not turn white or black, mean {reference.mean():.1f}"


def test_sample_edit_gives_one_result_for_16bit_8bit_and_float_depth(tiny_pipe, depth_forms):
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    results = {name: kh.sample_edit(tiny_pipe, image, "make the red sphere blue", depth=d, num_inference_steps=2,
                                    generator=torch.Generator().manual_seed(0), output_type="latent",
                                    max_sequence_length=32)
               for name, d in depth_forms.items()}
    reference = results["floats [1, H, W]"]
    for name, latents in results.items():
        torch.testing.assert_close(latents, reference, rtol=0, atol=0,
                                   msg=f"sample_edit with depth as {name} must equal depth as floats")


def test_committed_16bit_depth_sample_is_read_at_full_range(sample_data):
    path = sample_data / "depth" / "0000_recolour_sphere.png"
    with Image.open(path) as img:
        levels = np.asarray(img).astype(np.float64)
        picture = np.asarray(kh.depth_to_pil(img))[..., 0]
    np.testing.assert_array_equal(picture, np.round(levels / 65535 * 255).astype(np.uint8),
                                  err_msg="a 16-bit depth map must be divided by 65535, not clipped at 255")


def test_depth_to_pil_gives_8bit_rgb_of_the_right_size():
    depth = torch.linspace(0, 1, 24 * 40).reshape(1, 24, 40)
    img = kh.depth_to_pil(depth)
    assert img.mode == "RGB" and img.size == (40, 24), f"got mode {img.mode}, size {img.size}"
    pixels = np.array(img)
    assert pixels.dtype == np.uint8 and (pixels[..., 0] == pixels[..., 2]).all(), "must be grey 8-bit RGB"
    assert pixels[0, 0, 0] == 0 and pixels[-1, -1, 0] == 255, "0 -> black, 1 -> white"
    from_numpy = kh.depth_to_pil(depth[0].numpy())
    assert np.array_equal(np.array(from_numpy), pixels), "[H, W] numpy input must give the same image"


@pytest.mark.parametrize(("mode", "pixel", "expected"), [
    ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # transparent: composited on white
    ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
    ("LA", (0, 0), (255, 255, 255)),
    ("L", 128, (128, 128, 128)),
    ("I;16", 65535, (255, 255, 255)),  # 16-bit grey: divided by 65535
    ("I;16", 32896, (128, 128, 128)),
    ("F", 0.5, (128, 128, 128)),  # float: [0, 1]
    ("F", 7.0, (255, 255, 255)),  # clipped
])
def test_pil_to_rgb_handles_alpha_bit_depth_and_float(mode, pixel, expected):
    img = Image.new(mode, (4, 3), pixel)
    rgb = kh.pil_to_rgb(img)
    assert rgb.mode == "RGB" and rgb.size == (4, 3), f"{mode}: pil_to_rgb gives RGB of the same size"
    assert rgb.getpixel((1, 1)) == expected, f"{mode} {pixel} must become {expected}, got {rgb.getpixel((1, 1))}"


def test_exif_orientation_is_applied_by_every_converter():
    img = Image.new("L", (6, 2), 0)
    img.putpixel((5, 0), 255)  # top-right corner is white
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    img.info["exif"] = exif.tobytes()
    upright = img.transpose(Image.Transpose.ROTATE_270)  # what a viewer shows: 2 x 6
    assert kh.image_to_rgb_tensor(img).shape == (3, 6, 2), "image_to_rgb_tensor must apply EXIF orientation"
    expected = torch.from_numpy(np.asarray(upright) >= 128).float()
    torch.testing.assert_close(kh.mask_to_tensor(img)[0, 0], expected, msg="mask_to_tensor must apply EXIF")
    assert kh.depth_to_array(img).shape == (6, 2), "depth_to_array must apply EXIF orientation"


@pytest.mark.parametrize(("value", "shape"), [
    (torch.ones(8, 8), (1, 1, 8, 8)),
    (torch.ones(1, 8, 8), (1, 1, 8, 8)),
    (torch.ones(1, 1, 8, 8), (1, 1, 8, 8)),
    (np.ones((8, 8), dtype=bool), (1, 1, 8, 8)),
    (np.full((8, 8), 255, dtype=np.uint8), (1, 1, 8, 8)),
])
def test_mask_to_tensor_accepts_every_documented_form(value, shape):
    m = kh.mask_to_tensor(value)
    assert m.shape == shape and m.dtype == torch.float32, f"got {m.shape} {m.dtype}"
    assert float(m.min()) == 1.0, "an all-editable mask stays all ones"


def test_mask_to_tensor_binarises_pil_and_treats_transparent_as_preserve():
    rgba = Image.new("RGBA", (4, 4), (255, 255, 255, 0))
    rgba.putpixel((0, 0), (255, 255, 255, 255))
    m = kh.mask_to_tensor(rgba)[0, 0]
    assert float(m.sum()) == 1.0 and float(m[0, 0]) == 1.0, "only the opaque white pixel is editable"
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        kh.mask_to_tensor(torch.full((4, 4), 2.0))
    with pytest.raises(ValueError, match="one mask"):
        kh.mask_to_tensor(torch.ones(2, 1, 4, 4))


def test_depth_minmax_and_invert():
    img = Image.fromarray(np.array([[1000, 3000]], dtype=np.uint16))
    np.testing.assert_allclose(kh.pil_to_depth_array(img, "minmax"), [[0.0, 1.0]], err_msg="min-max maps to [0, 1]")
    np.testing.assert_allclose(kh.pil_to_depth_array(img, "minmax", invert=True), [[1.0, 0.0]],
                               err_msg="invert flips near and far")
    with pytest.raises(ValueError, match="NaN"):
        kh.depth_to_array(np.array([[0.0, np.nan]]))
