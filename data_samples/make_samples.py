"""Procedural renderer for the small mask-guided editing dataset in ``data_samples/``.

Every pair is a tiny 3-D scene (spheres, boxes and cylinders standing on a floor, lit by a
sun and a sky) that is ray cast per pixel with numpy and rendered twice: once as it is
(the *context* image) and once with exactly one edit applied (the *target* image).  For
each pair the script also writes

* a binary *mask* (white = editable region) that covers every pixel that differs between
  context and target, plus the edited object's silhouettes, dilated by a few pixels, and
* a 16-bit *depth* map of the context scene taken straight from the renderer's z-buffer, and
* a 16-bit *target depth* map of the target scene, in the same encoding.

Run it from the repository root::

    python data_samples/make_samples.py            # rewrites data_samples/ in place
    python data_samples/make_samples.py --out DIR  # writes the same files into DIR

Only numpy and Pillow are used.  There is no randomness and no clock: every scene is
written out by hand in :data:`SCENES`, and all per-pixel arithmetic uses IEEE-754
operations that are correctly rounded on every platform (``+ - * / sqrt``, comparisons,
``floor``), so a rerun gives the same pixels, and with the same Pillow/zlib build the same
PNG bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

# --------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------

#: Width and height of every written image, in pixels.
IMAGE_SIZE = 512
#: Rays per pixel along each axis for the colour images (2 -> 2x2 supersampling).
SUPERSAMPLE = 2
#: Radius, in pixels, of the disk used to dilate the edit mask.
MASK_DILATION_PX = 6

#: Camera-space depth (distance along the viewing axis) mapped to the brightest value.
DEPTH_NEAR = 4.0
#: Camera-space depth of the far plane; the sky and anything beyond it are stored as 0.
DEPTH_FAR = 30.0
#: How the 16-bit depth PNGs are encoded (also stated in data_samples/README.md).
DEPTH_CONVENTION = (
    "larger value = nearer: normalised inverse depth, "
    "v = round(65535 * (1/z - 1/FAR) / (1/NEAR - 1/FAR)) clipped to [0, 65535], "
    f"z = camera-space depth, NEAR = {DEPTH_NEAR}, FAR = {DEPTH_FAR}; sky / beyond the far plane = 0"
)

#: Display-space colours (0..1) of the named object colours used in the prompts.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.16, 0.14),
    "green": (0.22, 0.70, 0.30),
    "blue": (0.18, 0.38, 0.90),
    "yellow": (0.96, 0.80, 0.16),
    "orange": (0.97, 0.52, 0.12),
    "purple": (0.58, 0.28, 0.80),
    "white": (0.93, 0.93, 0.91),
    "teal": (0.10, 0.62, 0.62),
    "pink": (0.96, 0.50, 0.66),
}

#: Materials: (specular strength, log2 of the specular exponent, mirror reflectance at
#: normal incidence, metallic).  Reflectance rises towards grazing angles (Schlick); a
#: metal tints its reflection with its colour, a glossy coat reflects white light.
MATERIALS: dict[str, tuple[float, int, float, bool]] = {
    "matte": (0.04, 4, 0.0, False),
    "glossy": (0.90, 6, 0.10, False),
    "metal": (1.00, 8, 0.80, True),
}

_SKY_ZENITH = np.array([0.36, 0.56, 0.86]) ** 2
_SKY_HORIZON = np.array([0.86, 0.90, 0.95]) ** 2
_FLOOR_ALBEDO = np.array([0.80, 0.78, 0.74]) ** 2
_SUN_COLOUR = np.array([1.00, 0.96, 0.88])
_AMBIENT_SKY = np.array([0.42, 0.46, 0.52])
_AMBIENT_GROUND = np.array([0.24, 0.23, 0.21])
_FOG_START = 12.0
_EPS = 1e-4
_MISS = np.inf
_SKY_ID = -1
_FLOOR_ID = 0

Array = np.ndarray


# --------------------------------------------------------------------------------------
# Scene description
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Obj:
    """One object resting on the floor (y = 0).

    ``radius`` is the sphere / cylinder radius or the half-width of a box's square
    footprint; ``height`` is the height of a box or cylinder (a sphere ignores it).
    ``key`` names the object across the context and target scenes of a pair.
    """

    key: str
    shape: str
    x: float
    z: float
    radius: float
    height: float
    colour: str
    material: str = "matte"
    yaw_deg: float = 0.0


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    """A context scene, its edited target scene, the edit prompt and the view."""

    slug: str
    prompt: str
    context: tuple[Obj, ...]
    target: tuple[Obj, ...]
    camera_azimuth_deg: float = 0.0
    sun_azimuth_deg: float = -40.0
    sun_elevation_deg: float = 50.0


def _replace(objs: tuple[Obj, ...], key: str, **changes: object) -> tuple[Obj, ...]:
    """Return ``objs`` with the object named ``key`` updated by ``changes``."""
    keys = [o.key for o in objs]
    if key not in keys:
        raise KeyError(key)
    return tuple(dataclasses.replace(o, **changes) if o.key == key else o for o in objs)


def _remove(objs: tuple[Obj, ...], key: str) -> tuple[Obj, ...]:
    """Return ``objs`` without the object named ``key``."""
    kept = tuple(o for o in objs if o.key != key)
    if len(kept) == len(objs):
        raise KeyError(key)
    return kept


def _build_scenes() -> list[SceneSpec]:
    """Write out the ten hand-made scenes, one edit each, in dataset order."""
    scenes: list[SceneSpec] = []

    base = (
        Obj("a", "sphere", -1.3, 0.4, 0.75, 0.0, "red"),
        Obj("b", "box", 1.4, -0.4, 0.6, 1.2, "green", yaw_deg=25.0),
        Obj("c", "cylinder", 0.1, -1.9, 0.5, 1.5, "white"),
    )
    scenes.append(
        SceneSpec("recolour_sphere", "make the red sphere blue", base, _replace(base, "a", colour="blue"))
    )

    base = (
        Obj("a", "sphere", 1.2, 0.6, 0.7, 0.0, "blue"),
        Obj("b", "box", -1.2, 0.2, 0.55, 1.1, "green", yaw_deg=-20.0),
        Obj("c", "sphere", 0.0, -2.0, 0.55, 0.0, "yellow"),
    )
    scenes.append(
        SceneSpec("remove_box", "remove the green box", base, _remove(base, "b"), camera_azimuth_deg=12.0)
    )

    base = (
        Obj("a", "sphere", 0.6, 0.0, 0.8, 0.0, "blue"),
        Obj("b", "box", 2.2, -1.8, 0.5, 1.0, "orange", yaw_deg=40.0),
    )
    added = Obj("n", "cylinder", -1.5, 0.3, 0.45, 1.3, "yellow")
    scenes.append(
        SceneSpec(
            "add_cylinder",
            "add a yellow cylinder to the left of the blue sphere",
            base,
            (*base, added),
            camera_azimuth_deg=-8.0,
            sun_azimuth_deg=-60.0,
        )
    )

    base = (
        Obj("a", "box", 0.9, 0.5, 0.65, 1.3, "red", yaw_deg=15.0),
        Obj("b", "cylinder", -1.5, -0.6, 0.6, 1.0, "teal"),
        Obj("c", "sphere", -0.6, -2.4, 0.5, 0.0, "white"),
    )
    scenes.append(
        SceneSpec(
            "box_to_sphere",
            "turn the red box into a sphere",
            base,
            _replace(base, "a", shape="sphere", radius=0.75),
            camera_azimuth_deg=18.0,
            sun_azimuth_deg=-30.0,
        )
    )

    base = (
        Obj("a", "sphere", -0.4, 0.2, 0.9, 0.0, "white"),
        Obj("b", "box", 1.9, -0.8, 0.5, 1.0, "red", yaw_deg=30.0),
        Obj("c", "cylinder", -2.2, -1.6, 0.45, 1.4, "blue"),
    )
    scenes.append(
        SceneSpec(
            "metal_sphere",
            "make the white sphere shiny metal",
            base,
            _replace(base, "a", material="metal"),
            camera_azimuth_deg=-15.0,
            sun_azimuth_deg=-50.0,
            sun_elevation_deg=45.0,
        )
    )

    base = (
        Obj("a", "cylinder", 1.5, 0.3, 0.55, 1.4, "orange"),
        Obj("b", "sphere", -1.0, 0.6, 0.7, 0.0, "green"),
        Obj("c", "box", -0.6, -2.0, 0.6, 0.9, "blue", yaw_deg=-35.0),
    )
    scenes.append(
        SceneSpec(
            "recolour_cylinder",
            "make the orange cylinder purple",
            base,
            _replace(base, "a", colour="purple"),
            camera_azimuth_deg=6.0,
            sun_azimuth_deg=35.0,
        )
    )

    base = (
        Obj("a", "sphere", -1.6, -0.6, 0.7, 0.0, "blue"),
        Obj("b", "box", 1.0, 0.8, 0.55, 0.8, "yellow", yaw_deg=10.0),
        Obj("c", "cylinder", 1.3, -2.0, 0.5, 1.6, "red"),
    )
    scenes.append(
        SceneSpec(
            "sphere_to_cylinder",
            "turn the blue sphere into a cylinder",
            base,
            _replace(base, "a", shape="cylinder", radius=0.6, height=1.4),
            camera_azimuth_deg=-20.0,
            sun_azimuth_deg=-45.0,
        )
    )

    base = (
        Obj("a", "sphere", 1.8, -0.2, 0.6, 0.0, "yellow"),
        Obj("b", "cylinder", -0.8, 0.5, 0.55, 1.2, "purple"),
        Obj("c", "box", 0.4, -2.1, 0.7, 1.0, "white", yaw_deg=45.0),
    )
    scenes.append(
        SceneSpec(
            "remove_sphere",
            "remove the yellow sphere",
            base,
            _remove(base, "a"),
            camera_azimuth_deg=10.0,
            sun_azimuth_deg=40.0,
            sun_elevation_deg=42.0,
        )
    )

    base = (
        Obj("a", "cylinder", 0.0, -0.9, 0.6, 1.5, "green"),
        Obj("b", "sphere", -2.0, -0.3, 0.6, 0.0, "pink"),
        Obj("c", "sphere", 2.1, -1.5, 0.55, 0.0, "blue"),
    )
    added = Obj("n", "box", 0.3, 1.3, 0.4, 0.8, "red", yaw_deg=-15.0)
    scenes.append(
        SceneSpec(
            "add_box",
            "add a small red box in front of the green cylinder",
            base,
            (*base, added),
            sun_azimuth_deg=-25.0,
        )
    )

    base = (
        Obj("a", "box", -1.1, 0.1, 0.7, 1.2, "purple", yaw_deg=-30.0),
        Obj("b", "sphere", 1.3, 0.7, 0.65, 0.0, "orange"),
        Obj("c", "cylinder", 1.0, -2.0, 0.5, 1.1, "teal"),
    )
    scenes.append(
        SceneSpec(
            "glossy_box",
            "make the matte purple box glossy",
            base,
            _replace(base, "a", material="glossy"),
            camera_azimuth_deg=-5.0,
            sun_azimuth_deg=-35.0,
            sun_elevation_deg=38.0,
        )
    )
    return scenes


#: The dataset, in the order of its file stems (``0000_<slug>``, ``0001_<slug>``, ...).
SCENES: list[SceneSpec] = _build_scenes()


def stem(index: int, spec: SceneSpec) -> str:
    """File stem of pair ``index``: zero-padded index and slug, so sorted order = dataset order."""
    return f"{index:04d}_{spec.slug}"


# --------------------------------------------------------------------------------------
# Small vector helpers on (3, N) arrays
# --------------------------------------------------------------------------------------


def _dot(a: Array, b: Array) -> Array:
    """Component-wise dot product of two (3, N) (or broadcastable) arrays."""
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _normalise(v: Array) -> Array:
    """Scale each column of a (3, N) array to unit length."""
    return v / np.sqrt(_dot(v, v))


def _vec(x: float, y: float, z: float) -> Array:
    """A (3, 1) column that broadcasts against (3, N) arrays."""
    return np.array([[x], [y], [z]], dtype=np.float64)


def _sun_direction(spec: SceneSpec) -> Array:
    """Unit vector pointing from the scene towards the sun, shape (3, 1)."""
    az = math.radians(spec.sun_azimuth_deg)
    el = math.radians(spec.sun_elevation_deg)
    return _vec(math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az))


# --------------------------------------------------------------------------------------
# Camera
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Camera:
    """Pinhole camera: eye position and an orthonormal (right, up, forward) basis."""

    eye: Array
    right: Array
    up: Array
    forward: Array
    tan_half_fov: float


def make_camera(azimuth_deg: float) -> Camera:
    """Camera orbiting the origin at a fixed distance and height, looking slightly down."""
    az = math.radians(azimuth_deg)
    distance, height = 7.2, 3.3
    eye = _vec(distance * math.sin(az), height, distance * math.cos(az))
    look_at = _vec(0.0, 0.35, -0.6)
    forward = _normalise(look_at - eye)
    right = _normalise(np.cross(forward[:, 0], [0.0, 1.0, 0.0])[:, None])
    up = np.cross(right[:, 0], forward[:, 0])[:, None]
    return Camera(eye, right, up, forward, math.tan(math.radians(40.0) / 2.0))


def _primary_rays(camera: Camera, size: int, samples: int) -> tuple[Array, Array]:
    """Ray origins and unit directions, (3, N), for a ``size*samples`` square sample grid.

    Samples are laid out row-major on the fine grid, so sample ``(i, j)`` of pixel
    ``(py, px)`` is entry ``(py*samples + i) * size*samples + px*samples + j``.
    """
    n = size * samples
    coords = (np.arange(n, dtype=np.float64) + 0.5) / n * 2.0 - 1.0
    sx = np.tile(coords, n) * camera.tan_half_fov
    sy = -np.repeat(coords, n) * camera.tan_half_fov
    dirs = _normalise(camera.forward + camera.right * sx + camera.up * sy)
    origins = np.broadcast_to(camera.eye, dirs.shape)
    return origins, dirs


# --------------------------------------------------------------------------------------
# Intersections: each returns the ray parameter t of the first hit (inf = miss)
# --------------------------------------------------------------------------------------


def _safe(d: Array) -> Array:
    """Replace exactly-zero direction components so divisions stay finite."""
    return np.where(d == 0.0, 1e-12, d)


def _hit_floor(o: Array, d: Array) -> Array:
    """Intersect rays with the plane y = 0 (hit only from above)."""
    t = -o[1] / _safe(d[1])
    return np.where((d[1] < 0.0) & (t > _EPS), t, _MISS)


def _hit_sphere(o: Array, d: Array, obj: Obj) -> Array:
    """Intersect rays with a sphere resting on the floor."""
    ox, oy, oz = o[0] - obj.x, o[1] - obj.radius, o[2] - obj.z
    b = ox * d[0] + oy * d[1] + oz * d[2]
    c = ox * ox + oy * oy + oz * oz - obj.radius * obj.radius
    disc = b * b - c
    root = np.sqrt(np.maximum(disc, 0.0))
    t = -b - root
    return np.where((disc >= 0.0) & (t > _EPS), t, _MISS)


def _to_local(obj: Obj, x: Array, z: Array) -> tuple[Array, Array]:
    """Rotate world xz offsets (already relative to the object) into the object's frame."""
    c, s = math.cos(math.radians(obj.yaw_deg)), math.sin(math.radians(obj.yaw_deg))
    return c * x - s * z, s * x + c * z


def _to_world(obj: Obj, x: Array, z: Array) -> tuple[Array, Array]:
    """Inverse of :func:`_to_local`."""
    c, s = math.cos(math.radians(obj.yaw_deg)), math.sin(math.radians(obj.yaw_deg))
    return c * x + s * z, -s * x + c * z


def _hit_box(o: Array, d: Array, obj: Obj) -> Array:
    """Intersect rays with a box rotated about the vertical axis (slab test)."""
    lox, loz = _to_local(obj, o[0] - obj.x, o[2] - obj.z)
    ldx, ldz = _to_local(obj, d[0], d[2])
    half_h = obj.height / 2.0
    t_near = np.full(d.shape[1], -np.inf)
    t_far = np.full(d.shape[1], np.inf)
    for org, dirn, half in ((lox, ldx, obj.radius), (o[1] - half_h, d[1], half_h), (loz, ldz, obj.radius)):
        inv = 1.0 / _safe(dirn)
        t1 = (-half - org) * inv
        t2 = (half - org) * inv
        t_near = np.maximum(t_near, np.minimum(t1, t2))
        t_far = np.minimum(t_far, np.maximum(t1, t2))
    return np.where((t_near <= t_far) & (t_near > _EPS), t_near, _MISS)


def _hit_cylinder(o: Array, d: Array, obj: Obj) -> Array:
    """Intersect rays with an upright capped cylinder standing on the floor."""
    ox, oz = o[0] - obj.x, o[2] - obj.z
    a = _safe(d[0] * d[0] + d[2] * d[2])
    b = ox * d[0] + oz * d[2]
    c = ox * ox + oz * oz - obj.radius * obj.radius
    disc = b * b - a * c
    t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
    y_side = o[1] + t_side * d[1]
    side_ok = (disc >= 0.0) & (t_side > _EPS) & (y_side >= 0.0) & (y_side <= obj.height)
    t_cap = (obj.height - o[1]) / _safe(d[1])
    cx, cz = ox + t_cap * d[0], oz + t_cap * d[2]
    cap_ok = (t_cap > _EPS) & (cx * cx + cz * cz <= obj.radius * obj.radius)
    t = np.where(side_ok, t_side, _MISS)
    return np.where(cap_ok & (t_cap < t), t_cap, t)


_HIT = {"sphere": _hit_sphere, "box": _hit_box, "cylinder": _hit_cylinder}


def _trace(o: Array, d: Array, objs: Sequence[Obj], floor_limit: Array | None = None) -> tuple[Array, Array]:
    """First hit of every ray: (t, id) with id -1 = sky, 0 = floor, k = ``objs[k - 1]``.

    ``floor_limit`` drops floor hits whose t exceeds it (used for the far plane).
    """
    t = _hit_floor(o, d)
    if floor_limit is not None:
        t = np.where(t <= floor_limit, t, _MISS)
    ids = np.where(np.isfinite(t), _FLOOR_ID, _SKY_ID)
    for k, obj in enumerate(objs, start=1):
        tk = _HIT[obj.shape](o, d, obj)
        closer = tk < t
        t = np.where(closer, tk, t)
        ids = np.where(closer, k, ids)
    return t, ids


def _occluded(o: Array, d: Array, objs: Sequence[Obj]) -> Array:
    """True where a ray from ``o`` along ``d`` hits any object (the floor cannot occlude)."""
    blocked = np.zeros(d.shape[1], dtype=bool)
    for obj in objs:
        blocked |= np.isfinite(_HIT[obj.shape](o, d, obj))
    return blocked


# --------------------------------------------------------------------------------------
# Shading
# --------------------------------------------------------------------------------------


def _normals(p: Array, ids: Array, objs: Sequence[Obj]) -> Array:
    """Surface normals at hit points ``p`` (3, N) for the given hit ids."""
    n = np.zeros_like(p)
    n[1] = 1.0  # floor and sky
    for k, obj in enumerate(objs, start=1):
        sel = ids == k
        if not sel.any():
            continue
        q = p[:, sel]
        qx, qz = q[0] - obj.x, q[2] - obj.z
        if obj.shape == "sphere":
            nk = np.stack([qx, q[1] - obj.radius, qz]) / obj.radius
        elif obj.shape == "cylinder":
            on_cap = q[1] >= obj.height - 1e-6
            inv_r = 1.0 / obj.radius
            nk = np.stack(
                [
                    np.where(on_cap, 0.0, qx * inv_r),
                    np.where(on_cap, 1.0, 0.0),
                    np.where(on_cap, 0.0, qz * inv_r),
                ]
            )
        else:
            lx, lz = _to_local(obj, qx, qz)
            half_h = obj.height / 2.0
            rx, ry, rz = np.abs(lx) / obj.radius, np.abs(q[1] - half_h) / half_h, np.abs(lz) / obj.radius
            on_x = (rx >= ry) & (rx >= rz)
            on_y = ~on_x & (ry >= rz)
            on_z = ~on_x & ~on_y
            nlx = np.where(on_x, np.sign(lx), 0.0)
            nlz = np.where(on_z, np.sign(lz), 0.0)
            wx, wz = _to_world(obj, nlx, nlz)
            nk = np.stack([wx, np.where(on_y, np.sign(q[1] - half_h), 0.0), wz])
        n[:, sel] = nk
    return n


def _sky(d: Array) -> Array:
    """Sky colour (linear) for ray directions ``d``: pale horizon to blue zenith."""
    s = np.clip(d[1] * 1.8, 0.0, 1.0)
    s = s * (2.0 - s)
    return _SKY_HORIZON[:, None] + (_SKY_ZENITH - _SKY_HORIZON)[:, None] * s


def _floor_albedo(p: Array, t: Array) -> Array:
    """Floor colour: a subtle 1-unit checker that fades out with distance."""
    parity = (np.floor(p[0]) + np.floor(p[2])) % 2.0
    fade = np.clip(1.0 - t / 14.0, 0.0, 1.0)
    shade = 1.0 - 0.07 * parity * fade
    return _FLOOR_ALBEDO[:, None] * shade


def _contact_occlusion(p: Array, objs: Sequence[Obj]) -> Array:
    """Soft darkening of the floor's ambient light close to each object's footprint."""
    ao = np.ones(p.shape[1])
    for obj in objs:
        qx, qz = p[0] - obj.x, p[2] - obj.z
        if obj.shape == "box":
            lx, lz = _to_local(obj, qx, qz)
            ex = np.maximum(np.abs(lx) - obj.radius, 0.0)
            ez = np.maximum(np.abs(lz) - obj.radius, 0.0)
            dist = np.sqrt(ex * ex + ez * ez)
        else:
            foot = obj.radius * (0.55 if obj.shape == "sphere" else 1.0)
            dist = np.maximum(np.sqrt(qx * qx + qz * qz) - foot, 0.0)
        w = np.clip(1.0 - dist / (0.6 * obj.radius), 0.0, 1.0)
        ao = ao * (1.0 - 0.45 * w * w)
    return ao


def _light_directions(sun: Array, samples: int, count: int) -> Array:
    """Per-ray sun directions, jittered over a small disk per subsample for soft shadows.

    Subsample ``(i, j)`` of every pixel gets its own fixed offset, so averaging the
    subsamples of a pixel averages ``samples**2`` shadow rays.
    """
    if samples == 1:
        return np.broadcast_to(sun, (3, count))
    tangent = _normalise(np.cross(sun[:, 0], [0.0, 1.0, 0.0])[:, None])
    bitangent = np.cross(tangent[:, 0], sun[:, 0])[:, None]
    spread = 0.035
    offs = (np.arange(samples, dtype=np.float64) + 0.5) / samples * 2.0 - 1.0
    n = math.isqrt(count)
    j = np.tile(np.arange(n) % samples, n)
    i = np.repeat(np.arange(n) % samples, n)
    dirs = sun + tangent * (spread * offs[j]) + bitangent * (spread * offs[i])
    return _normalise(dirs)


def _shade(
    o: Array,
    d: Array,
    objs: Sequence[Obj],
    sun: Array,
    light_dirs: Array,
    floor_limit: Array | None,
    reflections: bool,
) -> tuple[Array, Array, Array]:
    """Colour (linear, (3, N)), hit t and hit id for every ray."""
    t, ids = _trace(o, d, objs, floor_limit)
    hit = ids != _SKY_ID
    colour = _sky(d)
    if not hit.any():
        return colour, t, ids

    idx = np.flatnonzero(hit)
    hd, ht, hid = d[:, idx], t[idx], ids[idx]
    p = o[:, idx] + hd * ht
    n = _normals(p, hid, objs)
    ld = light_dirs[:, idx]

    albedo = _floor_albedo(p, ht)
    ks = np.full(idx.size, MATERIALS["matte"][0])
    exp2 = np.full(idx.size, MATERIALS["matte"][1])
    mirror = np.zeros(idx.size)
    metallic = np.zeros(idx.size, dtype=bool)
    for k, obj in enumerate(objs, start=1):
        sel = hid == k
        albedo[:, sel] = (np.array(COLOURS[obj.colour]) ** 2)[:, None]
        ks_k, exp_k, mirror_k, metallic_k = MATERIALS[obj.material]
        ks[sel], exp2[sel], mirror[sel], metallic[sel] = ks_k, exp_k, mirror_k, metallic_k
    on_floor = hid == _FLOOR_ID
    ks[on_floor] = 0.0

    lit = ~_occluded(p + n * 1e-3, ld, objs)
    ndl = np.maximum(_dot(n, ld), 0.0) * lit
    ambient_mix = 0.5 + 0.5 * n[1]
    ambient = _AMBIENT_GROUND[:, None] + (_AMBIENT_SKY - _AMBIENT_GROUND)[:, None] * ambient_mix
    ao = np.ones(idx.size)
    if on_floor.any():
        ao[on_floor] = _contact_occlusion(p[:, on_floor], objs)
    diffuse = albedo * (ambient * ao + _SUN_COLOUR[:, None] * ndl)

    half = _normalise(ld - hd)
    spec = np.maximum(_dot(n, half), 0.0)
    for step in range(int(exp2.max())):
        spec = np.where(step < exp2, spec * spec, spec)
    spec = ks * spec * (ndl > 0.0)

    grazing = 1.0 - np.maximum(-_dot(hd, n), 0.0)
    grazing2 = grazing * grazing
    fresnel = np.where(mirror > 0.0, mirror + (1.0 - mirror) * grazing2 * grazing2 * grazing, 0.0)
    shaded = diffuse * (1.0 - fresnel) + _SUN_COLOUR[:, None] * spec
    shiny = fresnel > 0.0
    if shiny.any():
        rn = n[:, shiny]
        rd = hd[:, shiny] - 2.0 * _dot(hd[:, shiny], rn) * rn
        if reflections:
            env, _, _ = _shade(
                p[:, shiny] + rn * 1e-3,
                rd,
                objs,
                sun,
                np.broadcast_to(sun, rd.shape),
                None,
                reflections=False,
            )
        else:
            env = _sky(rd)
        tint = np.where(metallic[shiny], albedo[:, shiny] * 1.05, 1.0)
        shaded[:, shiny] += fresnel[shiny] * tint * env

    fog = np.clip((ht - _FOG_START) / (DEPTH_FAR - _FOG_START), 0.0, 1.0)
    fog = fog * fog
    colour[:, idx] = shaded * (1.0 - fog) + _sky(hd) * fog
    return colour, t, ids


# --------------------------------------------------------------------------------------
# Rendering a scene
# --------------------------------------------------------------------------------------


def _block_average(img: Array, size: int, samples: int) -> Array:
    """Average ``samples x samples`` blocks of a (C, size*samples, size*samples) image."""
    acc = np.zeros((img.shape[0], size, size))
    for i in range(samples):
        for j in range(samples):
            acc = acc + img[:, i::samples, j::samples]
    return acc / float(samples * samples)


def render_scene(
    objs: Sequence[Obj], spec: SceneSpec, size: int = IMAGE_SIZE, samples: int = SUPERSAMPLE
) -> tuple[Array, Array]:
    """Render one scene: uint8 RGB image (size, size, 3) and per-pixel hit-id sets.

    The second result is a (size, size, samples**2) array with the object id seen by
    each subsample of each pixel (-1 sky, 0 floor, k = ``objs[k - 1]``).
    """
    camera = make_camera(spec.camera_azimuth_deg)
    sun = _sun_direction(spec)
    o, d = _primary_rays(camera, size, samples)
    far_t = DEPTH_FAR / _dot(d, camera.forward)
    light_dirs = _light_directions(sun, samples, d.shape[1])
    colour, _, ids = _shade(o, d, objs, sun, light_dirs, far_t, reflections=True)

    n = size * samples
    display = np.sqrt(np.clip(colour, 0.0, 1.0)).reshape(3, n, n)
    rgb = np.floor(_block_average(display, size, samples) * 255.0 + 0.5)
    rgb = np.clip(rgb, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    id_grid = ids.reshape(n, n)
    per_pixel = np.stack(
        [id_grid[i::samples, j::samples] for i in range(samples) for j in range(samples)], axis=-1
    )
    return rgb, per_pixel


def render_depth(objs: Sequence[Obj], spec: SceneSpec, size: int = IMAGE_SIZE) -> Array:
    """16-bit depth map (uint16, (size, size)) from the z-buffer of pixel-centre rays.

    See :data:`DEPTH_CONVENTION`: larger values are nearer, sky = 0.
    """
    camera = make_camera(spec.camera_azimuth_deg)
    o, d = _primary_rays(camera, size, 1)
    cos_axis = _dot(d, camera.forward)
    t, ids = _trace(o, d, objs, DEPTH_FAR / cos_axis)
    z = np.where(ids == _SKY_ID, DEPTH_FAR, t * cos_axis)
    return encode_depth(z).reshape(size, size)


def encode_depth(z: Array) -> Array:
    """Camera-space depth -> uint16 normalised inverse depth (65535 = near, 0 = far)."""
    inv = (1.0 / np.maximum(z, 1e-6) - 1.0 / DEPTH_FAR) / (1.0 / DEPTH_NEAR - 1.0 / DEPTH_FAR)
    return np.floor(np.clip(inv, 0.0, 1.0) * 65535.0 + 0.5).astype(np.uint16)


def decode_depth(v: Array) -> Array:
    """uint16 depth PNG values -> camera-space depth z (``DEPTH_FAR`` where the value is 0)."""
    inv = np.asarray(v, dtype=np.float64) / 65535.0
    return 1.0 / (inv * (1.0 / DEPTH_NEAR - 1.0 / DEPTH_FAR) + 1.0 / DEPTH_FAR)


def _dilate(mask: Array, radius: int) -> Array:
    """Binary dilation of a bool (H, W) mask by a disk of ``radius`` pixels."""
    h, w = mask.shape
    padded = np.zeros((h + 2 * radius, w + 2 * radius), dtype=bool)
    padded[radius : radius + h, radius : radius + w] = mask
    out = np.zeros_like(mask)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx <= radius * radius:
                out |= padded[radius + dy : radius + dy + h, radius + dx : radius + dx + w]
    return out


def _changed_keys(spec: SceneSpec) -> set[str]:
    """Keys of objects that differ between context and target (edited, added or removed)."""
    before = {o.key: o for o in spec.context}
    after = {o.key: o for o in spec.target}
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def edit_kind(spec: SceneSpec) -> str:
    """Kind of the pair's edit: ``recolour``, ``shape``, ``material``, ``remove`` or ``add``."""
    before = {o.key: o for o in spec.context}
    after = {o.key: o for o in spec.target}
    (key,) = _changed_keys(spec)
    if key not in after:
        return "remove"
    if key not in before:
        return "add"
    if before[key].shape != after[key].shape:
        return "shape"
    if before[key].material != after[key].material:
        return "material"
    return "recolour"


def _silhouette(ids: Array, objs: Sequence[Obj], keys: set[str]) -> Array:
    """Pixels where any subsample sees one of the objects named in ``keys``."""
    wanted = [k for k, obj in enumerate(objs, start=1) if obj.key in keys]
    return np.isin(ids, wanted).any(axis=-1)


def render_pair(spec: SceneSpec) -> dict[str, Array]:
    """Render one pair: ``context``/``target`` uint8 (H, W, 3), ``mask`` uint8 (H, W) 0/255,
    ``depth`` uint16 (H, W) of the context scene and ``target_depth`` uint16 (H, W) of the target scene.

    The mask is the union of every pixel where the two uint8 images differ at all and the
    edited object's silhouettes in both scenes, dilated by :data:`MASK_DILATION_PX`, so no
    changed pixel can fall outside it.
    """
    context, ctx_ids = render_scene(spec.context, spec)
    target, tgt_ids = render_scene(spec.target, spec)
    keys = _changed_keys(spec)
    changed = (context != target).any(axis=-1)
    region = changed | _silhouette(ctx_ids, spec.context, keys) | _silhouette(tgt_ids, spec.target, keys)
    mask = _dilate(region, MASK_DILATION_PX).astype(np.uint8) * 255
    depth = render_depth(spec.context, spec)
    target_depth = render_depth(spec.target, spec)
    return {"context": context, "target": target, "mask": mask, "depth": depth, "target_depth": target_depth}


# --------------------------------------------------------------------------------------
# Writing the dataset
# --------------------------------------------------------------------------------------


def _save_png(array: Array, path: Path) -> None:
    """Save an array as PNG with fixed options and no metadata (reproducible bytes)."""
    Image.fromarray(array).save(path, format="PNG", optimize=False, compress_level=9)


README_NAME = "README.md"
PROMPTS_NAME = "prompts.txt"
SUBDIRS = ("context", "target", "masks", "depth", "target_depth")

_README_TEMPLATE = """\
# data_samples: a tiny mask-guided editing dataset

{count} image-editing pairs for the FLUX.1 Kontext LoRA notebooks. Each pair is one small 3-D
scene rendered twice: the **context** image as it is, and the **target** image with exactly one
edit applied. The **mask** marks the region that is allowed to change, the **depth** map
describes the context scene and the **target depth** map the target scene.

## Layout

```
data_samples/
  context/  <stem>.png   {size}x{size} RGB, the source image
  target/   <stem>.png   {size}x{size} RGB, the edited image
  masks/    <stem>.png   {size}x{size} L, 0 or 255; white = editable region
  depth/    <stem>.png   {size}x{size} 16-bit greyscale (PIL mode I;16), depth of the context scene
  target_depth/ <stem>.png  {size}x{size} 16-bit greyscale, depth of the target scene (same encoding)
  prompts.txt            one edit instruction per line, in sorted stem order
  make_samples.py        the renderer that wrote every file here
  README.md              this file (also written by make_samples.py)
```

Stems are `NNNN_<slug>`, so sorting the file names gives the order of `prompts.txt`.

## Pairs

| stem | edit | prompt |
|---|---|---|
{rows}

## How it was made

`make_samples.py` describes every scene by hand (spheres, boxes turned about the vertical axis
and upright cylinders standing on a floor) and ray casts it per pixel with numpy: a pinhole
camera, a sun with soft shadows (shadow rays against the same objects), a sky-and-ground
ambient term with contact darkening on the floor, Lambert diffuse plus a Blinn-Phong highlight,
one bounce of mirror reflection for the glossy and metal materials, a faint floor checker, a sky
gradient and distance fog. Colour images use 2x2 supersampling.

* **Mask**: every pixel where the saved context and target differ in any channel, united with
  the edited object's silhouettes in both images, then dilated by a disk of {dilation} px. So
  no changed pixel (object, shadow, reflection) lies outside the mask.
* **Depth**: one ray through each pixel centre of the context scene; the first hit's
  camera-space depth `z` (distance along the viewing axis) from the z-buffer. The sky and floor
  beyond the far plane count as `z = FAR`.
* **Target depth**: the same for the target scene. It equals the context's depth wherever the
  geometry stays (everywhere for a recolour or material edit) and differs only inside the mask
  where an object is added, removed or reshaped.

## Which depth to give

* The **context's depth** describes the scene as it is. Give it for appearance edits that
  depend on distance (fog, haze, depth of field, "darken the background"): the edit reads how
  far each pixel is, and the geometry does not change.
* The **target's depth** describes the geometry the edit should produce. Give it for geometry
  control, "add it here, in this shape": where a box goes and how big it is, or which shape an
  object becomes, is then in the depth map and nowhere else.
* Either way the convention is **near = bright** (below). Metric depth (far = large, in metres)
  must be inverted first: `kh.estimate_depth(..., invert=True)` or
  `kontext_helpers.images.pil_to_depth_array(img, invert=True)`. Relative inverse depth (MiDaS,
  Depth Anything) is near = bright already and is used as it is.

There is no randomness and no clock. Rerunning gives the same pixels on any machine, and the
same PNG bytes with the same Pillow/zlib build (`tests/test_data_samples.py` checks this).

## Depth convention

**Larger value = nearer** (bright = near, like the relative inverse depth of MiDaS or Depth
Anything). With `z` the camera-space depth, `NEAR = {near}` and `FAR = {far}` (scene units):

```
v = round(65535 * (1/z - 1/FAR) / (1/NEAR - 1/FAR)), clipped to [0, 65535]
z = 1 / (v / 65535 * (1/NEAR - 1/FAR) + 1/FAR)
```

The sky is 0. `make_samples.decode_depth` does the inverse mapping. The images use far more
than 256 distinct levels, so keep them as 16-bit when loading (`np.array(Image.open(path))`
gives `uint16`).

## Rerun

From the repository root:

```
python data_samples/make_samples.py            # rewrite the files in data_samples/
python data_samples/make_samples.py --out DIR  # write the same files elsewhere
python -m pytest tests/test_data_samples.py -q # regenerate into a temp folder and compare
```

Only numpy and Pillow are needed; the whole set renders in well under a minute on two CPU cores.

## What notebook 01 should show

* One row per pair: context | target | mask over the context | depth, with the prompt as title.
* That `|target - context|` is zero everywhere outside the mask (the mask covers the edit,
  its shadow and any reflection of it), and how much of each image the mask covers.
* The mask brought down to the transformer's token grid (512 px -> 64x64 latents -> 32x32
  tokens), to see which tokens the region token and the masked loss treat as editable.
* The depth map with its colour bar, decoded back to `z`, and that bright means near.
* The target depth beside the depth: the same map except inside the mask of an add, remove or
  shape pair.

## Licence

Everything in this folder is generated procedurally by `make_samples.py` from the hand-written
scene descriptions in it; no photographs, textures or third-party assets are involved. The
images, masks, depth maps and prompts are dedicated to the public domain under
[CC0 1.0 Universal](https://creativecommons.org/publicdomain/zero/1.0/): you may copy, modify
and use them for any purpose without asking.
"""


def readme_text() -> str:
    """The dataset's README.md, filled in from the constants and :data:`SCENES`."""
    rows = "\n".join(
        f"| `{stem(i, spec)}` | {edit_kind(spec)} | {spec.prompt} |" for i, spec in enumerate(SCENES)
    )
    return _README_TEMPLATE.format(
        count=len(SCENES),
        size=IMAGE_SIZE,
        rows=rows,
        dilation=MASK_DILATION_PX,
        near=DEPTH_NEAR,
        far=DEPTH_FAR,
    )


def write_dataset(out_dir: str | Path) -> list[str]:
    """Render every pair in :data:`SCENES` into ``out_dir``; return the stems written.

    Writes ``context/``, ``target/``, ``masks/``, ``depth/`` and ``target_depth/`` PNGs, ``prompts.txt`` (one
    prompt per line, in stem order) and ``README.md``.
    """
    out = Path(out_dir)
    for sub in SUBDIRS:
        (out / sub).mkdir(parents=True, exist_ok=True)
    stems: list[str] = []
    for index, spec in enumerate(SCENES):
        name = stem(index, spec)
        pair = render_pair(spec)
        _save_png(pair["context"], out / "context" / f"{name}.png")
        _save_png(pair["target"], out / "target" / f"{name}.png")
        _save_png(pair["mask"], out / "masks" / f"{name}.png")
        _save_png(pair["depth"], out / "depth" / f"{name}.png")
        _save_png(pair["target_depth"], out / "target_depth" / f"{name}.png")
        stems.append(name)
    prompts = "".join(f"{spec.prompt}\n" for spec in SCENES)
    (out / PROMPTS_NAME).write_bytes(prompts.encode("utf-8"))
    (out / README_NAME).write_bytes(readme_text().encode("utf-8"))
    return stems


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python data_samples/make_samples.py [--out DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="output folder (default: the folder holding this script)",
    )
    args = parser.parse_args(argv)
    stems = write_dataset(args.out)
    print(f"wrote {len(stems)} pairs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
