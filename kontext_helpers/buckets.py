"""Notebook 01: aspect-ratio buckets, so that a 4:3 photo trains as a 4:3 image.

FLUX.1 Kontext was trained at a set of preferred resolutions of about one megapixel
(``PREFERRED_KONTEXT_RESOLUTIONS`` in diffusers' ``pipeline_flux_kontext.py``, from 672x1568 to 1568x672).
:func:`bucket_shapes` scales that list to a training resolution's pixel area (``resolution²``), each side a
multiple of 16 (one Flux token); :func:`nearest_bucket` picks a pair's bucket with diffusers' own
``training_utils.find_nearest_bucket``; :func:`bucket_crop_box` is the centred box of the bucket's aspect ratio,
so that resizing it to the bucket never stretches the image (only the sliver between the photo's and the bucket's
aspect ratio is cut).
"""

from __future__ import annotations

PATCH = 16  # pixels per Flux token side: 8x VAE downsampling, then 2x2 packing
KONTEXT_AREA_SIDE = 1024  # the preferred resolutions' pixel area is about 1024 x 1024


def kontext_preferred_resolutions() -> list[tuple[int, int]]:
    """diffusers' ``PREFERRED_KONTEXT_RESOLUTIONS`` as ``(width, height)`` pairs (the list stores width first,
    as ``FluxKontextPipeline.__call__`` reads it: ``_, image_width, image_height = min(...)``)."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    return [(int(w), int(h)) for w, h in PREFERRED_KONTEXT_RESOLUTIONS]


def bucket_shapes(resolution: int) -> list[tuple[int, int]]:
    """The buckets ``(width, height)`` at ``resolution``: Kontext's preferred resolutions scaled to the area
    ``resolution²``, each side rounded to a multiple of 16, repeated shapes dropped, widest last. The square
    ``(resolution, resolution)`` is always one of them."""
    if resolution <= 0 or resolution % PATCH:
        raise ValueError(f"resolution={resolution!r}: a positive multiple of {PATCH} (one Flux token)")
    scale = resolution / KONTEXT_AREA_SIDE
    shapes = {(resolution, resolution)}
    for w, h in kontext_preferred_resolutions():
        shapes.add((max(PATCH, round(w * scale / PATCH) * PATCH), max(PATCH, round(h * scale / PATCH) * PATCH)))
    return sorted(shapes, key=lambda s: (s[0] / s[1], s[0]))


def nearest_bucket(size: tuple[int, int], shapes: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket ``(width, height)`` of ``shapes`` whose aspect ratio is nearest to an image of ``size = (W, H)``,
    chosen by diffusers' ``find_nearest_bucket`` (which takes and returns ``(height, width)``)."""
    from diffusers.training_utils import find_nearest_bucket

    w, h = size
    return shapes[find_nearest_bucket(h, w, [(bh, bw) for bw, bh in shapes])]


def bucket_crop_box(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[float, float, float, float]:
    """The centred box ``(left, top, right, bottom)`` of an image of ``size = (W, H)`` with the bucket's aspect
    ratio: the whole width or the whole height is kept, the other side loses the difference, half on each end."""
    (w, h), (bw, bh) = size, bucket
    if w * bh > h * bw:  # the image is wider than the bucket: keep the height
        keep = h * bw / bh
        return ((w - keep) / 2, 0.0, (w + keep) / 2, float(h))
    keep = w * bh / bw
    return (0.0, (h - keep) / 2, float(w), (h + keep) / 2)


def largest_bucket_tokens(resolution: int) -> int:
    """The most image tokens ``N = H' * W'`` any bucket at ``resolution`` has (the memory plan's worst case)."""
    return max((w // PATCH) * (h // PATCH) for w, h in bucket_shapes(resolution))
