"""Data: KontextPairs (folder checks, one error listing every problem, formats) and helpers for a user's own pairs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kontext_helpers as kh

FOLDERS = ("context", "target", "masks", "depth")


def open_error(root: Path, **kwargs) -> str:
    """The message of the ``ValueError`` that opening ``root`` must raise."""
    with pytest.raises(ValueError) as info:
        kh.KontextPairs(root, **kwargs)
    return str(info.value)


def _save_exif(img: Image.Image, path: Path, orientation: int, **kwargs) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif, **kwargs)


# --------------------------------------------------------------------------------------------------
# Opening a valid folder
# --------------------------------------------------------------------------------------------------


def test_items_have_documented_shapes_dtypes_and_ranges(pair_folder, tmp_path):
    ds = kh.KontextPairs(pair_folder, resolution=32)
    assert len(ds) == 3, f"three pairs were written, dataset has {len(ds)}"
    assert ds.names == ["a", "b", "c"], f"names must be the sorted stems, got {ds.names}"
    assert ds.prompts == ["edit number 0", "edit number 1", "edit number 2"], f"prompts: {ds.prompts}"
    item = ds[1]
    assert set(item) == {"context", "target", "mask", "depth", "prompt", "name"}, f"keys: {sorted(item)}"
    for key, channels in (("context", 3), ("target", 3), ("mask", 1), ("depth", 1)):
        value = item[key]
        assert value.shape == (channels, 32, 32), f"{key} has shape {tuple(value.shape)}"
        assert value.dtype == torch.float32, f"{key} has dtype {value.dtype}"
        assert 0.0 <= float(value.min()) and float(value.max()) <= 1.0, f"{key} leaves [0, 1]"
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0}, "the mask must be exactly {0, 1}"
    assert item["prompt"] == "edit number 1" and item["name"] == "b", f"prompt/name: {item['prompt']!r}"
    assert "3 pairs" in repr(ds) and str(tmp_path) in repr(ds), f"repr should say count and root: {ds!r}"


def test_pixels_survive_loading_at_native_resolution(pair_folder, pair_images):
    ds = kh.KontextPairs(pair_folder, resolution=32)
    ref = pair_images(0, 32)
    item = ds[0]
    expected_ctx = torch.from_numpy(np.array(ref["context"])).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(item["context"], expected_ctx, msg="context pixels changed on load")
    expected_mask = torch.from_numpy(np.array(ref["masks"]) > 0).float()[None]
    torch.testing.assert_close(item["mask"], expected_mask, msg="mask pixels changed on load")
    rows = item["depth"][0, :, 0]
    assert float(rows[0]) == 0.0 and float(rows[-1]) == 1.0, "minmax depth must span [0, 1] (near = 1)"


def test_pairs_match_by_stem_not_by_position_with_mixed_extensions(make_pairs, tmp_path):
    root = make_pairs(tmp_path, stems=("a", "b"))
    # b's context becomes a JPEG with an upper-case extension; a's depth a TIFF: sorted positions shift
    Image.open(root / "context" / "b.png").save(root / "context" / "b.JPG", quality=95)
    (root / "context" / "b.png").unlink()
    Image.open(root / "depth" / "a.png").save(root / "depth" / "a.tif")
    (root / "depth" / "a.png").unlink()
    Image.open(root / "masks" / "a.png").save(root / "masks" / "a.webp", lossless=True)
    (root / "masks" / "a.png").unlink()
    ds = kh.KontextPairs(root, resolution=32)
    assert ds.names == ["a", "b"], f"stems: {ds.names}"
    blue = [float(ds[i]["context"][2].mean()) for i in range(2)]
    assert blue[0] < 0.02 and abs(blue[1] - 40 / 255) < 0.03, f"context of b is not b's image: blue {blue}"
    assert ds.files(0)["depth"].name == "a.tif", f"files: {ds.files(0)}"


def test_hidden_files_and_files_next_to_prompts_are_ignored(pair_folder):
    root = pair_folder
    (root / "context" / ".DS_Store").write_bytes(b"\x00\x01")
    (root / "masks" / ".ipynb_checkpoints").mkdir()
    (root / "README.md").write_text("how this data was made\n")
    assert len(kh.KontextPairs(root, resolution=32)) == 3, "hidden files and root files must not count"


def test_dataloader_stacks_items_into_batches(pair_folder):
    ds = kh.KontextPairs(pair_folder, resolution=32)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["context"].shape == (2, 3, 32, 32), f"context batch {tuple(batch['context'].shape)}"
    assert batch["mask"].shape == (2, 1, 32, 32), f"mask batch {tuple(batch['mask'].shape)}"
    assert batch["prompt"] == ["edit number 0", "edit number 1"], f"prompts batch {batch['prompt']}"


# --------------------------------------------------------------------------------------------------
# Bad input: one ValueError naming the file, every problem listed
# --------------------------------------------------------------------------------------------------


def test_missing_root_is_reported(tmp_path):
    msg = open_error(tmp_path / "nowhere")
    assert "nowhere" in msg and "does not exist" in msg, msg


def test_missing_folder_is_named(pair_folder):
    root = pair_folder
    for f in (root / "masks").iterdir():
        f.unlink()
    (root / "masks").rmdir()
    msg = open_error(root, resolution=32)
    assert "[missing folder] masks/ is missing" in msg, msg


def test_misnamed_folder_gets_a_rename_hint(pair_folder):
    root = pair_folder
    (root / "masks").rename(root / "mask")
    msg = open_error(root, resolution=32)
    assert "mask/" in msg and "rename it to masks/" in msg, msg


def test_stem_missing_from_one_folder_names_folder_stem_and_existing_file(pair_folder):
    root = pair_folder
    (root / "masks" / "b.png").unlink()
    msg = open_error(root, resolution=32)
    assert "masks/b.*" in msg and "'b'" in msg and "context/b.png" in msg, msg
    assert "[missing image]" in msg, msg


def test_stray_non_image_file_is_named(pair_folder):
    root = pair_folder
    (root / "masks" / "notes.txt").write_text("draw masks in white")
    msg = open_error(root, resolution=32)
    assert "[stray file] masks/notes.txt" in msg, msg


def test_duplicate_stems_name_both_files(pair_folder):
    root = pair_folder
    Image.open(root / "context" / "a.png").save(root / "context" / "a.jpg")
    msg = open_error(root, resolution=32)
    assert "[duplicate stem]" in msg and "context/a.jpg" in msg and "context/a.png" in msg, msg


def test_file_that_is_not_an_image_is_unreadable(pair_folder):
    root = pair_folder
    (root / "context" / "b.png").write_bytes(b"this is not a png")
    msg = open_error(root, resolution=32)
    assert "[unreadable image] context/b.png" in msg, msg


def test_truncated_image_is_caught_by_a_full_decode(pair_folder):
    root = pair_folder
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)  # incompressible
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    (root / "target" / "c.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    msg = open_error(root, resolution=32)
    assert "[unreadable image] target/c.png" in msg and "truncated" in msg, msg


def test_missing_prompts_file_is_reported_with_the_other_txt_found(pair_folder):
    root = pair_folder
    (root / "prompts.txt").rename(root / "captions.txt")
    msg = open_error(root, resolution=32)
    assert "prompts.txt is missing" in msg and "captions.txt" in msg, msg


def test_prompt_count_differing_from_pair_count(make_pairs, tmp_path):
    root = make_pairs(tmp_path, prompts=["one", "two"])
    msg = open_error(root, resolution=32)
    assert "prompts.txt has 2 prompt lines but there are 3 pairs" in msg, msg


def test_empty_prompt_line_in_the_middle_names_its_line_number(pair_folder):
    root = pair_folder
    (root / "prompts.txt").write_text("one\n\nthree\n", encoding="utf-8")
    msg = open_error(root, resolution=32)
    assert "prompts.txt line 2 is empty" in msg, msg


def test_prompts_that_are_not_utf8_are_reported(pair_folder):
    root = pair_folder
    (root / "prompts.txt").write_bytes("caf\u00e9\none\ntwo\n".encode("latin-1"))
    msg = open_error(root, resolution=32)
    assert "prompts.txt is not UTF-8" in msg, msg


def test_empty_dataset_is_reported(tmp_path):
    for folder in FOLDERS:
        (tmp_path / folder).mkdir()
    (tmp_path / "prompts.txt").write_text("")
    msg = open_error(tmp_path, resolution=32)
    assert "[empty dataset]" in msg and "context/" in msg, msg


def test_resolution_not_multiple_of_16_is_listed_with_file_problems(pair_folder):
    root = pair_folder
    (root / "prompts.txt").unlink()
    msg = open_error(root, resolution=100)
    assert "resolution=100 is not a positive multiple of 16" in msg and "96 or 112" in msg, msg
    assert "prompts.txt is missing" in msg, f"file problems must be listed with the argument problem: {msg}"


def test_several_problems_come_in_one_error_with_one_hint_per_kind(make_pairs, tmp_path):
    root = make_pairs(tmp_path, prompts=["only one"])
    (root / "depth" / "a.png").unlink()
    (root / "target" / "list.csv").write_text("a,b")
    (root / "masks" / "c.png").write_bytes(b"garbage")
    msg = open_error(root, resolution=32)
    for needle in ("depth/a.*", "target/list.csv", "masks/c.png", "prompts.txt has 1 prompt lines"):
        assert needle in msg, f"{needle!r} missing from the combined error:\n{msg}"
    assert "4 problem(s)" in msg, msg
    hints = msg.split("How to fix:")[1]
    for kind in ("missing image", "stray file", "unreadable image", "prompts"):
        assert f"- {kind}:" in hints, f"no fix hint for {kind!r}:\n{msg}"


def test_mask_saved_as_zero_one_values_is_reported(pair_folder):
    root = pair_folder
    mask = (np.array(Image.open(root / "masks" / "a.png")) > 0).astype(np.uint8)  # values 0 and 1
    Image.fromarray(mask).save(root / "masks" / "a.png")
    msg = open_error(root, resolution=32)
    assert "[bad mask] masks/a.png" in msg and "0 and 1" in msg, msg


def test_depth_with_nan_is_reported(pair_folder):
    root = pair_folder
    depth = np.ones((32, 32), np.float32)
    depth[3, 3] = np.nan
    (root / "depth" / "b.png").unlink()
    Image.fromarray(depth).save(root / "depth" / "b.tif")
    msg = open_error(root, resolution=32)
    assert "[bad depth] depth/b.tif" in msg, msg


def test_images_of_a_pair_with_another_aspect_ratio_are_reported(pair_folder):
    root = pair_folder
    Image.new("RGB", (32, 16)).save(root / "target" / "c.png")
    msg = open_error(root, resolution=32)
    assert "[size mismatch] target/c.png is 32x16 but context/c.png is 32x32" in msg, msg


# --------------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------------


def test_16bit_depth_keeps_more_than_256_levels(make_pairs, tmp_path):
    root = make_pairs(tmp_path, size=64)
    levels = (np.arange(64 * 64, dtype=np.uint16) * 16).reshape(64, 64)  # 4096 distinct 16-bit values
    Image.fromarray(levels).save(root / "depth" / "a.png")
    depth = kh.KontextPairs(root, resolution=64)[0]["depth"]
    assert depth.unique().numel() > 256, f"only {depth.unique().numel()} depth levels survived"
    raw = kh.KontextPairs(root, resolution=64, depth_normalize="none")[0]["depth"]
    expected = torch.from_numpy(levels.astype(np.float32) / 65535.0)[None]
    torch.testing.assert_close(raw, expected, msg="'none' must divide a 16-bit map by 65535")


def test_16bit_big_endian_and_int32_depth_read_at_full_precision(make_pairs, tmp_path):
    root = make_pairs(tmp_path, size=64)
    levels = (np.arange(64 * 64, dtype=np.uint16) * 16).reshape(64, 64)
    for path in (root / "depth" / "a.png", root / "depth" / "b.png"):
        path.unlink()
    Image.frombytes("I;16B", (64, 64), levels.astype(">u2").tobytes()).save(root / "depth" / "a.tif")
    Image.fromarray(levels.astype(np.int32)).save(root / "depth" / "b.tif")  # mode "I"
    ds = kh.KontextPairs(root, resolution=64, depth_normalize="none")
    expected = torch.from_numpy(levels.astype(np.float32) / 65535.0)[None]
    for i in (0, 1):
        torch.testing.assert_close(
            ds[i]["depth"], expected, msg=f"{ds.files(i)['depth'].name} lost precision"
        )


def test_float_tiff_depth_minmax_none_and_invert(pair_folder):
    root = pair_folder
    metres = np.linspace(2.0, 5.0, 32 * 32, dtype=np.float32).reshape(32, 32)  # metric: far = large
    (root / "depth" / "a.png").unlink()
    Image.fromarray(metres).save(root / "depth" / "a.tiff")
    minmax = kh.KontextPairs(root, resolution=32)[0]["depth"]
    expected = torch.from_numpy((metres - 2.0) / 3.0)[None]
    torch.testing.assert_close(minmax, expected, msg="float TIFF min-max normalisation is wrong")
    inverted = kh.KontextPairs(root, resolution=32, depth_invert=True)[0]["depth"]
    torch.testing.assert_close(inverted, 1.0 - expected, msg="depth_invert must make the near (small) end 1")
    clipped = kh.KontextPairs(root, resolution=32, depth_normalize="none")[0]["depth"]
    torch.testing.assert_close(clipped, torch.ones_like(clipped), msg="'none' keeps float values, clipped")


def test_8bit_and_rgb_depth_and_constant_depth(pair_folder):
    root = pair_folder
    grey = np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))
    Image.fromarray(grey).save(root / "depth" / "a.png")
    Image.fromarray(grey).convert("RGB").save(root / "depth" / "b.png")
    Image.new("L", (32, 32), 77).save(root / "depth" / "c.png")
    ds = kh.KontextPairs(root, resolution=32, depth_normalize="none")
    expected = torch.from_numpy(grey.astype(np.float32) / 255.0)[None]
    torch.testing.assert_close(ds[0]["depth"], expected, msg="8-bit grey depth / 255")
    torch.testing.assert_close(ds[1]["depth"], expected, msg="RGB grey depth must equal the grey one")
    constant = kh.KontextPairs(root, resolution=32)[2]["depth"]
    torch.testing.assert_close(constant, torch.zeros_like(constant), msg="a constant map min-maxes to zeros")


def test_jpeg_mask_becomes_exactly_binary_and_keeps_its_shape(make_pairs, tmp_path):
    root = make_pairs(tmp_path, size=64)
    mask = np.zeros((64, 64), np.uint8)
    mask[10:40, 20:50] = 255
    Image.fromarray(mask).save(root / "masks" / "a.jpg", quality=60)
    (root / "masks" / "a.png").unlink()
    loaded = kh.KontextPairs(root, resolution=64)[0]["mask"]
    assert set(loaded.unique().tolist()) <= {0.0, 1.0}, f"JPEG mask values {loaded.unique().tolist()}"
    agreement = float((loaded[0].numpy() == (mask > 0)).mean())
    assert agreement > 0.98, f"binarised JPEG mask agrees on only {agreement:.3f} of pixels"


def test_rgb_1bit_and_rgba_masks_are_read(pair_folder):
    root = pair_folder
    mask = np.array(Image.open(root / "masks" / "a.png"))
    Image.fromarray(mask).convert("RGB").save(root / "masks" / "a.png")
    Image.fromarray(mask).convert("1").save(root / "masks" / "b.png")
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere, but only opaque inside the square: transparent = preserve
    rgba[..., 3] = mask
    Image.fromarray(rgba).save(root / "masks" / "c.png")
    ds = kh.KontextPairs(root, resolution=32)
    expected = torch.from_numpy(mask > 0).float()[None]
    for i in range(3):
        torch.testing.assert_close(ds[i]["mask"], expected, msg=f"mask {ds.files(i)['masks'].name} misread")


def test_rgba_context_is_composited_on_white(pair_folder):
    root = pair_folder
    rgba = np.zeros((32, 32, 4), np.uint8)  # black ...
    rgba[:, :16, 3] = 255  # ... opaque on the left, transparent on the right
    Image.fromarray(rgba).save(root / "context" / "a.png")
    context = kh.KontextPairs(root, resolution=32)[0]["context"]
    assert context.shape == (3, 32, 32), f"RGBA must load as 3 channels, got {tuple(context.shape)}"
    torch.testing.assert_close(context[:, :, :16], torch.zeros(3, 32, 16), msg="opaque black stays black")
    torch.testing.assert_close(context[:, :, 16:], torch.ones(3, 32, 16), msg="transparent becomes white")


def test_palette_cmyk_grey_and_16bit_contexts_load_as_rgb(make_pairs, tmp_path):
    root = make_pairs(tmp_path, stems=("a", "b", "c", "d"))
    original = Image.open(root / "context" / "a.png").convert("RGB")
    original.convert("P").save(root / "context" / "a.png")
    (root / "context" / "b.png").unlink()
    original.convert("CMYK").save(root / "context" / "b.jpg", quality=95)
    original.convert("L").save(root / "context" / "c.png")
    grey16 = np.full((32, 32), 32768, np.uint16)
    Image.fromarray(grey16).save(root / "context" / "d.png")
    ds = kh.KontextPairs(root, resolution=32)
    reference = torch.from_numpy(np.array(original)).permute(2, 0, 1).float() / 255
    for i in range(4):
        assert ds[i]["context"].shape == (3, 32, 32), f"{ds.files(i)['context'].name} is not 3 channels"
    palette_error = float((ds[0]["context"] - reference).abs().mean())
    cmyk_error = float((ds[1]["context"] - reference).abs().mean())
    assert palette_error < 0.05 and cmyk_error < 0.05, f"palette {palette_error:.3f}, CMYK {cmyk_error:.3f}"
    torch.testing.assert_close(ds[3]["context"], torch.full((3, 32, 32), 128 / 255), msg="16-bit grey / 257")


def test_mask_at_half_resolution_lines_up_with_its_image(make_pairs, tmp_path):
    root = make_pairs(tmp_path, size=64)
    half = np.zeros((32, 32), np.uint8)
    half[4:12, 8:16] = 255  # rows 8..23, cols 16..31 at full size
    Image.fromarray(half).save(root / "masks" / "a.png")
    mask = kh.KontextPairs(root, resolution=64)[0]["mask"]
    expected = torch.zeros(1, 64, 64)
    expected[:, 8:24, 16:32] = 1.0
    torch.testing.assert_close(mask, expected, msg="a half-size mask must cover the same region of the image")


def test_exif_orientation_is_applied_to_all_four_images(make_pairs, tmp_path):
    root = make_pairs(tmp_path, stems=("a",))
    for folder in FOLDERS:
        (root / folder / "a.png").unlink()
    marked = np.zeros((32, 32), np.uint8)
    marked[:8, :8] = 255  # top-left as stored; orientation 6 = turn 90 degrees clockwise to display
    _save_exif(Image.fromarray(marked).convert("RGB"), root / "context" / "a.jpg", 6, quality=95)
    _save_exif(Image.fromarray(marked).convert("RGB"), root / "target" / "a.png", 6)
    _save_exif(Image.fromarray(marked), root / "masks" / "a.png", 6)
    _save_exif(Image.fromarray(marked.astype(np.uint16) * 257), root / "depth" / "a.png", 6)
    item = kh.KontextPairs(root, resolution=32)[0]
    for key in ("context", "target", "mask", "depth"):
        image = item[key].mean(0)
        top_right, top_left = float(image[:8, 24:].mean()), float(image[:8, :8].mean())
        assert top_right > 0.9 and top_left < 0.1, (
            f"{key}: marker not turned to the top right ({top_right:.2f})"
        )


def test_prompts_with_bom_crlf_and_trailing_newlines(pair_folder):
    root = pair_folder
    (root / "prompts.txt").write_bytes(
        "\ufeffmake it red\r\nadd a hat  \r\nremove the box\r\n\r\n\n".encode()
    )
    ds = kh.KontextPairs(root, resolution=32)
    assert ds.prompts == ["make it red", "add a hat", "remove the box"], f"prompts: {ds.prompts}"


def test_crop_applies_the_same_centre_box_to_all_four_images(make_pairs, tmp_path):
    root = make_pairs(tmp_path, stems=("a",))
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, 20:24] = 255  # a vertical band at columns 20..23 of a 64x32 frame
    Image.fromarray(wide).save(root / "context" / "a.png")
    Image.fromarray(wide).save(root / "target" / "a.png")
    mask = np.zeros((16, 32), np.uint8)  # half size: band at 10..11
    mask[:, 10:12] = 255
    Image.fromarray(mask).save(root / "masks" / "a.png")
    depth = np.zeros((64, 128), np.uint16)  # double size: band at 40..47
    depth[:, 40:48] = 65535
    Image.fromarray(depth).save(root / "depth" / "a.png")
    item = kh.KontextPairs(root, resolution=32, resize="crop")[0]  # centre box = columns 16..47
    band = torch.zeros(32, dtype=torch.bool)
    band[4:8] = True
    for key in ("context", "target", "mask"):
        profile = item[key].mean(dim=(0, 1))  # [W]
        torch.testing.assert_close(profile, band.float(), msg=f"{key}: band not at columns 4..7 after crop")
    depth_profile = item["depth"].mean(dim=(0, 1))
    assert float(depth_profile[5:7].min()) > 0.9, f"depth band missing: {depth_profile[:12].tolist()}"
    assert float(depth_profile[band.logical_not()].max()) < 0.6, "depth band leaks far outside columns 4..7"
    assert float(depth_profile[:2].max()) == 0.0 and float(depth_profile[10:].max()) == 0.0, (
        "depth misaligned"
    )
    square_mask = kh.KontextPairs(root, resolution=32, resize="square")[0]["mask"].mean(dim=(0, 1))
    assert square_mask[10:12].min() == 1.0 and square_mask.sum() == 2.0, "square resize: band at 10..11"


# --------------------------------------------------------------------------------------------------
# Helpers for a user's own pairs
# --------------------------------------------------------------------------------------------------


def test_mask_from_difference_covers_every_changed_pixel():
    gen = torch.Generator().manual_seed(0)
    context = torch.rand(3, 40, 48, generator=gen)
    target = context.clone()
    changed = torch.rand(40, 48, generator=gen) < 0.02
    target[1][changed] = (target[1][changed] + 0.5) % 1.0  # a change of at least 0.5 in one channel
    exact = kh.mask_from_difference(context, target, dilate=0)
    torch.testing.assert_close(
        exact, changed.float()[None], msg="dilate=0 must mark exactly the changed pixels"
    )
    grown = kh.mask_from_difference(context, target, dilate=2)
    assert grown.shape == (1, 40, 48) and bool((grown[0][changed] == 1).all()), (
        "a changed pixel is not covered"
    )
    assert grown.sum() > exact.sum(), "dilation must grow the mask"


def test_mask_from_difference_dilates_by_exactly_n_pixels_and_ignores_small_noise():
    context = torch.zeros(3, 21, 21)
    target = context + 0.02  # below the threshold everywhere ...
    target[:, 10, 10] = 1.0  # ... except one pixel
    mask = kh.mask_from_difference(context, target, threshold=0.04, dilate=3)
    expected = torch.zeros(1, 21, 21)
    expected[:, 7:14, 7:14] = 1.0
    torch.testing.assert_close(mask, expected, msg="one changed pixel must grow to a 7x7 square (dilate=3)")


def test_mask_from_difference_accepts_pil_images_and_checks_sizes():
    a = Image.new("RGB", (16, 16), (10, 10, 10))
    b = a.copy()
    b.putpixel((3, 5), (200, 10, 10))
    mask = kh.mask_from_difference(a, b, dilate=0)
    assert mask.shape == (1, 16, 16) and mask.sum() == 1 and mask[0, 5, 3] == 1, "PIL input: wrong pixel"
    with pytest.raises(ValueError, match="same frame"):
        kh.mask_from_difference(a, Image.new("RGB", (16, 8)))


def test_write_pair_folder_round_trips(tmp_path):
    gen = torch.Generator().manual_seed(1)
    contexts = [torch.rand(3, 32, 32, generator=gen) for _ in range(2)]
    targets = [c.flip(-1) for c in contexts]
    masks = [(torch.rand(1, 32, 32, generator=gen) > 0.5).float() for _ in range(2)]
    depths = [torch.rand(1, 32, 32, generator=gen) for _ in range(2)]
    ds = kh.write_pair_folder(
        tmp_path / "mine",
        contexts,
        targets,
        masks,
        depths,
        ["zebra", "apple"],
        names=["z", "a"],
        resolution=32,
        depth_normalize="none",
    )
    assert ds.names == ["a", "z"] and ds.prompts == ["apple", "zebra"], f"{ds.names} {ds.prompts}"
    for i, name_index in enumerate((1, 0)):  # dataset order is sorted: a (input 1), z (input 0)
        item = ds[i]
        torch.testing.assert_close(
            item["context"],
            contexts[name_index],
            atol=0.5 / 255 + 1e-6,
            rtol=0,
            msg="context round trip (8-bit)",
        )
        torch.testing.assert_close(
            item["target"],
            targets[name_index],
            atol=0.5 / 255 + 1e-6,
            rtol=0,
            msg="target round trip (8-bit)",
        )
        torch.testing.assert_close(item["mask"], masks[name_index], msg="mask round trip must be exact")
        torch.testing.assert_close(
            item["depth"],
            depths[name_index],
            atol=0.5 / 65535 + 1e-6,
            rtol=0,
            msg="depth round trip must keep 16-bit precision",
        )
    with Image.open(tmp_path / "mine" / "depth" / "a.png") as img:
        assert img.mode.startswith("I;16"), f"depth must be written as a 16-bit PNG, got mode {img.mode}"


def test_write_pair_folder_names_lists_of_different_length(tmp_path):
    image = torch.zeros(3, 16, 16)
    with pytest.raises(ValueError) as info:
        kh.write_pair_folder(
            tmp_path,
            [image, image],
            [image, image],
            [torch.zeros(1, 16, 16)],
            [torch.zeros(1, 16, 16)] * 2,
            ["a", "b"],
        )
    assert "masks=1" in str(info.value) and "contexts=2" in str(info.value), str(info.value)


def test_write_pair_folder_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    args = (
        [torch.zeros(3, 16, 16)],
        [torch.ones(3, 16, 16)],
        [torch.ones(1, 16, 16)],
        [torch.zeros(1, 16, 16)],
        ["brighten it"],
    )
    (tmp_path / "notes.md").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        kh.write_pair_folder(tmp_path, *args, resolution=16)
    ds = kh.write_pair_folder(tmp_path, *args, resolution=16, overwrite=True)
    assert len(ds) == 1 and (tmp_path / "notes.md").exists(), (
        "overwrite replaces the pairs, keeps other files"
    )


@pytest.fixture(scope="module")
def tiny_depth_model(tmp_path_factory):
    """A random Depth Anything model at a tiny width, saved as a local folder: estimate_depth without the Hub."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    folder = tmp_path_factory.mktemp("depth_model")
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                            image_size=56, patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[16] * 4,
                                 fusion_hidden_size=16, head_hidden_size=8, patch_size=14)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14,
                      do_pad=False).save_pretrained(folder)
    return str(folder)


def test_estimate_depth_batches_images_of_different_aspect_ratios(tiny_depth_model):
    images = [Image.new("RGB", (64, 48), (200, 10, 10)), Image.new("RGB", (48, 64), (10, 200, 10)),
              Image.new("RGB", (64, 48), (10, 10, 200))]
    depths = kh.estimate_depth(images, model=tiny_depth_model, device="cpu", batch_size=4)
    assert [tuple(d.shape) for d in depths] == [(1, 48, 64), (1, 64, 48), (1, 48, 64)], "one map per image, own size"
    for image, depth in zip(images, depths):
        alone = kh.estimate_depth(image, model=tiny_depth_model, device="cpu", batch_size=1)[0]
        torch.testing.assert_close(depth, alone, msg="a batched map must equal the map of the image alone, in order")
        assert float(depth.min()) >= 0.0 and float(depth.max()) <= 1.0, "maps are min-max normalised to [0, 1]"
    flipped = kh.estimate_depth(images[:1], model=tiny_depth_model, device="cpu", invert=True)[0]
    torch.testing.assert_close(flipped, 1.0 - depths[0], msg="invert=True flips near and far")


# --------------------------------------------------------------------------------------------------
# The committed sample dataset
# --------------------------------------------------------------------------------------------------


def test_committed_data_samples_open_and_every_pair_loads(sample_data):
    ds = kh.KontextPairs(sample_data)
    assert len(ds) >= 1, "data_samples/ holds no pairs"
    for i in range(len(ds)):
        item = ds[i]
        assert set(item["mask"].unique().tolist()) == {0.0, 1.0}, f"{item['name']}: mask not binary or empty"
        assert item["depth"].unique().numel() > 256, f"{item['name']}: depth lost its 16-bit levels"


# --------------------------------------------------------------------------------------------------
# Hugging Face datasets as input
# --------------------------------------------------------------------------------------------------


def _hf_pairs(sample_data, count=3):
    """The first sample pairs as an in-memory ``datasets.Dataset`` with its own column names."""
    import datasets

    stems = sorted(p.stem for p in (sample_data / "context").iterdir())[:count]
    prompts = (sample_data / "prompts.txt").read_text().splitlines()[:count]
    opened = {col: [Image.open(sample_data / folder / f"{s}.png") for s in stems]
              for col, folder in (("source", "context"), ("edited", "target"), ("edit_mask", "masks"),
                                  ("depth_map", "depth"))}
    features = datasets.Features({**{col: datasets.Image() for col in opened}, "instruction": datasets.Value("string"),
                                  "id": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({**opened, "instruction": prompts, "id": stems}, features=features)
    return ds, stems


_HF_COLUMNS = {"context": "source", "target": "edited", "mask": "edit_mask", "depth": "depth_map",
               "prompt": "instruction"}


def test_from_hf_dataset_reads_like_the_folder_it_came_from(sample_data, tmp_path):
    ds, stems = _hf_pairs(sample_data)
    pairs = kh.KontextPairs.from_hf_dataset(ds, tmp_path / "from_hf", **_HF_COLUMNS, name="id", resolution=64,
                                            progress=False)
    folder = kh.KontextPairs(sample_data, resolution=64)
    assert pairs.names == stems, f"name= gives the file stems: {pairs.names} vs {stems}"
    assert pairs.prompts == folder.prompts[:3], "one pair per row, each with its own prompt"
    for i in range(3):
        got, want = pairs[i], folder[i]
        for key in ("context", "target", "mask"):
            torch.testing.assert_close(got[key], want[key], msg=f"row {i} ({stems[i]}): {key} differs from the folder")
        torch.testing.assert_close(got["depth"], want["depth"], atol=2e-5, rtol=0,
                                   msg=f"row {i}: depth must keep its 16-bit levels")


def test_from_hf_dataset_names_rows_by_number_without_a_name_column(sample_data, tmp_path):
    ds, _ = _hf_pairs(sample_data, count=2)
    pairs = kh.KontextPairs.from_hf_dataset(ds, tmp_path / "numbered", **_HF_COLUMNS, resolution=64, progress=False)
    assert pairs.names == ["0000", "0001"], f"rows become 0000, 0001, ... like write_pair_folder: {pairs.names}"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        kh.KontextPairs.from_hf_dataset(ds, tmp_path / "numbered", **_HF_COLUMNS, resolution=64, progress=False)


def test_from_hf_dataset_lists_every_missing_column_in_one_error(sample_data, tmp_path):
    ds, _ = _hf_pairs(sample_data, count=2)
    with pytest.raises(ValueError) as err:
        kh.KontextPairs.from_hf_dataset(ds, tmp_path / "x", **{**_HF_COLUMNS, "depth": "depth", "prompt": "caption"})
    text = str(err.value)
    assert "'depth' (for depth)" in text and "'caption' (for prompt)" in text, f"both missing columns: {text}"
    assert "'instruction'" in text and "'depth_map'" in text, f"and the columns the dataset has: {text}"
    assert not (tmp_path / "x").exists(), "nothing is written when a column is missing"


def test_from_hf_dataset_lists_every_bad_cell_in_one_error(sample_data, tmp_path):
    ds, _ = _hf_pairs(sample_data, count=3)
    rows = [dict(ds[0], instruction=""), dict(ds[1], edit_mask=None, id="a/b"), dict(ds[2], source="x.png", id="a/b")]
    with pytest.raises(ValueError) as err:
        kh.KontextPairs.from_hf_dataset(rows, tmp_path / "y", **_HF_COLUMNS, name="id", progress=False)
    text = str(err.value)
    for expected in ("row 0, column 'instruction' (prompt)", "row 1, column 'edit_mask' (mask): empty",
                     "row 1, column 'id' (name)", "row 2, column 'source' (context): expected an image",
                     "names must be unique"):
        assert expected in text, f"missing {expected!r} in the one error: {text}"
    assert text.count("\n  - ") == 6, f"six problems, one per line: {text}"
    assert not (tmp_path / "y").exists(), "nothing is written when a cell is bad"


def test_from_hf_dataset_without_masks_derives_them_from_each_pair(sample_data, tmp_path):
    ds, stems = _hf_pairs(sample_data, count=2)
    ds = ds.remove_columns("edit_mask")
    derived = kh.KontextPairs.from_hf_dataset(ds, tmp_path / "derived", **{**_HF_COLUMNS, "mask": None}, name="id",
                                              resolution=64, progress=False)
    masks = [kh.mask_from_difference(row["source"], row["edited"]) for row in ds]
    by_hand = kh.write_pair_folder(tmp_path / "by_hand", list(ds["source"]), list(ds["edited"]), masks,
                                   list(ds["depth_map"]), list(ds["instruction"]), names=stems, resolution=64)
    for i in range(2):
        torch.testing.assert_close(derived[i]["mask"], by_hand[i]["mask"],
                                   msg=f"row {i}: mask=None must be kh.mask_from_difference of the pair")
    assert 0 < float(derived[0]["mask"].mean()) < 0.5, "the derived mask marks the edit, not nothing or everything"

    rows = [dict(ds[0], edited=ds[0]["edited"].resize((32, 64)))]
    with pytest.raises(ValueError, match=r"row 0, column 'edited' \(target\): 32x64 but the context is 512x512 "
                                         r"\(W x H\); mask=None derives.*one frame"):
        kh.KontextPairs.from_hf_dataset(rows, tmp_path / "z", **{**_HF_COLUMNS, "mask": None}, progress=False)


def test_from_hf_dataset_lists_every_row_of_another_size_in_one_error(sample_data, tmp_path):
    """The target has the context's size; the mask and the depth maps its frame (aspect ratio, as the folder reader
    checks with the same function); every bad cell of every row in one error, before anything is written."""
    ds, stems = _hf_pairs(sample_data, count=3)
    rows = [dict(row, goal_depth=Image.open(sample_data / "target_depth" / f"{stem}.png"))
            for row, stem in zip(list(ds) * 2, stems * 2)]
    assert rows[0]["source"].size == (512, 512), "premise: the sample pairs are 512x512"
    rows[0]["edited"] = rows[0]["edited"].resize((512, 384))  # another aspect ratio
    rows[1]["edited"] = rows[1]["edited"].resize((256, 256))  # the same frame, but not the context's size
    rows[2].update(edit_mask=rows[2]["edit_mask"].resize((512, 256)), depth_map=rows[2]["depth_map"].resize((256, 512)))
    rows[3].update(edit_mask=rows[3]["edit_mask"].resize((256, 256)),  # same frame at another size: fine
                   depth_map=np.asarray(rows[3]["depth_map"].resize((128, 128)), dtype=np.float32) / 65535.0)
    rows[4].update(depth_map=torch.rand(1, 64, 32), goal_depth=rows[4]["goal_depth"].resize((512, 480)))
    with pytest.raises(ValueError) as err:
        kh.KontextPairs.from_hf_dataset(rows, tmp_path / "sizes", **_HF_COLUMNS, target_depth="goal_depth",
                                        progress=False)
    text = str(err.value)
    for expected in ("row 0, column 'edited' (target): 512x384 but the context is 512x512 (W x H)",
                     "row 1, column 'edited' (target): 256x256 but the context is 512x512 (W x H)",
                     "row 2, column 'edit_mask' (mask): 512x256 has another aspect ratio than the context's 512x512",
                     "row 2, column 'depth_map' (depth): 256x512 has another aspect ratio",
                     "row 4, column 'depth_map' (depth): 32x64 has another aspect ratio",
                     "row 4, column 'goal_depth' (target_depth): 512x480 has another aspect ratio"):
        assert expected in text, f"missing {expected!r} in the one error: {text}"
    assert text.count("\n  - ") == 6 and "row 3" not in text and "row 5" not in text, f"six problems only: {text}"
    assert not (tmp_path / "sizes").exists(), "nothing is written when a row has the wrong size"
    pairs = kh.KontextPairs.from_hf_dataset(rows[3:4] + rows[5:], tmp_path / "fine", **_HF_COLUMNS,
                                            target_depth="goal_depth", resolution=64, progress=False)
    assert len(pairs) == 2 and pairs[0]["mask"].shape == (1, 64, 64), "a mask or depth of the context's frame is fine"


def test_from_hf_dataset_asks_for_rows_of_a_streamed_dataset(sample_data, tmp_path):
    ds, _ = _hf_pairs(sample_data, count=2)
    with pytest.raises(TypeError, match=r"list\(ds.take"):
        kh.KontextPairs.from_hf_dataset(ds.to_iterable_dataset(), tmp_path / "s", **_HF_COLUMNS)
    assert not (tmp_path / "s").exists(), "nothing is written"


# --------------------------------------------------------------------------------------------------
# The target's depth (optional target_depth/ folder)
# --------------------------------------------------------------------------------------------------


def _add_target_depths(root: Path, stems=("a", "b", "c"), size=(32, 32)) -> None:
    """A 16-bit target depth per stem: a ramp that rises to the right (near = bright on the right)."""
    (root / "target_depth").mkdir()
    ramp = np.tile(np.linspace(0, 65535, size[0]).astype(np.uint16), (size[1], 1))  # [H, W]
    for stem in stems:
        Image.fromarray(ramp).save(root / "target_depth" / f"{stem}.png")


def test_without_a_target_depth_folder_items_have_no_target_depth(pair_folder):
    item = kh.KontextPairs(pair_folder, resolution=32)[0]
    assert "target_depth" not in item, f"no target_depth/ folder, no key: {sorted(item)}"


def test_target_depth_is_read_resized_and_normalised_like_depth(pair_folder):
    _add_target_depths(pair_folder, size=(64, 64))  # another size, the same frame: resized like depth
    ds = kh.KontextPairs(pair_folder, resolution=32)
    item = ds[1]
    td = item["target_depth"]
    assert td.shape == (1, 32, 32) and td.dtype == torch.float32, f"[1, H, W] float32, got {tuple(td.shape)}"
    assert float(td.min()) >= 0.0 and float(td.max()) <= 1.0, "target depth in [0, 1]"
    row = td[0, 5]
    assert float(row[0]) < 0.05 and float(row[-1]) > 0.95 and bool((row.diff() > 0).all()), (
        f"the ramp survives (far left, near right): {row[:3].tolist()} ... {row[-3:].tolist()}")
    assert ds.files(1)["target_depth"].name == "b.png", f"files() names the target depth: {ds.files(1)}"
    flipped = kh.KontextPairs(pair_folder, resolution=32, depth_invert=True)[1]["target_depth"]
    torch.testing.assert_close(flipped, 1 - td, atol=1e-5, rtol=0, msg="depth_invert flips the target depth too")


def test_target_depth_folder_is_checked_like_depth(pair_folder):
    _add_target_depths(pair_folder, stems=("a", "b"))
    Image.fromarray(np.zeros((16, 32), np.uint16)).save(pair_folder / "target_depth" / "b.png")  # another frame
    Image.fromarray(np.full((32, 32), np.nan, np.float32)).save(pair_folder / "target_depth" / "a.tif")
    (pair_folder / "target_depth" / "a.png").unlink()
    text = open_error(pair_folder, resolution=32)
    for expected in ("target_depth/c.* does not exist", "target_depth/b.png is 32x16",
                     "target_depth/a.tif contains NaN"):
        assert expected in text, f"missing {expected!r} in the one error: {text}"


def test_write_pair_folder_writes_target_depths_and_overwrite_drops_old_ones(tmp_path):
    args = ([torch.zeros(3, 16, 16)], [torch.ones(3, 16, 16)], [torch.ones(1, 16, 16)], [torch.zeros(1, 16, 16)],
            ["brighten it"])
    ramp = torch.linspace(0, 1, 16).expand(1, 16, 16)  # [1, H, W], near on the right
    ds = kh.write_pair_folder(tmp_path, *args, target_depths=[ramp], resolution=16, depth_normalize="none")
    torch.testing.assert_close(ds[0]["target_depth"], ramp, atol=0.5 / 65535 + 1e-6, rtol=0,
                               msg="target depth round trip keeps 16-bit precision")
    with Image.open(tmp_path / "target_depth" / "0000.png") as img:
        assert img.mode.startswith("I;16"), f"target depth is written as a 16-bit PNG, got mode {img.mode}"
    again = kh.write_pair_folder(tmp_path, *args, resolution=16, overwrite=True)
    assert "target_depth" not in again[0] and not (tmp_path / "target_depth").exists(), (
        "overwrite without target depths removes the old target_depth/ folder")
    with pytest.raises(ValueError, match="target_depths=2"):
        kh.write_pair_folder(tmp_path / "n", *args, target_depths=[ramp, ramp])
    with pytest.raises(ValueError, match=r"target_depths\[0\] has values"):
        kh.write_pair_folder(tmp_path / "m", *args, target_depths=[ramp * 2])


def test_committed_data_samples_carry_their_target_depths(sample_data):
    ds = kh.KontextPairs(sample_data, depth_normalize="none")  # native 512 px, no resampling
    for i in (0, 1):
        item = ds[i]
        assert item["target_depth"].shape == (1, 512, 512), f"{item['name']}: target_depth is read"
    same = ds[0]  # a recolour: the geometry, so the depth, stays
    torch.testing.assert_close(same["target_depth"], same["depth"], msg="a recolour keeps the depth")
    removed = ds[1]  # a remove: the depth changes inside the mask only
    differs = (removed["target_depth"] - removed["depth"]).abs() > 1e-3  # [1, H, W]
    assert differs.any() and not (differs & (removed["mask"] < 0.5)).any(), "the depth changes inside the mask"


def test_from_hf_dataset_reads_a_target_depth_column(sample_data, tmp_path):
    ds, stems = _hf_pairs(sample_data, count=2)
    import datasets

    paths = [str(sample_data / "target_depth" / f"{s}.png") for s in stems]
    ds = ds.add_column("goal_depth", paths).cast_column("goal_depth", datasets.Image())  # paths -> PIL images
    pairs = kh.KontextPairs.from_hf_dataset(ds, tmp_path / "td", **_HF_COLUMNS, target_depth="goal_depth",
                                            name="id", resolution=64, progress=False)
    folder = kh.KontextPairs(sample_data, resolution=64)
    torch.testing.assert_close(pairs[1]["target_depth"], folder[1]["target_depth"], atol=2e-5, rtol=0,
                               msg="the target depth column lands in target_depth/")
    rows = [dict(ds[0], goal_depth=None), dict(ds[1])]
    with pytest.raises(ValueError, match=r"row 0, column 'goal_depth' \(target_depth\): empty"):
        kh.KontextPairs.from_hf_dataset(rows, tmp_path / "bad", **_HF_COLUMNS, target_depth="goal_depth",
                                        progress=False)
    with pytest.raises(ValueError, match=r"'depth_after' \(for target_depth\) is not in the dataset"):
        kh.KontextPairs.from_hf_dataset(ds, tmp_path / "gone", **_HF_COLUMNS, target_depth="depth_after")


def test_write_pair_folder_lists_every_pair_of_another_frame_before_writing(tmp_path):
    ctx = torch.rand(3, 48, 64)  # 4:3
    good = dict(contexts=[ctx, ctx], targets=[ctx, torch.rand(3, 96, 128)],  # the same frame at twice the size: fine
                masks=[torch.ones(1, 48, 64), torch.ones(1, 36, 64)],  # 16:9
                depths=[torch.rand(48, 48), torch.rand(24, 32)], prompts=["a", "b"])  # 1:1, then 4:3 at half size
    root = tmp_path / "pairs"
    with pytest.raises(ValueError) as err:
        kh.write_pair_folder(root, **good)
    text = str(err.value)
    assert "2 problem(s), nothing was written" in text, f"both bad images in one error: {text}"
    assert "depths[0] is 48x48 but contexts[0] is 64x48" in text, f"the square depth of pair 0 is named: {text}"
    assert "masks[1] is 64x36 but contexts[1] is 64x48" in text, f"the 16:9 mask of pair 1 is named: {text}"
    assert "targets[1]" not in text, f"a target of the same frame at another size is fine: {text}"
    assert not root.exists(), "nothing is written when a pair is of another frame"
    with pytest.raises(ValueError, match=r"masks\[0\]: expected an image"):
        kh.write_pair_folder(root, [ctx], [ctx], ["not an image"], [torch.rand(48, 64)], ["a"])
