"""Notebook 01: writing a dataset folder from your own pairs or a Hugging Face table, checked before a file is written.

:func:`kontext_helpers.data.write_pair_folder` and ``KontextPairs.from_hf_dataset`` use these steps: check every
list or row first (one error listing each bad cell), then write 8-bit RGB, 0/255 masks and 16-bit depth PNGs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .images import (
    image_to_rgb_tensor,
    mask_to_pil,
    mask_to_tensor,
    pil_to_gray_array,
    pil_upright,
    rgb_tensor_to_pil,
    values_to_hw_array,
)

PAIR_FOLDERS = ("context", "target", "masks", "depth")
OPTIONAL_FOLDERS = ("target_depth",)  # read when present; then every stem needs an image there too


IMAGE_PARTS = {"contexts": "context", "targets": "target", "masks": "mask", "depths": "depth",
                "target_depths": "target_depth"}  # list -> part


def _cell_problem(part: str, value) -> str | None:
    """What is wrong with one part of one pair (``None``: nothing): an image, a one-line prompt or a file stem."""
    if value is None:
        return "empty"
    if part == "prompt":
        ok = isinstance(value, str) and value.strip() and "\n" not in value and "\r" not in value
        return None if ok else f"expected a non-empty one-line string, got {value!r}"[:120]
    if part == "name":
        ok = isinstance(value, str) and value and not value.startswith(".") and Path(value).name == value
        return None if ok else f"{value!r} is not a usable file stem (no '/', not empty or hidden)"
    if isinstance(value, Image.Image | torch.Tensor | np.ndarray):
        return None
    return f"expected an image (PIL, tensor or array), got {type(value).__name__}"


def _same_frame(ref_size: tuple[int, int], size: tuple[int, int]) -> bool:
    """Same aspect ratio, up to 2 % or the rounding of a resize."""
    (rw, rh), (w, h) = ref_size, size
    return abs(w * rh - h * rw) <= max(0.02 * h * rw, w + h + rw + rh)


def _cell_size(part: str, value) -> tuple[int, int]:
    """``(W, H)`` of one image cell as :func:`write_pair` reads it (a PIL image upright by its EXIF orientation)."""
    if isinstance(value, Image.Image):
        return pil_upright(value).size
    if part in ("context", "target"):
        shape = image_to_rgb_tensor(value, part).shape  # [3, H, W]
    elif part == "mask":
        shape = mask_to_tensor(value, part).shape  # [1, 1, H, W]
    else:
        shape = values_to_hw_array(value, part).shape  # [H, W]
    return shape[-1], shape[-2]


def _repeated(names: list[str]) -> list[str]:
    """The names that occur more than once, sorted."""
    seen: set[str] = set()
    return sorted({n for n in names if n in seen or seen.add(n)})


def pair_lists(contexts, targets, masks, depths, prompts, names, target_depths) -> tuple[dict[str, list], list]:
    """The lists of :func:`write_pair_folder`, checked: one item per pair, usable names, one-line prompts."""
    lists = {"contexts": contexts, "targets": targets, "masks": masks, "depths": depths, "prompts": prompts,
             "names": names, "target_depths": target_depths}
    lists = {key: list(value) for key, value in lists.items() if value is not None}
    lengths = {key: len(value) for key, value in lists.items()}
    if len(set(lengths.values())) != 1:
        listed = ", ".join(f"{key}={n}" for key, n in lengths.items())
        raise ValueError(f"write_pair_folder needs one item per pair in every list; got {listed}")
    count = lengths["contexts"]
    if count == 0:
        raise ValueError("write_pair_folder got no pairs (all lists are empty)")
    width = max(4, len(str(count - 1)))
    names = lists.get("names") or [f"{i:0{width}d}" for i in range(count)]
    for i, name in enumerate(names):
        if _cell_problem("name", name):
            raise ValueError(f"names[{i}]={name!r} is not a usable file stem (no '/', not empty or hidden)")
    if len(set(names)) != count:
        raise ValueError(f"names must be unique, got duplicates: {_repeated(names)}")
    for i, prompt in enumerate(lists["prompts"]):
        if _cell_problem("prompt", prompt):
            raise ValueError(f"prompts[{i}]={prompt!r}: every prompt must be a non-empty single-line string")
    problems = [problem for i in range(count) for problem in _frame_problems(i, lists)]
    if problems:
        raise ValueError(f"write_pair_folder found {len(problems)} problem(s), nothing was written:\n  - "
                         + "\n  - ".join(problems))
    return lists, names


def _frame_problems(i: int, lists: dict[str, list]) -> list[str]:
    """Pair ``i`` of :func:`write_pair_folder`'s lists: every image readable and of the context's frame (its aspect
    ratio, as the folder reader checks; a target, mask or depth of another size but the same frame is fine)."""
    sizes, problems = {}, []
    for key in [k for k in IMAGE_PARTS if k in lists]:
        try:
            if (why := _cell_problem(IMAGE_PARTS[key], lists[key][i])) is not None:
                raise TypeError(why)
            sizes[key] = _cell_size(IMAGE_PARTS[key], lists[key][i])
        except (TypeError, ValueError) as err:
            problems.append(f"{key}[{i}]: {err}")
    ctx = sizes.get("contexts")
    for key, size in sizes.items():
        if ctx is not None and not _same_frame(ctx, size):
            problems.append(f"{key}[{i}] is {size[0]}x{size[1]} but contexts[{i}] is {ctx[0]}x{ctx[1]} (W x H): "
                            "another aspect ratio; crop them to the same frame")
    return problems


def prepare_pair_folder(root: Path, overwrite: bool, with_target_depth: bool = False) -> None:
    """Create the four folders (and ``target_depth/``); a non-empty ``root`` is refused unless ``overwrite``
    (then they and any old ``target_depth/`` are removed first)."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file, not a folder")
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            present = ", ".join(sorted(p.name for p in root.iterdir())[:8])
            raise FileExistsError(f"{root} is not empty ({present}); pass overwrite=True to replace its "
                                  "context/ target/ masks/ depth/ and prompts.txt, or choose a new folder")
        for folder in PAIR_FOLDERS + OPTIONAL_FOLDERS:
            if (root / folder).is_dir():
                shutil.rmtree(root / folder)
        (root / "prompts.txt").unlink(missing_ok=True)
    for folder in PAIR_FOLDERS + (OPTIONAL_FOLDERS if with_target_depth else ()):
        (root / folder).mkdir(parents=True, exist_ok=True)


def _depth_levels_16bit(depth, what: str) -> np.ndarray:
    """A depth map in ``[0, 1]`` (PIL of any bit depth, tensor or array) -> uint16 ``[H, W]`` levels."""
    if isinstance(depth, Image.Image):
        values, type_max = pil_to_gray_array(depth)
        unit = values / type_max if type_max else values
    else:
        unit = values_to_hw_array(depth, what)
    if not np.isfinite(unit).all() or unit.min() < -1e-6 or unit.max() > 1.0 + 1e-6:
        raise ValueError(f"{what} has values in [{unit.min():.4g}, {unit.max():.4g}]; expected "
                         "[0, 1] with near = 1 (normalise first: (d - d.min()) / (d.max() - d.min()))")
    return np.round(np.clip(unit, 0.0, 1.0) * 65535.0).astype(np.uint16)


def write_pair(root: Path, name: str, pair: dict, where: str) -> None:
    """Write one pair (``contexts``, ``targets``, ``masks``, ``depths`` of it) as ``<folder>/<name>.png``;
    ``where`` says which pair in an error (``"[3]"``, ``" (row 3)"``)."""
    for folder, key in (("context", "contexts"), ("target", "targets")):
        rgb = image_to_rgb_tensor(pair[key], f"{key}{where}")
        lo, hi = float(rgb.min()), float(rgb.max())
        if lo < -1e-3 or hi > 1.0 + 1e-3:
            raise ValueError(f"{key}{where} has values in [{lo:.3g}, {hi:.3g}]; expected [0, 1] "
                             "(for [-1, 1] images use (x + 1) / 2)")
        rgb_tensor_to_pil(rgb).save(root / folder / f"{name}.png")
    mask_to_pil(pair["masks"], f"masks{where}").save(root / "masks" / f"{name}.png")
    for folder, key in (("depth", "depths"), ("target_depth", "target_depths")):
        if pair.get(key) is not None:
            levels = _depth_levels_16bit(pair[key], f"{key}{where}")
            Image.fromarray(levels).save(root / folder / f"{name}.png")  # uint16 [H, W] -> 16-bit grey PNG


def write_prompts(root: Path, names: list[str], prompts: list[str]) -> None:
    """``prompts.txt``: one line per pair, in the sorted-name order :class:`KontextPairs` reads."""
    by_name = dict(zip(names, prompts))
    (root / "prompts.txt").write_text("".join(by_name[name].strip() + "\n" for name in sorted(names)), encoding="utf-8")


def check_hf_columns(ds, columns: dict[str, str]) -> None:
    """Every named column is in the table (``ds.column_names``, or the first row's keys), else one error."""
    if not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
        raise TypeError(f"from_hf_dataset needs a table with a length and rows by index, got {type(ds).__name__}; "
                        "for a streamed dataset take the rows you want first: list(ds.take(1000))")
    available = list(getattr(ds, "column_names", None) or (ds[0].keys() if len(ds) else []))
    problems = [f"column {col!r} (for {part}) is not in the dataset" for part, col in columns.items()
                if col not in available]
    problems += ["the dataset has no rows"] if not len(ds) else []
    if problems:
        raise ValueError("from_hf_dataset: " + "; ".join(problems) + f". The dataset has the columns {available}; "
                         "name yours with context=, target=, mask=, depth=, prompt= (and name=, target_depth=); "
                         "no masks: mask=None")


def _row_problems(i: int, row: dict, columns: dict[str, str]) -> list[str]:
    """Every bad cell of row ``i``: empty or mistyped cells; then the sizes: the target exactly the context's, the
    mask and the depth maps of the context's frame (its aspect ratio, as the folder reader checks)."""
    problems = [f"row {i}, column {col!r} ({part}): {why}" for part, col in columns.items()
                if (why := _cell_problem(part, row[col]))]
    if problems:
        return problems
    sizes = {}
    for part in [p for p in IMAGE_PARTS.values() if p in columns]:
        try:
            sizes[part] = _cell_size(part, row[columns[part]])
        except (TypeError, ValueError) as err:
            problems.append(f"row {i}, column {columns[part]!r} ({part}): {err}")
    ctx = sizes.get("context")
    if ctx is None:
        return problems
    if sizes.get("target", ctx) != ctx:
        w, h = sizes["target"]
        derived = "" if "mask" in columns else "mask=None derives the mask from their difference; "
        problems.append(f"row {i}, column {columns['target']!r} (target): {w}x{h} but the context is "
                        f"{ctx[0]}x{ctx[1]} (W x H); {derived}an edit pair is one frame: give the target the "
                        "context's size")
    for part in ("mask", "depth", "target_depth"):
        if part in sizes and not _same_frame(ctx, sizes[part]):
            w, h = sizes[part]
            problems.append(f"row {i}, column {columns[part]!r} ({part}): {w}x{h} has another aspect ratio than "
                            f"the context's {ctx[0]}x{ctx[1]} (W x H); it must cover the context's frame")
    return problems


def checked_hf_rows(ds, columns: dict[str, str], progress: bool) -> tuple[list[str], list[str]]:
    """Read every row once: the file stems and prompts, or one ``ValueError`` listing every bad cell."""
    from tqdm.auto import tqdm

    problems, names, prompts = [], [], []
    width = max(4, len(str(len(ds) - 1)))
    for i in tqdm(range(len(ds)), desc="checking rows", disable=not progress, mininterval=0.5):
        row = ds[i]
        problems += _row_problems(i, row, columns)
        names.append(row[columns["name"]] if "name" in columns else f"{i:0{width}d}")
        prompts.append(row[columns["prompt"]])
    if len(set(names)) != len(names):
        problems.append(f"column {columns['name']!r} (name): names must be unique, got duplicates {_repeated(names)}")
    if problems:
        raise ValueError(f"from_hf_dataset found {len(problems)} problem(s), nothing was written:\n  - "
                         + "\n  - ".join(problems))
    return names, prompts
