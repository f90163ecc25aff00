"""Checks on the committed editing dataset in ``data_samples/`` and on the script that renders it.

* The renderer reproduces the committed files exactly (bytes, and decoded pixels).
* Every mask covers every pixel that differs between its context and target image.
* Depth maps are 16-bit with far more than 256 levels; masks are binary, non-empty, not full.
* ``prompts.txt`` has one non-empty line per pair.
* Each target depth equals its context depth outside the mask, and differs inside it exactly for the pairs
  that change geometry (add, remove, shape).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

DATA_DIR = Path(__file__).resolve().parent.parent / "data_samples"
IMAGE_DIRS = ("context", "target", "masks", "depth", "target_depth")


def _load_make_samples() -> ModuleType:
    """Import ``data_samples/make_samples.py`` (the folder is not a package)."""
    name = "make_samples"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, DATA_DIR / "make_samples.py")
    assert spec is not None and spec.loader is not None, "cannot load data_samples/make_samples.py"
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


make_samples = _load_make_samples()
STEMS = sorted(p.stem for p in (DATA_DIR / "context").glob("*.png"))


def _dataset_files(root: Path) -> list[str]:
    """Relative paths of every file the renderer writes, found under ``root``."""
    files = [f"{sub}/{p.name}" for sub in IMAGE_DIRS for p in sorted((root / sub).glob("*.png"))]
    return [*files, make_samples.PROMPTS_NAME, make_samples.README_NAME]


def _load(sub: str, stem: str) -> np.ndarray:
    """Decoded pixels of ``data_samples/<sub>/<stem>.png``."""
    with Image.open(DATA_DIR / sub / f"{stem}.png") as img:
        return np.array(img)


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole dataset rendered afresh into a temporary folder."""
    out = tmp_path_factory.mktemp("data_samples")
    make_samples.write_dataset(out)
    return out


def test_committed_pairs_match_scene_list() -> None:
    expected = [make_samples.stem(i, spec) for i, spec in enumerate(make_samples.SCENES)]
    assert len(expected) >= 8, f"the dataset should have at least 8 pairs, has {len(expected)}"
    assert STEMS == expected, f"committed stems {STEMS} differ from the scene list {expected}"
    for sub in IMAGE_DIRS:
        stems = sorted(p.stem for p in (DATA_DIR / sub).glob("*.png"))
        assert stems == expected, f"data_samples/{sub}/ holds {stems}, expected {expected}"


def test_regenerated_file_list_matches(regenerated: Path) -> None:
    assert _dataset_files(regenerated) == _dataset_files(DATA_DIR), (
        "the renderer writes a different set of files than data_samples/ holds"
    )


def test_regenerated_pixels_match_committed(regenerated: Path) -> None:
    for rel in _dataset_files(DATA_DIR):
        if not rel.endswith(".png"):
            continue
        with Image.open(DATA_DIR / rel) as old, Image.open(regenerated / rel) as new:
            assert old.mode == new.mode, f"{rel}: mode {new.mode} after regeneration, committed {old.mode}"
            assert np.array_equal(np.array(old), np.array(new)), f"{rel}: regenerated pixels differ"


def test_regenerated_files_are_byte_identical(regenerated: Path) -> None:
    for rel in _dataset_files(DATA_DIR):
        assert (regenerated / rel).read_bytes() == (DATA_DIR / rel).read_bytes(), (
            f"{rel}: regenerated file is not byte-identical to the committed one "
            "(rerun `python data_samples/make_samples.py` after changing the renderer)"
        )


@pytest.mark.parametrize("stem", STEMS)
def test_mask_covers_every_changed_pixel(stem: str) -> None:
    context, target, mask = _load("context", stem), _load("target", stem), _load("masks", stem)
    changed = (context != target).any(axis=-1)
    outside = changed & (mask == 0)
    assert changed.any(), f"{stem}: context and target are identical, the edit is missing"
    assert not outside.any(), f"{stem}: {int(outside.sum())} changed pixels lie outside the mask"


@pytest.mark.parametrize("stem", STEMS)
def test_images_have_expected_size_and_mode(stem: str) -> None:
    size = (make_samples.IMAGE_SIZE, make_samples.IMAGE_SIZE)
    for sub, mode in (("context", "RGB"), ("target", "RGB"), ("masks", "L")):
        with Image.open(DATA_DIR / sub / f"{stem}.png") as img:
            assert img.size == size, f"{sub}/{stem}.png is {img.size}, expected {size}"
            assert img.mode == mode, f"{sub}/{stem}.png has mode {img.mode}, expected {mode}"


@pytest.mark.parametrize("stem", STEMS)
def test_mask_is_binary_non_empty_and_not_full(stem: str) -> None:
    mask = _load("masks", stem)
    values = set(np.unique(mask).tolist())
    assert values <= {0, 255}, f"{stem}: mask holds values {sorted(values)}, expected only 0 and 255"
    assert (mask == 255).any(), f"{stem}: mask is empty"
    assert (mask == 0).any(), f"{stem}: mask covers the whole image"


@pytest.mark.parametrize("sub", ["depth", "target_depth"])
@pytest.mark.parametrize("stem", STEMS)
def test_depth_is_16_bit_with_many_levels(stem: str, sub: str) -> None:
    path = DATA_DIR / sub / f"{stem}.png"
    header = path.read_bytes()[:26]
    bit_depth, colour_type = header[24], header[25]
    assert bit_depth == 16, f"{stem}: depth PNG has bit depth {bit_depth}, expected 16"
    assert colour_type == 0, f"{stem}: depth PNG has colour type {colour_type}, expected 0 (greyscale)"
    with Image.open(path) as img:
        size = (make_samples.IMAGE_SIZE, make_samples.IMAGE_SIZE)
        assert img.size == size, f"{stem}: depth is {img.size}, expected {size}"
        depth = np.array(img).astype(np.int64)
    levels = np.unique(depth).size
    assert levels > 256, f"{stem}: depth has only {levels} distinct levels"
    assert depth.min() >= 0 and depth.max() <= 65535, f"{stem}: depth values leave the 16-bit range"


@pytest.mark.parametrize("stem", STEMS)
def test_depth_is_brighter_near_the_camera(stem: str) -> None:
    depth = _load("depth", stem).astype(np.int64)
    assert depth[0].max() == 0, f"{stem}: the top row (sky) should be at the far plane, value 0"
    assert depth[-1].min() > depth[depth.shape[0] // 2].min(), (
        f"{stem}: the bottom row (nearest floor) should be brighter than the middle row"
    )


def test_prompts_have_one_line_per_pair() -> None:
    text = (DATA_DIR / make_samples.PROMPTS_NAME).read_text(encoding="utf-8")
    lines = text.splitlines()
    assert text.endswith("\n"), "prompts.txt should end with a newline"
    assert len(lines) == len(STEMS), f"prompts.txt has {len(lines)} lines for {len(STEMS)} pairs"
    empty = [i for i, line in enumerate(lines) if not line.strip()]
    assert not empty, f"prompts.txt has empty lines at {empty}"
    expected = [spec.prompt for spec in make_samples.SCENES]
    assert lines == expected, "prompts.txt is not in the order of the sorted stems"


def test_depth_round_trip_decodes_camera_depth() -> None:
    z = np.array([make_samples.DEPTH_NEAR, 6.0, 10.0, make_samples.DEPTH_FAR])
    v = make_samples.encode_depth(z)
    assert v[0] == 65535 and v[-1] == 0, f"NEAR should map to 65535 and FAR to 0, got {v.tolist()}"
    falling = np.all(np.diff(v.astype(np.int64)) < 0)
    assert falling, f"depth values should fall with distance, got {v.tolist()}"
    back = make_samples.decode_depth(v)
    assert np.allclose(back, z, rtol=1e-3), f"decode_depth(encode_depth(z)) = {back.tolist()}, expected {z}"


@pytest.mark.parametrize("index", range(len(make_samples.SCENES)))
def test_target_depth_differs_from_the_context_depth_only_where_the_geometry_changes(index: int) -> None:
    spec = make_samples.SCENES[index]
    name, kind = make_samples.stem(index, spec), make_samples.edit_kind(spec)
    depth, target_depth = _load("depth", name), _load("target_depth", name)
    mask = _load("masks", name) == 255
    differs = depth != target_depth
    outside = int((differs & ~mask).sum())
    assert not outside, f"{name}: the target depth changes {outside} px outside the mask"
    if kind in ("add", "remove", "shape"):
        assert differs.sum() > 0.01 * differs.size, f"{name} ({kind}): the target depth must show the new geometry"
    else:
        assert not differs.any(), f"{name} ({kind}): a {kind} edit keeps the geometry, so both depths are equal"
    encoded = make_samples.render_depth(spec.target, spec)
    assert np.array_equal(encoded, target_depth), f"{name}: target_depth/ holds the target scene's depth"
