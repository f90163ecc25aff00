"""Notebook 01: the dataset folder, read and checked.

A training set is one folder, one pair per file stem (see ``docs/design.md``, "The data contract")::

    DATA_ROOT/context/<stem>.<ext>  source image        DATA_ROOT/target/<stem>.<ext>  edited image
    DATA_ROOT/masks/<stem>.<ext>    white = editable    DATA_ROOT/depth/<stem>.<ext>   near = bright
    DATA_ROOT/prompts.txt           one prompt per line, in the order of the sorted stems
    DATA_ROOT/target_depth/<stem>.<ext>   optional: the target's depth (the geometry the edit should produce)

:class:`KontextPairs` checks the whole folder when it is opened and raises one ``ValueError`` that lists every
problem with its file. The helpers below make such a folder from your own images. Every conversion of a
pixel goes through :mod:`kontext_helpers.images`.
"""

from __future__ import annotations

import difflib
import numbers
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .buckets import bucket_crop_box, bucket_shapes, nearest_bucket
from .images import (
    open_image,
    pil_to_binary_mask,
    pil_to_depth_array,
    pil_to_gray_array,
    pil_to_mask_array,
    pil_to_rgb,
    pil_to_rgb_tensor,
)
from .labels import mask_from_difference
from .pair_files import (
    IMAGE_PARTS,
    OPTIONAL_FOLDERS,
    PAIR_FOLDERS,
    _same_frame,
    check_hf_columns,
    checked_hf_rows,
    pair_lists,
    prepare_pair_folder,
    write_pair,
    write_prompts,
)

RESIZE_POLICIES = ("bucket", "square", "crop")  # how a pair becomes a training image (KontextPairs' resize)


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff")


_IGNORED_FILES = ("Thumbs.db", "desktop.ini")  # OS clutter; hidden files (".DS_Store", ...) are skipped too


_DATA_FIX_HINTS = {
    "argument": "use resolution = a positive multiple of 16 (e.g. 512, 1024), resize='bucket', 'square' or 'crop', "
    "depth_normalize='minmax' or 'none', 0 < mask_threshold <= 1.",
    "root": "pass the folder that holds context/, target/, masks/, depth/ and prompts.txt.",
    "missing folder": "create the folder with one image per pair, named by the pair's stem "
    "(context/cat.png -> target/cat.png, masks/cat.png, depth/cat.png).",
    "missing image": "give every stem one image in each of context/, target/, masks/, depth/ (and target_depth/ "
    "when it exists), or delete that stem from every folder (and its line from prompts.txt).",
    "stray file": "keep only images (.png .jpg .jpeg .webp .tif .tiff) directly in the four image "
    "folders; move other files next to prompts.txt.",
    "duplicate stem": "keep one image per stem in each folder (cat.png and cat.jpg are the same pair): "
    "delete or rename one of them.",
    "unreadable image": "re-export the file (open it and save it again, e.g. as PNG) or delete the pair "
    "from every folder and its prompt line.",
    "size mismatch": "the four images of a pair must show the same frame: a different size is fine "
    "(it is resized), a different aspect ratio means they do not line up; crop them identically.",
    "bad mask": "save masks as 8-bit images with white (255) = editable and black (0) = preserve.",
    "bad depth": "replace NaN / inf in the depth map (e.g. by the far value) and save it again.",
    "prompts": "write prompts.txt as UTF-8 text, one non-empty line per pair, in the order of the sorted "
    "stems (trailing empty lines are fine).",
    "empty dataset": "put at least one pair (context, target, mask, depth and a prompt line) in the folders.",
}


def crop_box(size: tuple[int, int], resize: str, bucket: tuple[int, int]) -> tuple[float, float, float, float]:
    """The region ``(left, top, right, bottom)`` of an image of ``size = (W, H)`` that ``resize`` (one of
    :data:`RESIZE_POLICIES`) turns into the training image of ``bucket = (W_b, H_b)``."""
    w, h = size
    if resize == "square":
        return (0, 0, w, h)
    if resize == "bucket":
        return bucket_crop_box(size, bucket)
    side = min(w, h)  # aspect-preserving: short side -> resolution, then the centre square
    left, top = (w - side) // 2, (h - side) // 2
    return (left, top, left + side, top + side)


def _scale_box(box, ref_size: tuple[int, int], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """``box`` given in pixels of an image of ``ref_size``, expressed in pixels of one of ``size``."""
    sx, sy = size[0] / ref_size[0], size[1] / ref_size[1]
    return (box[0] * sx, box[1] * sy, min(box[2] * sx, size[0]), min(box[3] * sy, size[1]))


def _check_image_file(folder: str, path, mask_threshold: float):
    """Decode and convert one file as ``__getitem__`` will. Returns ``(size or None, [(kind, text)])``."""
    rel = f"{folder}/{path.name}"
    try:
        img = open_image(path)
        problems = []
        if folder in ("context", "target"):
            pil_to_rgb(img)
        elif folder == "masks":
            top = float(pil_to_mask_array(img).max())
            if 0.0 < top <= 1.5 / 255.0:
                problems.append(("bad mask", f"{rel} only holds the values 0 and 1 (of 255): it was saved as "
                                 "0/1, so at the threshold every pixel would be 'preserve'"))
        else:
            values, _ = pil_to_gray_array(img)
            if not np.isfinite(values).all():
                problems.append(("bad depth", f"{rel} contains NaN or inf values"))
        return img.size, problems
    except Exception as err:  # every decoder / conversion failure becomes one listed problem
        return None, [("unreadable image", f"{rel} cannot be read: {type(err).__name__}: {err}")]


def _argument_problems(resolution, resize, mask_threshold, depth_normalize) -> list[tuple[str, str]]:
    """Problems with the arguments of :class:`KontextPairs`, before any file is read."""
    problems = []
    is_int = isinstance(resolution, numbers.Integral) and not isinstance(resolution, bool)
    if not is_int or resolution <= 0 or resolution % 16:
        near = " (it must be an int, e.g. 512)" if not is_int else ""
        if is_int and resolution > 16:
            near = f" (nearest: {resolution // 16 * 16} or {resolution // 16 * 16 + 16})"
        problems.append(("argument", f"resolution={resolution!r} is not a positive multiple of 16{near}: Flux "
                         "turns 16x16 pixels into one token (8x VAE downsampling, then 2x2 packing)"))
    if resize not in RESIZE_POLICIES:
        problems.append(("argument", f"resize={resize!r}: use 'bucket' (each pair at its own aspect ratio), 'square' "
                         "(plain resize, may stretch) or 'crop' (keep the aspect ratio, centre square)"))
    if depth_normalize not in ("minmax", "none"):
        problems.append(("argument", f"depth_normalize={depth_normalize!r}: use 'minmax' or 'none'"))
    if not isinstance(mask_threshold, numbers.Real) or not 0.0 < mask_threshold <= 1.0:
        problems.append(("argument", f"mask_threshold={mask_threshold!r} must be a number in (0, 1]"))
    return problems


def _folder_images(root: Path, folder: str, problems: list) -> dict[str, Path]:
    """``{stem: path}`` of the images directly in ``root/folder``; stray files and duplicates go to ``problems``."""
    found: dict[str, Path] = {}
    for entry in sorted((root / folder).iterdir(), key=lambda p: p.name):
        name, rel = entry.name, f"{folder}/{entry.name}"
        if name.startswith(".") or name in _IGNORED_FILES:
            continue
        if entry.is_dir():
            problems.append(("stray file", f"{rel}/ is a folder; images in sub-folders are not read"))
        elif entry.suffix.lower() not in _IMAGE_SUFFIXES:
            problems.append(("stray file", f"{rel} is not an image file (allowed: {' '.join(_IMAGE_SUFFIXES)})"))
        elif entry.stem in found:
            problems.append(("duplicate stem", f"{folder}/{found[entry.stem].name} and {rel} have the same stem "
                             f"{entry.stem!r}: one image per stem and folder"))
        else:
            found[entry.stem] = entry
    return found


def _pair_files(root: Path, problems: list) -> dict[str, dict[str, Path]]:
    """``{folder: {stem: path}}`` for each of the four folders that exists; what is missing goes to ``problems``."""
    if not root.is_dir():
        problems.append(("root", f"{root} {'is a file, not a folder' if root.exists() else 'does not exist'}"))
        return {}
    try:
        root_dirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as err:
        problems.append(("root", f"{root} cannot be listed: {err}"))
        return {}
    files = {}
    for folder in PAIR_FOLDERS:
        if (root / folder).is_dir():
            files[folder] = _folder_images(root, folder, problems)
            continue
        others = [d for d in root_dirs if d not in PAIR_FOLDERS + OPTIONAL_FOLDERS]
        close = difflib.get_close_matches(folder, others, n=1)
        hint = f" (there is a folder {close[0]}/: rename it to {folder}/)" if close else ""
        problems.append(("missing folder", f"{folder}/ is missing: expected {root / folder}{hint}"))
    nested = [] if files else [d for d in root_dirs if all((root / d / f).is_dir() for f in PAIR_FOLDERS)]
    if nested:
        problems.append(("root", f"none of context/, target/, masks/, depth/ is in {root}, but they are in "
                         f"{root / nested[0]}: did you mean that folder?"))
    files.update({f: _folder_images(root, f, problems) for f in OPTIONAL_FOLDERS if (root / f).is_dir()})
    return files


def _missing_image_problems(files: dict, stems: list[str]) -> list[tuple[str, str]]:
    """One problem per stem and folder without an image of that stem."""
    problems = []
    for stem in stems:
        have = ", ".join(f"{folder}/{found[stem].name}" for folder, found in files.items() if stem in found)
        for folder, found in files.items():
            if stem not in found:
                problems.append(("missing image", f"{folder}/{stem}.* does not exist: stem {stem!r} has {have} "
                                 f"but no image in {folder}/"))
    return problems


def _image_problems(files: dict, stems: list[str], complete: list[str], mask_threshold: float) -> tuple[list, dict]:
    """Decode every image (in threads: PIL decodes without the GIL): ``(problems, {(folder, stem): (W, H)})``,
    the problems being unreadable files and frame mismatches."""
    jobs = [(folder, stem, found[stem]) for stem in stems for folder, found in files.items() if stem in found]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        checked = list(pool.map(lambda job: _check_image_file(job[0], job[2], mask_threshold), jobs))
    problems, sizes = [], {}
    for (folder, stem, _), (size, file_problems) in zip(jobs, checked):
        problems.extend(file_problems)
        sizes[folder, stem] = size
    for stem in complete:
        ref = sizes.get(("context", stem))
        for folder in [f for f in files if f != "context"]:
            size = sizes.get((folder, stem))
            if ref and size and not _same_frame(ref, size):
                problems.append(("size mismatch", f"{folder}/{files[folder][stem].name} is {size[0]}x{size[1]} but "
                                 f"context/{files['context'][stem].name} is {ref[0]}x{ref[1]} (another aspect ratio)"))
    return problems, sizes


def _read_prompts(root: Path, prompts_file: str, problems: list) -> list[str] | None:
    """The prompt lines (trailing empty lines dropped), or ``None`` when the file is missing or unreadable."""
    path = root / prompts_file
    if not path.is_file():
        others = ", ".join(sorted(p.name for p in root.glob("*.txt"))) if root.is_dir() else ""
        found_txt = f" (found {others}: rename the prompt file to {prompts_file})" if others else ""
        problems.append(("prompts", f"{prompts_file} is missing: expected {path}{found_txt}"))
        return None
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a UTF-8 byte-order mark is dropped
    except UnicodeDecodeError as err:
        problems.append(("prompts", f"{prompts_file} is not UTF-8 text ({err.reason} at byte {err.start})"))
        return None
    except OSError as err:
        problems.append(("prompts", f"{prompts_file} cannot be read: {err}"))
        return None
    lines = [line.strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()  # trailing newlines / empty lines at the end
    for number, line in enumerate(lines, start=1):
        if not line:
            problems.append(("prompts", f"{prompts_file} line {number} is empty: every pair needs a prompt (only "
                             "empty lines at the very end are ignored)"))
    return lines


def _prompt_count_problems(prompts_file: str, prompts, stems: list[str], complete: list[str]) -> list:
    """A prompt count that matches neither the complete pairs nor all stems."""
    if prompts is None or not stems or len(prompts) in (len(complete), len(stems)):
        return []
    order = ", ".join(complete[:8]) + (", ..." if len(complete) > 8 else "")
    extra = f" ({len(stems)} stems counting incomplete pairs)" if len(stems) != len(complete) else ""
    return [("prompts", f"{prompts_file} has {len(prompts)} prompt lines but there are {len(complete)} "
             f"pairs{extra}; line i is the prompt of the i-th sorted stem: {order}")]


def _scan_pair_folder(root: Path, resolution, resize, mask_threshold, depth_normalize, prompts_file):
    """Validate a dataset folder in named steps. Returns ``(pairs, problems)``: ``pairs`` is a list of
    ``(stem, {folder: path}, prompt, (W, H) of the context)`` in sorted stem order, ``problems`` a list of
    ``(kind, text)``."""
    problems = _argument_problems(resolution, resize, mask_threshold, depth_normalize)
    files = _pair_files(root, problems)
    stems = sorted(set().union(*(found.keys() for found in files.values())))
    complete = [s for s in stems if all(s in found for found in files.values())]
    problems += _missing_image_problems(files, stems)
    image_problems, sizes = _image_problems(files, stems, complete, mask_threshold)
    problems += image_problems
    if files and not stems:
        problems.append(("empty dataset", f"no images found in {', '.join(f + '/' for f in files)} under {root}"))
    prompts = _read_prompts(root, prompts_file, problems) if root.is_dir() else None
    problems += _prompt_count_problems(prompts_file, prompts, stems, complete)
    if problems:
        return [], problems
    return [(stem, {f: found[stem] for f, found in files.items()}, p, sizes["context", stem])
            for stem, p in zip(complete, prompts)], []


def _format_data_problems(root, problems) -> str:
    """One message listing every problem (numbered, each naming its file) and one fix hint per kind."""
    lines = [f"KontextPairs cannot open {str(root)!r}: {len(problems)} problem(s), nothing was loaded. "
             "Paths are relative to that folder."]
    lines += [f"  {n}. [{kind}] {text}" for n, (kind, text) in enumerate(problems, start=1)]
    lines.append("How to fix:")
    for kind in dict.fromkeys(kind for kind, _ in problems):
        lines.append(f"  - {kind}: {_DATA_FIX_HINTS[kind]}")
    return "\n".join(lines)


class KontextPairs(torch.utils.data.Dataset):
    """Aligned editing pairs from a folder (the layout in this module's docstring), validated when opened.

    Pairs are matched by **file stem**, never by position (``.png .jpg .jpeg .webp .tif .tiff``, any case);
    hidden files and files next to ``prompts.txt`` are ignored. Opening decodes every image once and raises
    **one** ``ValueError`` listing every problem with its file and a fix hint per kind (bad arguments,
    missing folders or images, stray files, duplicate stems, unreadable images, other aspect ratios, masks
    saved as 0/1, NaN depth, prompt file problems, an empty dataset); ``__getitem__`` reads the files again.

    What is read, and how (conversions in :mod:`kontext_helpers.images`):
        * EXIF orientation is applied to all four images.
        * context / target: any mode -> RGB; transparent pixels on **white**; 16-bit grey / 65535.
        * mask: grey at full precision (transparent = black), binarised at ``value >= mask_threshold`` of
          full range, so JPEG noise, RGB, 1-bit and anti-aliased masks become exactly {0, 1} (1 = editable).
        * depth: any bit depth (8-bit, 16-bit ``I;16*``/``I``, float ``F``) without rounding to 8 bits;
          ``depth_normalize="minmax"`` maps each map to ``[0, 1]``, ``"none"`` divides by the full range.
          **Near = 1 (bright)**, as Depth Anything / MiDaS; pass ``depth_invert=True`` for far = bright.
        * sizes: a mask, target or depth of another size (same aspect ratio) is mapped onto the context's
          frame. ``resize="bucket"`` (the default) gives each pair the bucket nearest its aspect ratio
          (:func:`kontext_helpers.buckets.bucket_shapes`: Kontext's preferred resolutions at the pixel area
          ``resolution²``) and cuts only the sliver between the two aspect ratios, centred, so nothing is
          stretched; ``"square"`` (the original design's) resizes to ``resolution x resolution`` (may stretch);
          ``"crop"`` keeps the aspect ratio and takes the centre square. The same box serves all four images.
          Bicubic for images, nearest for masks, bilinear on float for depth.

    Args:
        root: the dataset folder.
        resolution: output side in pixels, a multiple of 16 (16 px = one Flux token); with buckets, the side
            of the square with the buckets' pixel area.
        resize: ``"bucket"``, ``"square"`` or ``"crop"`` (see above).
        mask_threshold: binarisation threshold in ``(0, 1]`` of the mask's full range.
        depth_normalize: ``"minmax"`` (per image) or ``"none"`` (divide by the type's maximum).
        depth_invert: ``True`` when the depth files store far = bright (metric depth).
        prompts_file: name of the prompt file inside ``root``.

    Items (``dataset[i]``), with ``(W, H) = dataset.bucket_of(i)`` (``H = W = resolution`` unless bucketed):
        ``context`` ``[3, H, W]`` float32 in ``[0, 1]``; ``target`` ``[3, H, W]`` float32 in ``[0, 1]``;
        ``mask`` ``[1, H, W]`` float32 in {0, 1}; ``depth`` ``[1, H, W]`` float32 in ``[0, 1]`` (near = 1);
        ``prompt`` str; ``name`` str (the file stem). A ``DataLoader`` stacks pairs of one bucket. With a
        ``target_depth/`` folder also ``target_depth`` ``[1, H, W]``: the target's depth, checked, read and
        resized like ``depth`` (each map normalised on its own), the geometry the edit should produce.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int = 512,
        *,
        resize: str = "bucket",
        mask_threshold: float = 0.5,
        depth_normalize: str = "minmax",
        depth_invert: bool = False,
        prompts_file: str = "prompts.txt",
    ):
        self.root = Path(root).expanduser()
        self.resolution = resolution
        self.resize = resize
        self.mask_threshold = mask_threshold
        self.depth_normalize = depth_normalize
        self.depth_invert = bool(depth_invert)
        pairs, problems = _scan_pair_folder(
            self.root, resolution, resize, mask_threshold, depth_normalize, prompts_file
        )
        if problems:
            raise ValueError(_format_data_problems(self.root, problems))
        self._names = [stem for stem, _, _, _ in pairs]
        self._files = [files for _, files, _, _ in pairs]
        self._prompts = [prompt for _, _, prompt, _ in pairs]
        shapes = bucket_shapes(resolution) if resize == "bucket" else [(resolution, resolution)]
        self._buckets = [nearest_bucket(size, shapes) for _, _, _, size in pairs]  # by each context's (W, H)

    @classmethod
    def from_hf_dataset(cls, ds, root: str | os.PathLike, *, context: str = "context", target: str = "target",
                        mask: str | None = "mask", depth: str = "depth", prompt: str = "prompt",
                        name: str | None = None, target_depth: str | None = None, overwrite: bool = False,
                        resolution: int = 512, progress: bool = True, **dataset_kwargs) -> KontextPairs:
        """A Hugging Face ``datasets.Dataset`` (or any sequence of row dicts) written as a dataset folder, opened.

        Each argument names the column that holds that part of a pair: images as PIL (a ``datasets.Image()``
        column), ``[C, H, W]`` tensors or arrays; the prompt a one-line string; ``name`` optional file stems
        (default ``0000``, ``0001``, ...); ``target_depth`` optional target depth maps (to ``target_depth/``).
        ``mask=None``: no mask column, each mask is derived from its pair with :func:`mask_from_difference`.
        Every missing column, empty or mistyped cell, repeated name, target of another size than its context,
        and mask or depth map of another aspect ratio than its context is listed in **one** ``ValueError`` (row
        and column named) before anything is written; then each row is written as :func:`write_pair_folder`
        writes a pair, and the folder opens with its own checks.
        """
        from tqdm.auto import tqdm

        columns = {"context": context, "target": target, "mask": mask, "depth": depth, "prompt": prompt, "name": name,
                   "target_depth": target_depth}
        columns = {part: col for part, col in columns.items() if col is not None}
        check_hf_columns(ds, columns)
        names, prompts = checked_hf_rows(ds, columns, progress)
        root = Path(root).expanduser()
        prepare_pair_folder(root, overwrite, with_target_depth=target_depth is not None)
        for i in tqdm(range(len(ds)), desc="writing pairs", disable=not progress, mininterval=0.5):
            row = ds[i]
            pair = {key: row[columns[part]] for key, part in IMAGE_PARTS.items() if part in columns}
            if mask is None:
                pair["masks"] = mask_from_difference(pair["contexts"], pair["targets"])
            write_pair(root, names[i], pair, f" (row {i})")
        write_prompts(root, names, prompts)
        return cls(root, resolution, **dataset_kwargs)

    @property
    def names(self) -> list[str]:
        """The pair names (file stems), in dataset order (sorted)."""
        return list(self._names)

    @property
    def prompts(self) -> list[str]:
        """The prompts, in dataset order, without reading any image (e.g. to encode them all once)."""
        return list(self._prompts)

    def files(self, index: int) -> dict:
        """The file paths of pair ``index``: ``{"context", "target", "masks", "depth"} -> Path`` (and
        ``"target_depth"`` when the folder has one)."""
        return dict(self._files[index])

    def bucket_of(self, index: int) -> tuple[int, int]:
        """The training size ``(width, height)`` of pair ``index`` (its bucket; ``resolution`` square unless
        ``resize="bucket"``)."""
        return self._buckets[index]

    @property
    def buckets(self) -> dict[tuple[int, int], int]:
        """How many pairs each training size ``(width, height)`` holds, narrowest first."""
        counts: dict[tuple[int, int], int] = {}
        for shape in sorted(self._buckets, key=lambda s: (s[0] / s[1], s[0])):
            counts[shape] = counts.get(shape, 0) + 1
        return counts

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{w}x{h}: {n}" for (w, h), n in self.buckets.items())
        return (f"KontextPairs({len(self)} pairs, root={str(self.root)!r}, resolution={self.resolution}, "
                f"resize={self.resize!r}, depth_normalize={self.depth_normalize!r}, buckets (W x H: pairs) "
                f"{{{shapes}}})")

    def __getitem__(self, index: int) -> dict:
        name, files, prompt = self._names[index], self._files[index], self._prompts[index]
        context = pil_to_rgb(open_image(files["context"]))
        target = pil_to_rgb(open_image(files["target"]))
        mask = pil_to_binary_mask(open_image(files["masks"]), self.mask_threshold)  # L, {0, 255}
        bucket = self._buckets[index]
        box = crop_box(context.size, self.resize, bucket)  # in context pixels; mapped onto each image's own size
        rs, ref = Image.Resampling, (context.size, bucket)
        context, target = (self._fit(img, box, ref, rs.BICUBIC) for img in (context, target))
        item = {
            "context": pil_to_rgb_tensor(context),  # [3, H, W] in [0, 1]
            "target": pil_to_rgb_tensor(target),  # [3, H, W] in [0, 1]
            "mask": torch.from_numpy(np.array(self._fit(mask, box, ref, rs.NEAREST)) >= 128).float()[None],  # [1, H, W]
            "depth": self._depth(files["depth"], box, ref),  # [1, H, W] in [0, 1], near = 1
            "prompt": prompt,
            "name": name,
        }
        if "target_depth" in files:
            item["target_depth"] = self._depth(files["target_depth"], box, ref)  # [1, H, W], near = 1
        return item

    def _depth(self, path, box, ref_size) -> torch.Tensor:
        """One depth file as ``[1, H, W]`` in ``[0, 1]``, near = 1: normalised, then resized bilinearly on float."""
        depth = pil_to_depth_array(open_image(path), self.depth_normalize, self.depth_invert)
        depth = Image.fromarray(depth.astype(np.float32))  # mode F: resizing keeps every level
        depth = self._fit(depth, box, ref_size, Image.Resampling.BILINEAR)
        return torch.from_numpy(np.clip(np.array(depth, dtype=np.float32), 0.0, 1.0))[None]  # [H, W] -> [1, H, W]

    def _fit(self, img, box, ref, resample):
        """``img`` resized to the bucket from the crop ``box``; ``ref = (context size, bucket)``, both ``(W, H)``:
        the box is given in context pixels and mapped onto ``img``'s own size."""
        ref_size, bucket = ref
        return img.resize(bucket, resample, box=_scale_box(box, ref_size, img.size))


def write_pair_folder(root: str | os.PathLike, contexts, targets, masks, depths, prompts, *, names=None,
                      target_depths=None, overwrite: bool = False, resolution: int = 512,
                      **dataset_kwargs) -> KontextPairs:
    """Write your own pairs as a dataset folder (the layout of :class:`KontextPairs`), then open it.

    Files: ``context/<name>.png`` and ``target/<name>.png`` (8-bit RGB), ``masks/<name>.png`` (8-bit, 0 /
    255), ``depth/<name>.png`` (16-bit grey, near = bright), ``prompts.txt`` (UTF-8, in sorted-name order).

    Args:
        root: the folder to write; created if needed.
        contexts, targets: lists of PIL images (EXIF orientation applied) or ``[3, H, W]`` tensors in
            ``[0, 1]``.
        masks: PIL images (binarised at 0.5 of full range) or ``[1, H, W]`` / ``[H, W]`` tensors (values
            ``>= 0.5`` are editable), e.g. from :func:`mask_from_difference`.
        depths: PIL images (8/16-bit or float in ``[0, 1]``) or ``[1, H, W]`` / ``[H, W]`` tensors / numpy
            arrays in ``[0, 1]`` with near = 1, e.g. from :func:`estimate_depth`.
        prompts: one non-empty single-line string per pair.
        names: file stems (default ``0000``, ``0001``, ...). Pairs are matched by these names.
        target_depths: optional, the target's depth maps (like ``depths``), written to ``target_depth/``.
        overwrite: allow a non-empty ``root``; its ``context/ target/ masks/ depth/ target_depth/`` folders and
            ``prompts.txt`` are deleted first (other files are kept).
        resolution, dataset_kwargs: passed to :class:`KontextPairs`.
    Returns:
        the opened (validated) :class:`KontextPairs`.
    """
    lists, names = pair_lists(contexts, targets, masks, depths, prompts, names, target_depths)
    root = Path(root).expanduser()
    prepare_pair_folder(root, overwrite, with_target_depth=target_depths is not None)
    for i, name in enumerate(names):
        write_pair(root, name, {key: lists[key][i] for key in IMAGE_PARTS if key in lists}, f"[{i}]")
    write_prompts(root, names, lists["prompts"])
    return KontextPairs(root, resolution, **dataset_kwargs)


