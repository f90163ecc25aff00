"""The ComfyUI node in comfyui/kontext_region: its plain-torch maths against kontext_helpers (always), and ComfyUI's own
Flux model with the node's patch against ``kh.kontext_forward`` (when ComfyUI's source is here: COMFYUI_PATH)."""

import dataclasses
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import kontext_helpers as kh
from kontext_helpers.adapters import _ADAPTER_FIX, _save_depth, _save_region
from kontext_helpers.models import read_safetensors

NODE_DIR = Path(__file__).resolve().parent.parent / "comfyui" / "kontext_region"
KINDS = ("marked", "marked_context", "linear", "cells")
GRIDS = ((8, 8), (6, 10))
NO_COMFYUI = "ComfyUI's source is not here: set COMFYUI_PATH to a ComfyUI checkout to run this test"


def _load(name: str, path: Path, package: bool = False):
    """A module of the node folder loaded by path (the folder is not an installed package)."""
    where = [str(path.parent)] if package else None
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=where)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the package's relative import of region_math needs it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rm():
    """``comfyui/kontext_region/region_math.py``: torch and safetensors only."""
    return _load("kontext_region_math", NODE_DIR / "region_math.py")


@pytest.fixture(scope="module")
def node():
    """The node package ``comfyui/kontext_region`` (its ``__init__.py``)."""
    return _load("kontext_region", NODE_DIR / "__init__.py", package=True)


def _saved_region(kind: str, folder: Path, seed: int = 0, grid=(8, 8), c_in: int = 64):
    """A region module of ``kind`` with seeded non-zero weights, written as ``kh.save_adapter`` writes it."""
    region = kh.make_region_module(kind, *grid, c_in)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in region.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    folder.mkdir(parents=True, exist_ok=True)
    _save_region(region.eval(), str(folder))
    return region, folder


def _pixel_mask(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """``[B, H, W]`` masks (ComfyUI's MASK): a soft random field with a hard rectangle."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(batch, height, width, generator=g) > 0.93).float() * 0.6
    mask[:, height // 5: height // 2, width // 3: width * 3 // 4] = 1.0
    return mask


# --------------------------------------------------------------------------------------------------
# region_math against kontext_helpers (no ComfyUI needed)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h, w", GRIDS)
def test_the_mask_is_pooled_to_the_grid_as_kontext_helpers_pools_it(rm, h, w):
    mask = _pixel_mask(2, 16 * h + 5, 16 * w - 3, seed=h * w)  # sides that are not multiples of the grid
    expected = kh.mask_to_token_grid(mask[:, None], h, w)  # [B, 1, H, W] -> [B, 1, h, w]
    torch.testing.assert_close(rm.mask_to_grid(mask, h, w), expected, msg="a [B, H, W] mask pools differently")
    torch.testing.assert_close(rm.mask_to_grid(mask[:, None], h, w), expected,
                               msg="a [B, 1, H, W] mask pools differently")
    torch.testing.assert_close(rm.mask_to_grid(mask[0], h, w), expected[:1], msg="an [H, W] mask pools differently")


@pytest.mark.parametrize("kind", KINDS)
def test_a_saved_region_file_reads_back_and_gives_kh_apply_region(rm, kind, tmp_path):
    region, folder = _saved_region(kind, tmp_path / "adapter")
    weights = rm.read_region(str(folder))
    assert (weights.kind, weights.h_tok, weights.w_tok, weights.c_in) == (kind, 8, 8, 64), \
        f"the file's kind / grid / c_in read back as {weights}"
    g = torch.Generator().manual_seed(1)
    for h, w in GRIDS:
        ctx = torch.randn(2, h * w, 64, generator=g)
        m_small = kh.mask_to_token_grid(_pixel_mask(2, 16 * h, 16 * w, seed=h)[:, None], h, w)  # [2, 1, h, w]
        got, got_ids = rm.apply_region(weights, ctx, m_small)
        with torch.no_grad():
            expected, expected_ids = kh.apply_region(region, ctx, m_small, h, w)
        torch.testing.assert_close(got, expected, msg=f"{kind} on a {h}x{w} grid: tokens differ from kh.apply_region")
        if expected_ids is None:
            assert got_ids is None, f"{kind} marks the context and appends no ids, got {got_ids}"
        else:
            torch.testing.assert_close(got_ids, expected_ids, msg=f"{kind} on a {h}x{w} grid: ids differ")


def _flux_like_args(img_in, tokens: list, grids: list, batch: int = 2, extra_options=None) -> dict:
    """What ComfyUI's Flux hands a ``post_input`` patch: ``img_in`` of ``[target | references]`` and their ids
    ``[B, S, 3]`` (target type 0, references type 1 placed side by side, as ComfyUI's "offset" method)."""
    ids, col_offset = [], 0
    for k, (h, w) in enumerate(grids):
        grid = torch.zeros(h, w, 3)  # [h, w, 3]
        grid[..., 0] = 0.0 if k == 0 else 1.0
        grid[..., 1] = torch.arange(h, dtype=torch.float32)[:, None]
        grid[..., 2] = torch.arange(w, dtype=torch.float32)[None, :] + col_offset
        col_offset += w if k > 0 else 0  # a second reference sits right of the first
        ids.append(grid.reshape(h * w, 3))  # [h, w, 3] -> [h*w, 3]
    img_ids = torch.cat(ids)[None].expand(batch, -1, -1)  # [S, 3] -> [B, S, 3]
    with torch.no_grad():
        img = img_in(torch.cat(tokens, dim=1))  # [B, S, D]
    args = {"img": img, "txt": torch.zeros(batch, 3, img.shape[-1]), "img_ids": img_ids,
            "txt_ids": torch.zeros(batch, 3, 3)}
    if extra_options is not None:
        args["transformer_options"] = extra_options
    return args


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("two_references", [False, True])
def test_the_post_input_patch_equals_img_in_of_the_region_context(rm, kind, two_references, tmp_path):
    """Through ``img_in``: ``img_in(x + m e) = img_in(x) + m W e`` and appended tokens ``img_in(t)``, ids at the end."""
    region, folder = _saved_region(kind, tmp_path / "adapter", seed=3)
    img_in = torch.nn.Linear(64, 48)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        img_in.weight.copy_(torch.randn(48, 64, generator=g) * 0.2)
        img_in.bias.copy_(torch.randn(48, generator=g))
    (h, w), other_grid = (6, 10), (4, 4)
    tgt_grid = (h, w) if kind == "marked" else (4, 6)  # "marked" marks the target too: on the context's grid
    tgt = torch.randn(2, tgt_grid[0] * tgt_grid[1], 64, generator=g)
    ctx = torch.randn(2, h * w, 64, generator=g)
    other = torch.randn(2, 16, 64, generator=g)
    refs, grids = ([ctx, other], [tgt_grid, (h, w), other_grid]) if two_references else ([ctx], [tgt_grid, (h, w)])
    options = {"reference_image_num_tokens": [h * w, 16]} if two_references else None
    args = _flux_like_args(img_in, [tgt, *refs], grids, extra_options=options)
    mask = _pixel_mask(1, 16 * h, 16 * w, seed=5)  # one mask for the whole batch
    out = rm.RegionPatch(rm.read_region(str(folder)), mask, img_in)(args)

    m_small = kh.mask_to_token_grid(mask[:, None], h, w).expand(2, -1, -1, -1)  # [2, 1, h, w]
    with torch.no_grad():
        cond, extra_ids, offset = kh.region_inputs(region, ctx, m_small, h, w)
        tgt = tgt if offset is None else tgt + offset
        parts = [tgt, cond[:, : h * w], *refs[1:], cond[:, h * w:]]  # appended tokens go after every reference
        expected = img_in(torch.cat(parts, dim=1))  # [2, S (+K), 48]
    torch.testing.assert_close(out["img"], expected,
                               msg=f"{kind}: the patched tokens are not img_in of the region context")
    expected_ids = args["img_ids"]
    if extra_ids is not None:
        expected_ids = torch.cat([expected_ids, extra_ids[None].expand(2, -1, -1)], dim=1)  # -> [2, S + K, 3]
    torch.testing.assert_close(out["img_ids"], expected_ids, msg=f"{kind}: the image ids after the patch differ")
    assert out["txt"] is args["txt"] and out["txt_ids"] is args["txt_ids"], "the patch must leave the text alone"


def test_the_patch_leaves_a_batch_without_reference_tokens_alone(rm, tmp_path):
    _, folder = _saved_region("cells", tmp_path / "adapter")
    img_in = torch.nn.Linear(64, 48)
    args = _flux_like_args(img_in, [torch.randn(1, 16, 64)], [(4, 4)], batch=1)
    out = rm.RegionPatch(rm.read_region(str(folder)), torch.ones(1, 64, 64), img_in)(args)
    assert out is args, "without reference (type 1) tokens there is no context to mark: the patch must pass through"


def test_read_region_refuses_a_file_save_adapter_did_not_write(rm, tmp_path):
    save_file({"embedding": torch.zeros(64)}, str(tmp_path / "region_token.safetensors"))
    with pytest.raises(ValueError, match="metadata"):
        rm.read_region(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rm.read_region(str(tmp_path / "missing"))


class _FakePatcher:
    """The part of ComfyUI's ModelPatcher the node uses (clone, get_model_object, set_model_post_input_patch)."""

    def __init__(self, diffusion_model, model_options=None):
        self.model = SimpleNamespace(diffusion_model=diffusion_model)
        self.model_options = model_options or {"transformer_options": {}}

    def clone(self):
        options = {"transformer_options": {k: dict(v) if isinstance(v, dict) else v
                                           for k, v in self.model_options["transformer_options"].items()}}
        return _FakePatcher(self.model.diffusion_model, options)

    def get_model_object(self, name):
        return getattr(self.model, name)

    def set_model_post_input_patch(self, patch):
        patches = self.model_options["transformer_options"].setdefault("patches", {})
        patches["post_input"] = patches.get("post_input", []) + [patch]


def test_the_node_patches_a_clone_and_checks_the_file(node, tmp_path):
    _, folder = _saved_region("marked_context", tmp_path / "adapter")
    assert node.NODE_CLASS_MAPPINGS["KontextRegionApply"] is node.KontextRegionApply, "the node is not registered"
    assert set(node.KontextRegionApply.INPUT_TYPES()["required"]) == {"model", "mask", "region_file"}, \
        "the node's inputs changed"
    model = _FakePatcher(SimpleNamespace(img_in=torch.nn.Linear(64, 32)))
    (patched,) = node.KontextRegionApply().apply(model, torch.ones(1, 32, 32), str(folder))
    patches = patched.model_options["transformer_options"]["patches"]["post_input"]
    assert len(patches) == 1 and patches[0].region.kind == "marked_context", f"post_input patches: {patches}"
    assert "patches" not in model.model_options["transformer_options"], "the input MODEL must stay unpatched"
    region_file = str(folder / "region_token.safetensors")
    (from_file,) = node.KontextRegionApply().apply(model, torch.ones(1, 32, 32), region_file)
    assert "post_input" in from_file.model_options["transformer_options"]["patches"], "a file path must work too"
    flux2_like = _FakePatcher(SimpleNamespace(img_in=torch.nn.Linear(128, 32)))
    with pytest.raises(ValueError, match="another model"):
        node.KontextRegionApply().apply(flux2_like, torch.ones(1, 32, 32), str(folder))
    with pytest.raises(FileNotFoundError):
        node.KontextRegionApply().apply(model, torch.ones(1, 32, 32), str(tmp_path / "nothing_here.safetensors"))


@pytest.mark.parametrize("which", ["region", "depth"])
def test_both_nodes_name_a_damaged_file_as_the_package_does(node, damage_file, tmp_path, which):
    """``read_module_file``, the nodes' one reader: a damaged file is the package's ``ValueError`` (same words:
    the file, safetensors' complaint, what to do), and the input MODEL stays unpatched."""
    if which == "region":
        _, folder = _saved_region("marked", tmp_path / "adapter")
        name, apply, picture = kh.REGION_WEIGHT_FILE, node.KontextRegionApply().apply, torch.ones(1, 32, 32)
    else:
        _, folder = _saved_depth(tmp_path / "adapter")
        name, apply, picture = kh.DEPTH_WEIGHT_FILE, node.KontextDepthApply().apply, _depth_image(1, 32, 32, 0)
    file = damage_file(folder / name)
    with pytest.raises(ValueError) as package:
        read_safetensors(str(file), _ADAPTER_FIX)
    model = _FakePatcher(SimpleNamespace(img_in=torch.nn.Linear(64, 32)))
    for source in (str(folder), str(file)):  # the adapter folder, or the file itself
        with pytest.raises(ValueError) as err:
            apply(model, picture, source)
        assert str(err.value) == str(package.value), f"the node must say what the package says: {err.value}"
        assert f"{file} is damaged" in str(err.value) and "kh.save_adapter" in str(err.value), f"{err.value}"
    assert "patches" not in model.model_options["transformer_options"], "the input MODEL must stay unpatched"


# --------------------------------------------------------------------------------------------------
# ComfyUI's own Flux model with the node's patch (needs ComfyUI's source)
# --------------------------------------------------------------------------------------------------


def _import_comfy():
    """ComfyUI's modules the test uses; a missing third-party dependency of ComfyUI skips."""
    if not torch.cuda.is_available():  # ComfyUI's model management wants --cpu on a machine without CUDA
        try:
            importlib.import_module("comfy.cli_args").args.cpu = True
        except ModuleNotFoundError:
            pass
    try:
        names = ("comfy.ldm.flux.model", "comfy.model_patcher", "comfy.ops", "comfy.utils")
        flux, patcher, ops, utils = (importlib.import_module(n) for n in names)
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] != "comfy":
            pytest.skip(f"ComfyUI's source is here but its dependency {err.name!r} is not installed")
        raise
    return SimpleNamespace(flux=flux, patcher=patcher, ops=ops, utils=utils)


@pytest.fixture(scope="module")
def comfy():
    """ComfyUI's source from COMFYUI_PATH (a checkout) or an importable ``comfy``; skipped when neither is here."""
    path = os.environ.get("COMFYUI_PATH")
    added = None
    if path:
        if not (Path(path) / "comfy" / "ldm" / "flux" / "model.py").is_file():
            pytest.skip(f"COMFYUI_PATH={path} has no comfy/ldm/flux/model.py: it is not a ComfyUI checkout")
        if path not in sys.path:
            sys.path.append(path)  # after everything else: ComfyUI's top-level modules must not shadow others
            added = path
    elif importlib.util.find_spec("comfy") is None:
        pytest.skip(NO_COMFYUI)
    yield _import_comfy()
    if added is not None:
        sys.path.remove(added)


def _comfy_state_dict(comfy, transformer, flux) -> dict:
    """The diffusers transformer's weights under ComfyUI's (BFL) names, with ComfyUI's own ``flux_to_diffusers``
    map: fused ``qkv`` / ``linear1`` weights are filled row block by row block."""
    cfg = transformer.config
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    key_map = comfy.utils.flux_to_diffusers({"depth": cfg.num_layers, "depth_single_blocks": cfg.num_single_layers,
                                             "hidden_size": hidden}, output_prefix="")
    target = flux.state_dict()
    out, rows_filled = {}, {}
    for key, value in transformer.state_dict().items():
        entry = key_map.get(key)
        assert entry is not None, f"ComfyUI's flux_to_diffusers has no entry for the diffusers key {key}"
        name, rows, convert = (entry, None, None) if isinstance(entry, str) else (tuple(entry) + (None,))[:3]
        if name not in target and name.endswith(".scale"):
            name = name[: -len(".scale")] + ".weight"  # RMSNorm's weight in newer ComfyUI (renamed when it loads)
        value = convert(value) if convert is not None else value
        if rows is None:
            out[name] = value
            continue
        dim, offset, size = rows
        out.setdefault(name, torch.zeros_like(target[name])).narrow(dim, offset, size).copy_(value)  # one fused part
        rows_filled[name] = rows_filled.get(name, 0) + size
    partial = {n: (k, target[n].shape[0]) for n, k in rows_filled.items() if k != target[n].shape[0]}
    assert not partial, f"fused weights not filled completely (rows filled, rows): {partial}"
    return out


@pytest.fixture(scope="module")
def models(comfy):
    """The tiny diffusers transformer (no IP-Adapter) and ComfyUI's Flux built with its configuration and weights."""
    transformer = kh.load_pipeline("tiny", ip_adapter=None).transformer.eval()
    cfg = transformer.config
    params = dict(in_channels=cfg.in_channels // 4, out_channels=cfg.in_channels // 4,
                  vec_in_dim=cfg.pooled_projection_dim, context_in_dim=cfg.joint_attention_dim,
                  hidden_size=cfg.num_attention_heads * cfg.attention_head_dim, mlp_ratio=4.0,
                  num_heads=cfg.num_attention_heads, depth=cfg.num_layers, depth_single_blocks=cfg.num_single_layers,
                  axes_dim=list(cfg.axes_dims_rope), theta=10000, patch_size=2, qkv_bias=True,
                  guidance_embed=cfg.guidance_embeds, txt_ids_dims=[])
    fields = {f.name for f in dataclasses.fields(comfy.flux.FluxParams)}  # the parameters of this ComfyUI version
    flux = comfy.flux.Flux(image_model="flux", dtype=torch.float32, device="cpu",
                           operations=comfy.ops.disable_weight_init, **{k: v for k, v in params.items() if k in fields})
    flux.load_state_dict(_comfy_state_dict(comfy, transformer, flux), strict=True)
    return transformer, flux.eval()


def _inputs(h: int, w: int):
    """Noisy target and context tokens ``[1, N, 64]``, text ``[1, 8, 64]``, pooled ``[1, 32]``, sigma, mask."""
    g = torch.Generator().manual_seed(7)
    return SimpleNamespace(noisy=torch.randn(1, h * w, 64, generator=g), ctx=torch.randn(1, h * w, 64, generator=g),
                           text=torch.randn(1, 8, 64, generator=g), pooled=torch.randn(1, 32, generator=g),
                           txt_ids=torch.zeros(8, 3), sigma=torch.tensor([0.7]), guidance=2.5,
                           mask=_pixel_mask(1, 16 * h, 16 * w, seed=8))


def _kh_forward(transformer, x, h: int, w: int, region=None) -> torch.Tensor:
    """``kh.kontext_forward`` on ``[target | context (+ region)]`` after ``kh.region_inputs``: ``[1, N, 64]``."""
    noisy, ctx, extra, ids = x.noisy, x.ctx, None, None
    if region is not None:
        cond, ids, offset = kh.region_inputs(region, x.ctx, kh.mask_to_token_grid(x.mask[:, None], h, w), h, w)
        ctx, extra = (cond, None) if ids is None else (cond[:, : h * w], cond[:, h * w:])
        noisy = noisy if offset is None else noisy + offset  # "marked"
    return kh.kontext_forward(transformer, noisy, ctx, extra, sigma=x.sigma, prompt_embeds=x.text,
                              pooled_prompt_embeds=x.pooled, txt_ids=x.txt_ids, h_tok=h, w_tok=w, guidance=x.guidance,
                              region_ids=ids)


def _comfy_forward(flux, x, h: int, w: int, transformer_options: dict) -> torch.Tensor:
    """ComfyUI's Flux on the latents ``[1, 16, 2h, 2w]`` with the context as a Kontext reference latent -> packed."""
    out = flux(kh.unpack_like_pipeline(x.noisy, h, w), x.sigma, x.text, y=x.pooled,
               guidance=torch.tensor([x.guidance]), ref_latents=[kh.unpack_like_pipeline(x.ctx, h, w)],
               transformer_options=transformer_options)  # [1, 16, 2h, 2w]
    return kh.pack_like_pipeline(out)[0]  # -> [1, N, 64]


@pytest.mark.parametrize("kind", KINDS)
def test_comfyui_flux_with_the_node_matches_kontext_forward(comfy, models, node, kind, tmp_path):
    transformer, flux = models
    region, folder = _saved_region(kind, tmp_path / "adapter", seed=11)
    h, w = 4, 6
    x = _inputs(h, w)
    holder = torch.nn.Module()
    holder.diffusion_model = flux
    model = comfy.patcher.ModelPatcher(holder, torch.device("cpu"), torch.device("cpu"))
    (patched,) = node.KontextRegionApply().apply(model, x.mask, str(folder))
    with torch.no_grad():
        plain = _comfy_forward(flux, x, h, w, {})
        plain_kh = _kh_forward(transformer, x, h, w)
        got = _comfy_forward(flux, x, h, w, patched.model_options["transformer_options"])
        expected = _kh_forward(transformer, x, h, w, region)
    base_gap = float((plain - plain_kh).abs().max())
    assert base_gap < 1e-4, f"ComfyUI's Flux and the diffusers transformer differ without a region: {base_gap:.2e}"
    gap = float((got - expected).abs().max())
    assert gap < 1e-4, f"{kind}: ComfyUI with the node differs from kh.kontext_forward + kh.apply_region by {gap:.2e}"
    effect = float((expected - plain_kh).abs().max())
    assert effect > 1e-3, f"{kind}: the region signal barely changes the output ({effect:.2e}); the test proves nothing"


# --------------------------------------------------------------------------------------------------
# the depth node: depth_math against kontext_helpers, and inside ComfyUI's own Flux
# --------------------------------------------------------------------------------------------------


def _saved_depth(folder: Path, seed: int = 0, on_context: bool = True, c_in: int = 64):
    """A ``"tokens"`` depth module with seeded non-zero weights, written as ``kh.save_adapter`` writes it."""
    module = kh.DepthTokenEmbedding(c_in, on_context=on_context)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    folder.mkdir(parents=True, exist_ok=True)
    _save_depth(module.eval(), str(folder), "target")
    return module, folder


def _depth_image(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """ComfyUI's IMAGE ``[B, H, W, 3]``: a grey depth picture (R = G = B), a ramp with a near box."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.1, 0.6, height)[:, None].expand(height, width).clone()  # [H, W]
    ramp[height // 4: height // 2, width // 3: width // 2] = 0.95
    grey = (ramp[None] + 0.02 * torch.rand(batch, height, width, generator=g)).clamp(0, 1)  # [B, H, W]
    return grey[..., None].expand(-1, -1, -1, 3).contiguous()  # [B, H, W] -> [B, H, W, 3]


@pytest.mark.parametrize("size", [(96, 160), (100, 171)])
def test_depth_features_equal_kh_depth_token_features(node, size):
    image = _depth_image(1, *size, seed=1)
    got = node.depth_math.depth_features(image, 6, 10)
    expected = kh.depth_token_features(image[0, ..., 0][None], 6, 10)  # [1, H, W] -> [1, N, 256]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6,
                               msg=f"a {size} depth IMAGE gives other features than kh.depth_token_features")
    with pytest.raises(ValueError, match="aspect"):
        node.depth_math.depth_features(_depth_image(1, 96, 96, seed=1), 6, 10)


@pytest.mark.parametrize("on_context", [True, False])
def test_the_depth_patch_equals_img_in_of_the_offset_tokens(node, on_context, tmp_path):
    module, folder = _saved_depth(tmp_path / "adapter", seed=2, on_context=on_context)
    weights = node.depth_math.read_depth(str(folder))
    assert (weights.c_in, weights.patch, weights.on_context, weights.source) == (64, 16, on_context, "target"), \
        f"the depth file read back as {weights}"
    img_in = torch.nn.Linear(64, 48)
    g = torch.Generator().manual_seed(4)
    h, w = 6, 10
    tgt, ctx = torch.randn(2, h * w, 64, generator=g), torch.randn(2, h * w, 64, generator=g)
    args = _flux_like_args(img_in, [tgt, ctx], [(h, w), (h, w)])
    image = _depth_image(1, 16 * h, 16 * w, seed=3)  # one depth map for the whole batch
    out = node.depth_math.DepthPatch(weights, image, img_in)(args)
    with torch.no_grad():
        offset, ctx_offset = kh.depth_inputs(module, kh.depth_token_features(image[0, ..., 0][None], h, w))
        ctx = ctx if ctx_offset is None else ctx + ctx_offset
        expected = img_in(torch.cat([tgt + offset, ctx], dim=1))  # [2, 2N, 48]
    torch.testing.assert_close(out["img"], expected, rtol=1e-5, atol=1e-5,
                               msg=f"on_context={on_context}: the patched tokens are not img_in of the offset tokens")
    assert out["img_ids"] is args["img_ids"], "the depth patch adds no tokens and leaves the ids alone"
    small = _flux_like_args(img_in, [torch.randn(2, 4, 64), ctx], [(2, 2), (h, w)])
    with pytest.raises(ValueError, match="token grid"):
        node.depth_math.DepthPatch(weights, image, img_in)(small)


def test_the_depth_node_patches_a_clone_and_checks_the_file(node, tmp_path):
    _, folder = _saved_depth(tmp_path / "adapter")
    assert set(node.NODE_CLASS_MAPPINGS) == {"KontextRegionApply", "KontextDepthApply"}, "the nodes registered"
    assert set(node.KontextDepthApply.INPUT_TYPES()["required"]) == {"model", "depth", "depth_file"}, \
        "the depth node's inputs changed"
    model = _FakePatcher(SimpleNamespace(img_in=torch.nn.Linear(64, 32)))
    (patched,) = node.KontextDepthApply().apply(model, _depth_image(1, 32, 32, 0), str(folder))
    patches = patched.model_options["transformer_options"]["patches"]["post_input"]
    assert len(patches) == 1 and isinstance(patches[0], node.depth_math.DepthPatch), f"post_input: {patches}"
    assert "patches" not in model.model_options["transformer_options"], "the input MODEL must stay unpatched"
    with pytest.raises(ValueError, match="another model"):
        node.KontextDepthApply().apply(_FakePatcher(SimpleNamespace(img_in=torch.nn.Linear(128, 32))),
                                       _depth_image(1, 32, 32, 0), str(folder))
    _, region_only = _saved_region("marked", tmp_path / "region_only")
    with pytest.raises(FileNotFoundError, match="depth_module.safetensors"):
        node.KontextDepthApply().apply(model, _depth_image(1, 32, 32, 0), str(region_only))


@pytest.mark.parametrize("region_kind", [None, "marked", "cells"])
def test_comfyui_flux_with_the_depth_node_matches_kontext_forward(comfy, models, node, region_kind, tmp_path):
    transformer, flux = models
    depth_module, folder = _saved_depth(tmp_path / "adapter", seed=12)
    region = None
    if region_kind is not None:
        region, folder = _saved_region(region_kind, folder, seed=11)
    h, w = 4, 6
    x = _inputs(h, w)
    image = _depth_image(1, 16 * h, 16 * w, seed=9)
    holder = torch.nn.Module()
    holder.diffusion_model = flux
    model = comfy.patcher.ModelPatcher(holder, torch.device("cpu"), torch.device("cpu"))
    if region is not None:
        (model,) = node.KontextRegionApply().apply(model, x.mask, str(folder))
    (patched,) = node.KontextDepthApply().apply(model, image, str(folder))
    with torch.no_grad():
        offset, ctx_offset = kh.depth_inputs(depth_module, kh.depth_token_features(image[0, ..., 0][None], h, w))
        shifted = SimpleNamespace(**{**vars(x), "noisy": x.noisy + offset, "ctx": x.ctx + ctx_offset})
        got = _comfy_forward(flux, x, h, w, patched.model_options["transformer_options"])
        expected = _kh_forward(transformer, shifted, h, w, region)
        without = _kh_forward(transformer, x, h, w, region)
    gap = float((got - expected).abs().max())
    assert gap < 1e-4, f"depth + region {region_kind}: ComfyUI with the nodes != kh.kontext_forward: {gap:.2e}"
    effect = float((expected - without).abs().max())
    assert effect > 1e-3, f"the depth signal barely changes the output ({effect:.2e}); the test proves nothing"
