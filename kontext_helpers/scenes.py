"""Training scenes for the tiny model: fresh random layouts and edits drawn with the sample-scene renderer.

``data_samples/make_samples.py`` renders the course's ten pairs from hand-written scenes. The functions
here draw *other* scenes (random objects, positions, views and lights) with one edit each: recolour,
remove, add, reshape or change material, each with its prompt, plus "keep" samples whose target is the
context. No drawn scene equals a ``data_samples`` pair (:func:`random_edit_spec` rejects them), so those
pairs stay held out for the course's LoRA.

Two held-out tests draw scenes where one condition alone can say what to do: twin scenes (two identical
objects, one prompt: only the mask says which) and depth scenes (one prompt per family: only the depth map says
where a box goes, which shape an object takes, or how far each pixel is for fog).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import torch

from .labels import mask_from_difference

SAMPLES_SCRIPT = Path(__file__).resolve().parent.parent / "data_samples" / "make_samples.py"

EDIT_KINDS = ("recolour", "remove", "add", "shape", "material", "keep")
KEEP_PROMPTS = ("", "keep the scene", "keep it", "keep the image the same")
_SHAPES = ("sphere", "box", "cylinder")
_PROMPT_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "white", "pink")


def sample_renderer():
    """The module ``data_samples/make_samples.py`` (the renderer of the sample pairs), loaded from the checkout."""
    if "kontext_make_samples" in sys.modules:
        return sys.modules["kontext_make_samples"]
    if not SAMPLES_SCRIPT.is_file():
        raise FileNotFoundError(f"{SAMPLES_SCRIPT} is missing: the training scenes are drawn with the renderer of "
                                "data_samples/, so run this from a checkout of the repository (git clone), not from "
                                "an installed package")
    spec = importlib.util.spec_from_file_location("kontext_make_samples", SAMPLES_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["kontext_make_samples"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def _random_object(ms, rng, key: str, placed: list, colours: tuple[str, ...]):
    """An object at a free spot (``None`` when 40 tries find none)."""
    for _ in range(40):
        shape = str(rng.choice(_SHAPES))
        radius = float(rng.uniform(0.45, 0.85)) if shape == "sphere" else float(rng.uniform(0.4, 0.7))
        x, z = float(rng.uniform(-2.3, 2.3)), float(rng.uniform(-2.6, 1.4))
        if all(math.hypot(x - o.x, z - o.z) > radius + o.radius + 0.25 for o in placed):
            height = 0.0 if shape == "sphere" else float(rng.uniform(0.8, 1.6))
            return ms.Obj(key, shape, round(x, 3), round(z, 3), round(radius, 3), round(height, 3),
                          str(rng.choice(colours)), str(rng.choice(["matte", "matte", "glossy"])),
                          float(rng.uniform(-45, 45)) if shape == "box" else 0.0)
    return None


def _name(obj) -> str:
    return f"{obj.colour} {obj.shape}"


def _edit_recolour(ms, rng, objs, obj):
    colour = str(rng.choice([c for c in _PROMPT_COLOURS if c != obj.colour]))
    return f"make the {_name(obj)} {colour}", ms._replace(objs, obj.key, colour=colour)


def _edit_remove(ms, rng, objs, obj):
    return f"remove the {_name(obj)}", ms._remove(objs, obj.key)


def _edit_shape(ms, rng, objs, obj):
    shape = str(rng.choice([s for s in _SHAPES if s != obj.shape]))
    height = 0.0 if shape == "sphere" else float(round(rng.uniform(0.9, 1.5), 3))
    radius = float(round(rng.uniform(0.5, 0.75), 3))
    changed = ms._replace(objs, obj.key, shape=shape, radius=radius, height=height, yaw_deg=0.0)
    return f"turn the {_name(obj)} into a {shape}", changed


def _edit_material(ms, rng, objs, obj):
    if obj.material == "matte" and rng.random() < 0.5:
        return f"make the matte {_name(obj)} glossy", ms._replace(objs, obj.key, material="glossy")
    return f"make the {_name(obj)} shiny metal", ms._replace(objs, obj.key, material="metal")


def _edit_add(ms, rng, objs, obj):
    """A new object beside ``obj`` (left, right or in front of it), or ``None`` when there is no room."""
    where, (dx, dz) = [("to the left of", (-1.5, 0.0)), ("to the right of", (1.5, 0.0)),
                       ("in front of", (0.0, 1.5))][int(rng.integers(3))]
    new = _random_object(ms, rng, "n", [], _PROMPT_COLOURS)
    new = dataclasses.replace(new, x=round(obj.x + dx, 3), z=round(obj.z + dz, 3), material="matte")
    if any(math.hypot(new.x - o.x, new.z - o.z) < new.radius + o.radius + 0.15 for o in objs):
        return None
    size = "small " if new.radius < 0.5 and rng.random() < 0.5 else ""
    return f"add a {size}{_name(new)} {where} the {_name(obj)}", (*objs, new)


_EDITS = {"recolour": _edit_recolour, "remove": _edit_remove, "add": _edit_add, "shape": _edit_shape,
          "material": _edit_material}


def _held_out_scenes(ms) -> set:
    """The ``data_samples`` pairs as comparable keys ``(context objects, target objects)``."""
    return {(tuple(s.context), tuple(s.target)) for s in ms.SCENES}


def random_edit_spec(seed: int, index: int):
    """Scene ``index`` of the stream ``seed``: a ``SceneSpec`` with one edit and its prompt (``kind`` first).

    Returns ``(kind, spec)``; a "keep" sample's target equals its context. The same ``(seed, index)`` always
    gives the same scene; a draw that equals a ``data_samples`` pair is replaced by the next draw.
    """
    ms = sample_renderer()
    held_out = _held_out_scenes(ms)
    rng = np.random.default_rng([seed, index])
    while True:
        objs: list = []
        for key in "abc"[: int(rng.integers(1, 4))]:
            obj = _random_object(ms, rng, key, objs, tuple(ms.COLOURS))
            if obj is not None:
                objs.append(obj)
        objs_t = tuple(objs)
        kind = EDIT_KINDS[int(rng.choice(len(EDIT_KINDS), p=[0.17, 0.17, 0.17, 0.17, 0.12, 0.2]))]
        obj = objs[int(rng.integers(len(objs)))]
        if kind == "keep":
            prompt, target = str(rng.choice(KEEP_PROMPTS)), objs_t
        else:
            edited = _EDITS[kind](ms, rng, objs_t, obj)
            if edited is None or (kind == "remove" and len(objs) == 1 and rng.random() < 0.5):
                continue
            prompt, target = edited
        if (objs_t, tuple(target)) in held_out:
            continue
        view = dict(camera_azimuth_deg=float(rng.uniform(-22, 22)), sun_azimuth_deg=float(rng.uniform(-65, 65)),
                    sun_elevation_deg=float(rng.uniform(35, 55)))
        return kind, ms.SceneSpec(f"train_{seed}_{index}", prompt, objs_t, tuple(target), **view)


def render_training_pair(spec, size: int = 128) -> dict:
    """Render one drawn scene at ``size`` px: ``context`` / ``target`` ``[3, H, W]`` in ``[0, 1]``, ``depth``
    ``[1, H, W]`` in ``[0, 1]`` (near = 1, min-max normalised as :class:`KontextPairs` reads it), ``prompt``."""
    ms = sample_renderer()
    context, _ = ms.render_scene(spec.context, spec, size=size)
    same = tuple(spec.target) == tuple(spec.context)
    target = context if same else ms.render_scene(spec.target, spec, size=size)[0]
    return {"context": _rgb_tensor(context), "target": _rgb_tensor(target),
            "depth": _depth_tensor(ms, spec.context, spec, size), "prompt": spec.prompt}


def _rgb_tensor(rgb: np.ndarray) -> torch.Tensor:
    """A rendered uint8 image ``[H, W, 3]`` as ``[3, H, W]`` in ``[0, 1]``."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 255.0  # [H, W, 3] -> [3, H, W]


def _depth_tensor(ms, objs, spec, size: int) -> torch.Tensor:
    """The scene's depth ``[1, H, W]`` in ``[0, 1]``, near = 1, min-max normalised as :class:`KontextPairs` reads it."""
    depth = ms.render_depth(objs, spec, size=size).astype(np.float32)
    lo, hi = depth.min(), depth.max()
    depth = (depth - lo) / (hi - lo) if hi > lo else np.zeros_like(depth)
    return torch.from_numpy(depth)[None]  # [H, W] -> [1, H, W]


# --------------------------------------------------------------------------------------------------
# twin scenes: two identical objects, one prompt; only the mask says which one to edit
# --------------------------------------------------------------------------------------------------

TWIN_EDIT = ("red", "blue")  # every twin pair turns a red object blue: the prompt never says which of the two
TWIN_OTHER_COLOURS = ("green", "yellow", "orange", "purple", "pink", "white")  # the third object's colours


def _twin_objects(ms, rng):
    """Two identical matte objects, one in each half of the view, or ``None`` when they would touch."""
    shape = str(rng.choice(_SHAPES))
    radius = float(rng.uniform(0.6, 0.85)) if shape == "sphere" else float(rng.uniform(0.5, 0.7))
    height = 0.0 if shape == "sphere" else float(rng.uniform(1.0, 1.6))
    colour = TWIN_EDIT[0]
    xs = [float(rng.uniform(-2.3, -0.9)), float(rng.uniform(0.9, 2.3))]
    zs = [float(rng.uniform(-2.4, 1.2)) for _ in xs]
    if math.hypot(xs[0] - xs[1], zs[0] - zs[1]) < 2 * radius + 0.8:
        return None
    return tuple(ms.Obj(key, shape, round(x, 3), round(z, 3), round(radius, 3), round(height, 3), colour, "matte")
                 for key, x, z in zip("ab", xs, zs))


def twin_edit_spec(seed: int, index: int):
    """Twin scene ``index`` of the stream ``seed``: ``(context, [target_a, target_b], prompt, view)``.

    Two identical red matte objects (and, half the time, a third of another colour); the prompt ("make the red
    sphere blue") fits both, and target ``k`` recolours object ``k`` alone, so only a mask can say which.
    """
    ms = sample_renderer()
    rng = np.random.default_rng([seed, index, 2])
    while True:
        twins = _twin_objects(ms, rng)
        if twins is None:
            continue
        objs = list(twins)
        if rng.random() < 0.5:
            other = _random_object(ms, rng, "c", objs, TWIN_OTHER_COLOURS)
            objs += [dataclasses.replace(other, material="matte")] if other is not None else []
        new = TWIN_EDIT[1]
        targets = [ms._replace(tuple(objs), key, colour=new) for key in "ab"]
        view = dict(camera_azimuth_deg=float(rng.uniform(-15, 15)), sun_azimuth_deg=float(rng.uniform(-65, 65)),
                    sun_elevation_deg=float(rng.uniform(35, 55)))
        return tuple(objs), targets, f"make the {_name(twins[0])} {new}", view


def _box(mask: np.ndarray, pad: int) -> np.ndarray:
    """The bounding box of ``mask`` grown by ``pad`` px, as a mask."""
    rows, cols = np.nonzero(mask)
    box = np.zeros_like(mask)
    box[max(rows.min() - pad, 0): rows.max() + pad + 1, max(cols.min() - pad, 0): cols.max() + pad + 1] = True
    return box


def render_twin_scene(seed: int, index: int, size: int = 128) -> dict:
    """One twin scene at ``size`` px: ``context`` ``[3, H, W]``, ``targets`` ``[2, 3, H, W]`` (object a, object b
    recoloured), ``masks`` ``[2, 1, H, W]`` (each object's silhouette, dilated by ``size // 64`` px), ``boxes``
    ``[2, 1, H, W]`` (each silhouette's bounding box grown by ``size // 32`` px: a rough mask), ``objects``
    ``[2, 1, H, W]`` (the bare silhouettes, to score each object), ``depth`` ``[1, H, W]`` and ``prompt``."""
    ms = sample_renderer()
    objs, targets, prompt, view = twin_edit_spec(seed, index)
    spec = ms.SceneSpec(f"twin_{seed}_{index}", prompt, objs, targets[0], **view)
    context, ids = ms.render_scene(objs, spec, size=size)
    rendered = [ms.render_scene(t, spec, size=size)[0] for t in targets]
    silhouettes = [ms._silhouette(ids, objs, {key}) for key in "ab"]
    masks = [ms._dilate(s, max(size // 64, 1)) for s in silhouettes]
    boxes = [_box(s, max(size // 32, 1)) for s in silhouettes]
    as_mask = lambda ms_: torch.from_numpy(np.stack(ms_)).float()[:, None]  # noqa: E731  [2, H, W] -> [2, 1, H, W]
    return {"context": _rgb_tensor(context), "targets": torch.stack([_rgb_tensor(t) for t in rendered]),
            "masks": as_mask(masks), "boxes": as_mask(boxes), "objects": as_mask(silhouettes),  # [2, 1, H, W]
            "depth": _depth_tensor(ms, objs, spec, size), "prompt": prompt, "name": f"twin_{seed}_{index}"}


def object_changed(out: torch.Tensor, context: torch.Tensor, target: torch.Tensor, silhouette: torch.Tensor) -> bool:
    """Whether an object changed towards its edit: its mean colour in ``out`` lies nearer the ``target`` than the
    ``context`` (images ``[3, H, W]``, the object's ``silhouette`` ``[1, H, W]``)."""
    mean = lambda img: img[:, silhouette[0].bool()].mean(dim=1)  # noqa: E731  [3, H, W] -> [3]
    return bool((mean(out) - mean(target)).norm() < (mean(out) - mean(context)).norm())


class TwinPairs(torch.utils.data.Dataset):
    """Twin scenes as training pairs, two per scene (the mask on object a, then on object b), in the item layout
    of :class:`~kontext_helpers.data.KontextPairs` (``context``, ``target``, ``mask``, ``depth``, ``prompt``,
    ``name``). ``mask="box"`` gives the rough masks instead of the silhouettes."""

    def __init__(self, seed: int, indices, resolution: int = 128, *, mask: str = "tight"):
        if mask not in ("tight", "box"):
            raise ValueError(f"mask must be 'tight' or 'box', got {mask!r}")
        self.resolution, self.mask_kind = int(resolution), mask
        self.scenes = [render_twin_scene(seed, i, self.resolution) for i in indices]

    def __len__(self):
        return 2 * len(self.scenes)

    def __getitem__(self, i: int) -> dict:
        scene, k = self.scenes[i // 2], i % 2
        masks = scene["masks"] if self.mask_kind == "tight" else scene["boxes"]
        return {"context": scene["context"], "target": scene["targets"][k], "mask": masks[k],
                "depth": scene["depth"], "prompt": scene["prompt"], "name": f"{scene['name']}_{'ab'[k]}"}


def _drawn_items(seed: int, resolution: int):
    """The drawn edit scenes of stream ``seed`` ("keep" scenes skipped), rendered one by one as they are asked for,
    each with its mask from the pixel difference."""
    for index in itertools.count():
        kind, spec = random_edit_spec(seed, index)
        if kind == "keep":
            continue
        pair = render_training_pair(spec, resolution)
        mask = mask_from_difference(pair["context"], pair["target"], threshold=0.0, dilate=2)  # [1, H, W]
        yield dict(pair, mask=mask, name=f"drawn_{seed}_{index}_{kind}")


class DrawnPairs(torch.utils.data.Dataset):
    """Drawn edit scenes (:func:`random_edit_spec`, "keep" scenes skipped) as pairs in the item layout of
    :class:`~kontext_helpers.data.KontextPairs`, each with its mask from the pixel difference: pairs a LoRA trained
    on ``data_samples/`` never saw, for a held-out yardstick."""

    def __init__(self, seed: int, count: int, resolution: int = 128):
        self.resolution = int(resolution)
        self.items = list(itertools.islice(_drawn_items(seed, self.resolution), count))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


# --------------------------------------------------------------------------------------------------
# depth scenes: one prompt per family; only the depth map says where, what shape, or how far
# --------------------------------------------------------------------------------------------------

DEPTH_FAMILIES = ("placement", "shape", "fog")
DEPTH_PROMPTS = {"placement": "add a red box", "shape": "make the red object match the depth", "fog": "add fog"}
DEPTH_SCALE = 0.82  # the renderer's 16-bit code / 65535 of the nearest floor pixel is about 0.813 for every view
FOG_COLOUR = (0.80, 0.82, 0.86)
FOG_STRENGTH = 0.8
_SCENERY_COLOURS = ("green", "blue", "yellow", "purple", "white", "teal")  # never red-like: red marks the edit


def fixed_depth(ms, objs, spec, size: int) -> torch.Tensor:
    """The scene's depth ``[1, H, W]``, near = 1, by one fixed mapping (the 16-bit code over ``DEPTH_SCALE`` of
    full range), not per-image min-max: a context and its target share one scale, so the target depth differs
    from the context's only where the geometry does (an added box in the bottom row would rescale a min-max map
    everywhere, and a min-max map would hide the absolute distance that fog reads)."""
    code = ms.render_depth(objs, spec, size=size).astype(np.float32) / 65535.0  # [H, W], 0 = sky / far plane
    return torch.from_numpy(np.clip(code / DEPTH_SCALE, 0.0, 1.0))[None]  # [H, W] -> [1, H, W]


def add_fog(image: torch.Tensor, depth: torch.Tensor, strength: float = FOG_STRENGTH) -> torch.Tensor:
    """Distance fog: ``image`` ``[3, H, W]`` blended toward ``FOG_COLOUR`` by ``strength * (1 - depth)`` (depth
    ``[1, H, W]``, near = 1), so the far plane and the sky get ``strength`` of fog and the nearest floor almost none."""
    weight = strength * (1.0 - depth)  # [1, H, W], broadcasts over the channels
    fog = torch.tensor(FOG_COLOUR, dtype=image.dtype)[:, None, None]  # [3] -> [3, 1, 1]
    return image * (1.0 - weight) + fog * weight


def _scenery(ms, rng, count: int, placed: list) -> list:
    """``count`` matte non-red objects at free spots (fewer when there is no room)."""
    objs = []
    for key in "abc"[:count]:
        obj = _random_object(ms, rng, key, placed + objs, _SCENERY_COLOURS)
        objs += [dataclasses.replace(obj, material="matte")] if obj is not None else []
    return objs


def _red_box(ms, rng, placed: list):
    """A matte red box of random size and turn at a free spot on the floor, or ``None``."""
    for _ in range(40):
        radius, height = float(rng.uniform(0.35, 0.7)), float(rng.uniform(0.5, 1.4))
        x, z = float(rng.uniform(-2.3, 2.3)), float(rng.uniform(-2.6, 1.4))
        if all(math.hypot(x - o.x, z - o.z) > 1.42 * (radius + o.radius) + 0.2 for o in placed):  # corners
            return ms.Obj("n", "box", round(x, 3), round(z, 3), round(radius, 3), round(height, 3), "red", "matte",
                          round(float(rng.uniform(-45, 45)), 2))
    return None


def _red_shape(ms, rng, base, shape: str):
    """The red object ``base`` (key ``"r"``) as ``shape``, at the same place with a new size."""
    radius = float(rng.uniform(0.55, 0.85)) if shape == "sphere" else float(rng.uniform(0.45, 0.75))
    height = 0.0 if shape == "sphere" else float(rng.uniform(0.8, 1.7))
    yaw = float(rng.uniform(-45, 45)) if shape == "box" else 0.0
    return dataclasses.replace(base, shape=shape, radius=round(radius, 3), height=round(height, 3),
                               yaw_deg=round(yaw, 2))


def _changed_area(ms, spec, objs_a, objs_b) -> np.ndarray:
    """Pixels (at 64 px) where two scenes' depths differ: the visible part of what changed."""
    return ms.render_depth(objs_a, spec, size=64) != ms.render_depth(objs_b, spec, size=64)  # [64, 64] bool


def _geometry_targets(ms, rng, family: str, spec) -> tuple | None:
    """Two targets of one context (two box places, or two new shapes), each visibly changing at least 1 % of the
    view and overlapping each other little (IoU < 0.6 of the changed pixels); ``None`` when a draw fails that."""
    context = tuple(spec.context)
    if family == "placement":
        first = _red_box(ms, rng, list(context))
        second = _red_box(ms, rng, [*context, first]) if first is not None else None
        if second is None:
            return None
        targets = ((*context, first), (*context, second))
    else:
        old = context[0]
        shapes = [s for s in _SHAPES if s != old.shape]
        rng.shuffle(shapes)
        targets = tuple((_red_shape(ms, rng, old, s), *context[1:]) for s in shapes)
    areas = [_changed_area(ms, spec, context, t) for t in targets]
    if family == "shape":  # the two targets against each other: what tells them apart
        areas = [_changed_area(ms, spec, targets[0], targets[1])] * 2
    overlap = (areas[0] & areas[1]).sum() / max((areas[0] | areas[1]).sum(), 1)
    if min(a.mean() for a in areas) < 0.01 or (family == "placement" and overlap > 0.6):
        return None
    return targets


def depth_scene_spec(family: str, seed: int, index: int):
    """Depth scene ``index`` of the stream ``seed``: ``(spec, targets)``, ``spec`` a ``SceneSpec`` of the context
    (its ``target`` is ``targets[0]``) and ``targets`` the object tuples of each target variant (two for
    placement and shape, the context's own for fog). The same arguments always give the same scene."""
    if family not in DEPTH_FAMILIES:
        raise ValueError(f"family must be one of {DEPTH_FAMILIES}, got {family!r}")
    ms = sample_renderer()
    rng = np.random.default_rng([seed, index, 3, DEPTH_FAMILIES.index(family)])
    while True:
        view = dict(camera_azimuth_deg=float(rng.uniform(-15, 15)), sun_azimuth_deg=float(rng.uniform(-65, 65)),
                    sun_elevation_deg=float(rng.uniform(35, 55)))
        if family == "shape":
            red = ms.Obj("r", str(rng.choice(_SHAPES)), round(float(rng.uniform(-1.6, 1.6)), 3),
                         round(float(rng.uniform(-1.8, 0.8)), 3), 0.0, 0.0, "red", "matte")
            objs = [_red_shape(ms, rng, red, red.shape)]
            objs += _scenery(ms, rng, int(rng.integers(0, 2)), [dataclasses.replace(objs[0], radius=1.1)])
        else:
            objs = _scenery(ms, rng, int(rng.integers(1, 3)) if family == "placement" else int(rng.integers(1, 4)), [])
        spec = ms.SceneSpec(f"{family}_{seed}_{index}", DEPTH_PROMPTS[family], tuple(objs), tuple(objs), **view)
        targets = (tuple(objs),) if family == "fog" else _geometry_targets(ms, rng, family, spec)
        if targets is not None:
            return dataclasses.replace(spec, target=targets[0]), targets


@functools.lru_cache(maxsize=32)
def _render(objs: tuple, spec, size: int):
    """``render_scene`` once per scene and size (a context is shared by its target variants)."""
    return sample_renderer().render_scene(objs, spec, size=size)


def render_depth_scene(family: str, seed: int, index: int, size: int = 128, *, variant: int = 0) -> dict:
    """One depth scene at ``size`` px (:func:`depth_scene_spec`), target ``variant`` (0 or 1; fog has only 0).

    Returns ``context`` / ``target`` ``[3, H, W]``; ``depth`` (the context's) and ``target_depth`` (the target's)
    ``[1, H, W]`` by :func:`fixed_depth`; ``mask`` ``[1, H, W]``, the whole image (the edit's place is not given
    by the mask); ``silhouette`` ``[1, H, W]``, the region the edit should produce (the added box or the reshaped
    object in the target, the whole image for fog); ``prompt`` (one per family), ``name`` and ``family``.
    Placement: "add a red box", its place, size and turn only in the target depth. Shape: "make the red object
    match the depth", the new shape only in the target depth. Fog: "add fog", the context fogged by its own
    depth (:func:`add_fog`); the geometry stays, so ``target_depth`` equals ``depth``.
    """
    ms = sample_renderer()
    spec, targets = depth_scene_spec(family, seed, index)
    if not 0 <= variant < len(targets):
        raise ValueError(f"variant must be in range({len(targets)}) for {family!r}, got {variant}")
    target_objs = targets[variant]
    rgb, _ = _render(spec.context, spec, size)
    context, depth = _rgb_tensor(rgb), fixed_depth(ms, spec.context, spec, size)
    full = torch.ones(1, size, size)
    if family == "fog":
        target, silhouette = add_fog(context, depth), full
    else:
        rendered, ids = _render(target_objs, spec, size)
        target = _rgb_tensor(rendered)
        silhouette = torch.from_numpy(ms._silhouette(ids, target_objs, {"n", "r"})).float()[None]  # [1, H, W]
    return {"context": context, "target": target, "depth": depth, "target_depth": fixed_depth(ms, target_objs, spec,
            size), "mask": full, "silhouette": silhouette, "prompt": spec.prompt, "family": family,
            "name": f"{spec.slug}_{variant}"}


def red_pixels(image: torch.Tensor) -> torch.Tensor:
    """Where ``image`` ``[3, H, W]`` is reddish (the edited object's colour; no other object in a depth scene is):
    ``[1, H, W]`` bool: red above 0.3 and at least 0.12 above both green and blue, which stay within 0.15 of each
    other (red to pink, not yellow or orange). Loose enough for the tiny model's soft, pinkish red boxes; the
    grey-beige floor, the sky and the scenery colours stay out."""
    r, g, b = image.clamp(0, 1)  # [3, H, W] -> three [H, W]
    reddish = (r > 0.3) & (r - torch.maximum(g, b) > 0.12) & ((g - b).abs() < 0.15)
    return reddish[None]  # [H, W] -> [1, H, W]


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def depth_followed(out: torch.Tensor, given: dict, other: dict) -> dict:
    """Did an edit follow the depth map it was given? For placement and shape scenes.

    ``given`` is the scene whose ``target_depth`` the edit got, ``other`` another target of the same context (the
    other variant). The new red object in ``out`` (:func:`red_pixels`) is compared with each scene's
    ``silhouette`` by IoU; ``followed`` is ``iou_given > iou_other``: the object took the place and shape that the
    given depth implies, not the other's. An unchanged context or a red blob elsewhere scores low on both.
    """
    if given["family"] == "fog":
        raise ValueError("depth_followed scores placement and shape scenes; score fog by PSNR to its target")
    red = red_pixels(out)
    iou_given, iou_other = _iou(red, given["silhouette"].bool()), _iou(red, other["silhouette"].bool())
    return {"iou_given": iou_given, "iou_other": iou_other, "followed": iou_given > iou_other}


class DepthPairs(torch.utils.data.Dataset):
    """Depth scenes (:func:`render_depth_scene`) as training pairs in the item layout of
    :class:`~kontext_helpers.data.KontextPairs` (``context``, ``target``, ``mask``, ``depth``, ``target_depth``,
    ``prompt``, ``name``) plus ``family`` and ``silhouette``: for each index, each family, each variant in
    ``variants`` (fog has variant 0 only). Both variants of a placement or shape scene share context and prompt,
    so only the target depth tells the two targets apart."""

    def __init__(self, seed: int, indices, resolution: int = 128, *, families=DEPTH_FAMILIES, variants=(0, 1)):
        unknown = [f for f in families if f not in DEPTH_FAMILIES]
        if unknown or not families:
            raise ValueError(f"families must be a non-empty selection of {DEPTH_FAMILIES}, got {families!r}")
        self.resolution, self.families = int(resolution), tuple(families)
        self.items = [render_depth_scene(f, seed, i, self.resolution, variant=v) for i in indices for f in families
                      for v in (variants if f != "fog" else (0,))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


# --------------------------------------------------------------------------------------------------
# photos of other shapes: drawn scenes cut to 4:3, 3:4 and 16:9, for aspect-ratio buckets
# --------------------------------------------------------------------------------------------------

PHOTO_ASPECTS = ((4, 3), (3, 4), (16, 9))  # (width, height): a phone photo, a portrait, a screenshot


def crop_to_aspect(item: dict, aspect: tuple[int, int]) -> dict:
    """``item``'s images (every ``[C, H, W]`` tensor of it) cut to the centred box of ``aspect = (w, h)``."""
    _, h, w = item["context"].shape
    aw, ah = aspect
    cw, ch = (w, round(w * ah / aw)) if w * ah <= h * aw else (round(h * aw / ah), h)  # the box's width, height
    top, left = (h - ch) // 2, (w - cw) // 2
    return {k: v[:, top:top + ch, left:left + cw] if isinstance(v, torch.Tensor) and v.dim() == 3 else v
            for k, v in item.items()}


class AspectPairs(torch.utils.data.Dataset):
    """Drawn edit scenes (:class:`DrawnPairs`) rendered square at ``1.5 * resolution`` px and cut to the aspect
    ratios in ``aspects`` in turn (4:3, 3:4, 16:9 by default; 192x144, 144x192, 192x108 at 128): photos at their
    own shape, each with its ``aspect`` recorded, for training and evaluating with aspect-ratio buckets. A scene
    whose edit the cut leaves out (under 0.5 % of the pixels masked) is skipped."""

    def __init__(self, seed: int, count: int, resolution: int = 128, *, aspects=PHOTO_ASPECTS):
        self.resolution, self.aspects, self.items = int(resolution), tuple(aspects), []
        for item in _drawn_items(seed, int(round(resolution * 1.5))):  # rendered until `count` are kept
            aspect = self.aspects[len(self.items) % len(self.aspects)]
            cut = crop_to_aspect(item, aspect)
            if float(cut["mask"].mean()) >= 0.005:  # the edit is (mostly) inside the photo: kept
                self.items.append(dict(cut, aspect=aspect))
            if len(self.items) == count:
                break

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]
