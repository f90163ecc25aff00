"""Aspect-ratio buckets: the shapes come from diffusers' Kontext resolutions, each pair is read at its nearest bucket
without stretching, every batch holds one bucket, and training, the region kinds and the depth tokens work there."""

import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
from diffusers.training_utils import find_nearest_bucket

import kontext_helpers as kh


def test_the_buckets_at_1024_are_kontexts_preferred_resolutions():
    assert set(kh.bucket_shapes(1024)) == {(w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS}, (
        "at 1024 px the buckets are diffusers' PREFERRED_KONTEXT_RESOLUTIONS, (width, height) as __call__ reads them")
    for resolution in (128, 512, 768):
        shapes = kh.bucket_shapes(resolution)
        assert (resolution, resolution) in shapes, f"{resolution}: the square is a bucket"
        assert all(w % 16 == 0 and h % 16 == 0 for w, h in shapes), f"{resolution}: whole tokens only: {shapes}"
        areas = [w * h / resolution**2 for w, h in shapes]
        assert 0.9 <= min(areas) and max(areas) <= 1.1, f"{resolution}: each bucket has the pixel area: {areas}"
        ratios = [w / h for w, h in shapes]
        assert ratios == sorted(ratios) and ratios[0] < 0.5 < 2 < ratios[-1], f"{resolution}: portrait to landscape"


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (1920, 1080), (500, 500), (1000, 999), (300, 900)])
def test_the_nearest_bucket_is_diffusers_find_nearest_bucket(size):
    shapes = kh.bucket_shapes(512)
    w, h = size
    expected = shapes[find_nearest_bucket(h, w, [(bh, bw) for bw, bh in shapes])]
    assert kh.nearest_bucket(size, shapes) == expected, f"{size}: diffusers picks {expected}"
    bw, bh = expected
    others = [abs(w / h - sw / sh) for sw, sh in shapes]
    assert abs(w / h - bw / bh) <= min(others) * 1.35 + 1e-9, f"{size}: {expected} is near its aspect ratio"


def test_the_crop_box_keeps_the_bucket_aspect_and_cuts_only_the_sliver():
    for size, bucket in (((640, 480), (144, 112)), ((480, 640), (112, 144)), ((1920, 1080), (176, 96))):
        left, top, right, bottom = kh.bucket_crop_box(size, bucket)
        w, h = right - left, bottom - top
        assert abs(w / h - bucket[0] / bucket[1]) < 1e-9, f"{size} -> {bucket}: the box has the bucket's aspect"
        assert (w == size[0] or h == size[1]), f"{size}: one whole side is kept"
        assert abs(left - (size[0] - right)) < 1e-9 and abs(top - (size[1] - bottom)) < 1e-9, "the box is centred"
        assert w * h >= 0.9 * size[0] * size[1], f"{size} -> {bucket}: at most a sliver is cut ({w}x{h})"


def _edge_pairs(tmp_path):
    """Three photos (4:3, 3:4, 16:9), each with a mask band and a depth band at its left edge, 10 px wide."""
    contexts, targets, masks, depths = [], [], [], []
    for w, h in ((192, 144), (144, 192), (192, 108)):
        band = torch.zeros(1, h, w)
        band[:, :, :10] = 1.0
        contexts.append(torch.full((3, h, w), 0.5))
        targets.append(torch.cat([band, torch.zeros(2, h, w)]).clamp(0, 1) * 0.9 + 0.05)
        masks.append(band)
        depths.append(band * 0.8 + 0.1)
    return kh.write_pair_folder(tmp_path / "edge", contexts, targets, masks, depths, ["a", "b", "c"],
                                names=["landscape", "portrait", "wide"], resolution=128)


def test_a_mixed_folder_reads_each_pair_at_its_bucket_with_everything_aligned(tmp_path):
    pairs = _edge_pairs(tmp_path)
    assert pairs.resize == "bucket", "buckets are the default: mixed photos train without distortion"
    assert pairs.buckets == {(112, 144): 1, (144, 112): 1, (176, 96): 1}, f"counts per shape: {pairs.buckets}"
    assert "144x112: 1" in repr(pairs), f"the repr reports the buckets: {pairs!r}"
    for i, name in enumerate(pairs.names):
        item, (w, h) = pairs[i], pairs.bucket_of(i)
        for part in ("context", "target", "mask", "depth"):
            assert item[part].shape[-2:] == (h, w), f"{name}: {part} is {tuple(item[part].shape)}, bucket {w}x{h}"
        mask_cols = item["mask"][0].amax(0)  # [W]: columns where the band lies
        depth_cols = (item["depth"][0].amax(0) > 0.5).float()
        red_cols = (item["target"][0].amax(0) > 0.5).float()
        assert mask_cols[0] == 1 and mask_cols[w // 2:].sum() == 0, f"{name}: the edge band is kept at the left"
        torch.testing.assert_close(depth_cols, mask_cols, msg=f"{name}: depth is cut and resized like the mask")
        torch.testing.assert_close(red_cols, mask_cols, msg=f"{name}: the target is cut and resized like the mask")


def test_resize_names_the_three_policies_and_refuses_others(tmp_path):
    pairs = _edge_pairs(tmp_path)
    assert kh.RESIZE_POLICIES == ("bucket", "square", "crop"), f"the policies, default first: {kh.RESIZE_POLICIES}"
    with pytest.raises(ValueError, match="resize='stretch': use 'bucket'"):
        kh.KontextPairs(pairs.root, 128, resize="stretch")


def test_crop_loses_the_edge_masks_that_buckets_keep(tmp_path):
    pairs = _edge_pairs(tmp_path)
    cropped = kh.KontextPairs(pairs.root, 128, resize="crop")
    kept = {name: float(cropped[i]["mask"].sum()) for i, name in enumerate(cropped.names)}
    assert kept["landscape"] == 0 and kept["wide"] == 0, f"the centre square cuts the left band away: {kept}"
    assert all(float(pairs[i]["mask"].sum()) > 0 for i in range(len(pairs))), "buckets keep every band"
    squared = kh.KontextPairs(pairs.root, 128, resize="square")
    assert squared.buckets == {(128, 128): 3}, f"'square' is one bucket: {squared.buckets}"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, sample_data):
    """Four sample pairs cut to 4:3, 3:4, 16:9 and 1:1, read with buckets at 64 px, and their cache."""
    square = kh.KontextPairs(sample_data, 128, resize="square")
    items = [kh.crop_to_aspect(square[i], a) for i, a in enumerate(((4, 3), (3, 4), (16, 9), (1, 1)))]
    parts = [[it[k] for it in items] for k in ("context", "target", "mask", "depth", "prompt")]
    pairs = kh.write_pair_folder(tmp_path_factory.mktemp("mixed") / "data", *parts, resolution=64)
    pipe = kh.load_pipeline("tiny", seed=0)
    cache = kh.build_train_cache(pipe, pairs, max_sequence_length=16, progress=False)
    return pairs, pipe, cache


def test_the_cache_keeps_each_sample_on_its_buckets_token_grid(mixed):
    pairs, _, cache = mixed
    for i in range(len(pairs)):
        w, h = pairs.bucket_of(i)
        sample = cache.samples[i]
        assert cache.grid_of(i) == (h // 16, w // 16), f"sample {i}: grid {cache.grid_of(i)} for a {w}x{h} bucket"
        n = (h // 16) * (w // 16)
        assert sample.tgt_tok.shape[1] == sample.depth_feat.shape[1] == n, f"sample {i}: {n} tokens everywhere"
    with pytest.raises(ValueError, match="one bucket"):
        cache.batch([0, 1])


@pytest.mark.parametrize("kind", [*kh.REGION_KINDS, "none"])
def test_every_region_kind_trains_at_a_non_square_bucket(mixed, kind):
    _, pipe, cache = mixed
    index = next(i for i in range(len(cache.samples)) if cache.grid_of(i)[0] != cache.grid_of(i)[1])
    h_tok, w_tok = cache.grid_of(index)
    c_in = pipe.transformer.config.in_channels
    region = None if kind == "none" else kh.make_region_module(kind, 4, 4, c_in)  # built on the square grid
    depth = kh.DepthTokenEmbedding(c_in)
    with torch.no_grad():
        depth.proj.weight.normal_(0, 0.01)
    noise = torch.randn(1, h_tok * w_tok, c_in, generator=torch.Generator().manual_seed(0))
    loss, _ = kh.training_loss(pipe.transformer, region, cache.batch([index]), cache.txt_ids, h_tok, w_tok, noise,
                               torch.tensor([0.6]), kh.TrainConfig(), depth_module=depth)
    loss.backward()
    assert torch.isfinite(loss), f"{kind}: the loss at a {h_tok}x{w_tok} grid is finite"
    trained = [*(region.parameters() if region is not None else []), *depth.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained), f"{kind}: every module learns there"


def test_training_runs_every_batch_at_its_own_grid(mixed, tmp_path):
    pairs, _, _ = mixed
    pipe = kh.load_pipeline("tiny", seed=0)
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["hidden_states"].shape[:2]),
                                               with_kwargs=True)
    cfg = kh.TrainConfig(resolution=64, steps=4, batch_size=1, rank=4, max_sequence_length=16, checkpoint_every=0,
                         output_dir=str(tmp_path / "run"), seed=3, preview_every=0)
    result = kh.train(pipe, pairs, cfg, progress=False)
    assert len(result.history) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    grids = {cache_grid for cache_grid in (pairs.bucket_of(i) for i in range(len(pairs)))}
    tokens = {n for _, n in seen}
    assert len(tokens) >= 2, f"batches at several buckets, not one resized square: token counts {tokens} of {grids}"
