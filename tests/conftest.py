"""Shared fixtures: tiny pipelines, the sample data, small datasets and configs, images, sampling, a trained adapter."""

import importlib.util
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import kontext_helpers as kh  # noqa: E402

DATASET_FOLDERS = ("context", "target", "masks", "depth")
# LoRA targets spelt out (not a preset name), so the expected ComfyUI keys in test_adapters.py stay valid if
# presets change
ATTN_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")


# --------------------------------------------------------------------------------------------------
# the machine and the repository
# --------------------------------------------------------------------------------------------------


FIRST = ("test_rehearsal", "test_notebooks")  # the longest modules: started first under `make test`'s -n 2


def pytest_collection_modifyitems(items):
    """The longest modules first: ``make test`` runs ``-n 2 --dist loadfile`` (each module in one process, its
    fixtures built once), and two long modules started last would leave one core idle at the end."""
    items.sort(key=lambda item: item.module.__name__ not in FIRST)  # stable: the order within a module stays


def load_script(name: str):
    """``scripts/<name>.py`` as a module (the scripts are not a package)."""
    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def script_module():
    """``script_module(name)``: ``scripts/<name>.py`` as a module."""
    return load_script


@pytest.fixture(scope="session")
def notebook_runner():
    """``scripts/run_notebooks.py`` as a module: ``run_notebook(path, out_dir)`` executes one notebook."""
    return load_script("run_notebooks")


@pytest.fixture(scope="session", autouse=True)
def one_cpu_thread():
    """The tiny model's matrices are so small that thread start-up dominates, and two OpenMP threads on a
    busy 2-core machine can be tens of times slower than one. Subprocess tests set OMP_NUM_THREADS=1 too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def repo_root():
    """The repository root: the working directory of subprocess tests."""
    return Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def sample_data(repo_root):
    """The committed sample dataset, ``data_samples/``."""
    return repo_root / "data_samples"


@pytest.fixture()
def subprocess_env():
    """The environment of a test's subprocess: offline, one OpenMP thread."""
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


# --------------------------------------------------------------------------------------------------
# pipelines
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def rehearsal_root(tmp_path_factory):
    """FLUX.1 Kontext [dev] at real width, one block each (``kh.build_rehearsal_model``), written once per
    session and removed afterwards (2.2 GB): the notebooks' GPU path and ``tests/test_rehearsal.py`` share it."""
    folder = tmp_path_factory.mktemp("rehearsal") / "kontext-dev-rehearsal"
    kh.build_rehearsal_model(folder, progress=False)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_pipe():
    """A shared tiny FluxKontextPipeline with IP-Adapter and the shipped pretrained weights (what a CPU user gets;
    the oracle tests compare it with diffusers' own functions, which hold for any weights). Tests must not modify
    it; build a fresh one to do so. Tests of the random-weight variant use ``load_pipeline("tiny", pretrained=False)``.
    """
    return kh.load_pipeline("tiny", seed=0)


@pytest.fixture()
def fresh_pipe():
    """A pretrained tiny pipeline of its own that the test may modify: add a LoRA, train it, change scales."""
    return kh.load_pipeline("tiny", seed=0)


@pytest.fixture(scope="session")
def pipe_call():
    """``pipe(image=..., prompt=...)`` at 64x64 for 3 steps, returning packed latents ``[1, 16, 64]``."""

    def call(pipe, img, **kw):
        return pipe(image=img, prompt="make the red sphere blue", height=64, width=64, max_area=64 * 64,
                    num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="latent",
                    _auto_resize=False, **kw).images

    return call


# --------------------------------------------------------------------------------------------------
# datasets and training configs
# --------------------------------------------------------------------------------------------------


class OnePair(torch.utils.data.Dataset):
    """The first ``count`` pairs of the sample dataset, at a small resolution."""

    def __init__(self, root, resolution=64, count=1):
        full = kh.KontextPairs(root, resolution=resolution)
        self.resolution = resolution
        self.items = [full[i] for i in range(count)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.fixture(scope="session")
def one_pair(sample_data):
    """``one_pair(resolution=64, count=1)``: a fresh dataset of the first pair(s) of the sample dataset."""

    def make(resolution=64, count=1):
        return OnePair(sample_data, resolution=resolution, count=count)

    return make


@pytest.fixture(scope="session")
def train_config():
    """``train_config(root, **changes)``: a 4-step rank-4 64 px TrainConfig writing to ``root / "run"``."""

    def make(root, **kw):
        base = dict(resolution=64, steps=4, rank=4, learning_rate=3e-3, region_learning_rate=1e-2,
                    max_sequence_length=32, checkpoint_every=0, output_dir=str(Path(root) / "run"))
        base.update(kw)
        return kh.TrainConfig(**base)

    return make


def _pair_images(k: int, size: int) -> dict:
    """Pair ``k``: a coloured context, a target with one recoloured square, its mask, a 16-bit depth ramp."""
    yy, xx = np.mgrid[0:size, 0:size]
    context = np.stack([xx * 255 // size, yy * 255 // size, np.full_like(xx, 40 * k % 256)], -1).astype(np.uint8)
    lo, hi = size // 4, size // 2
    target = context.copy()
    target[lo:hi, lo:hi] = (255, 0, 255)
    mask = np.zeros((size, size), np.uint8)
    mask[lo:hi, lo:hi] = 255
    depth = (yy * 65535 // (size - 1)).astype(np.uint16)  # near (bright) at the bottom
    return {
        "context": Image.fromarray(context),
        "target": Image.fromarray(target),
        "masks": Image.fromarray(mask),
        "depth": Image.fromarray(depth),
    }


@pytest.fixture(scope="session")
def pair_images():
    """``pair_images(k, size)``: the four images of pair ``k`` that ``make_pairs`` writes."""
    return _pair_images


@pytest.fixture(scope="session")
def make_pairs():
    """``make_pairs(root, stems=("a", "b", "c"), size=32, prompts=None)``: write a valid dataset folder with one
    pair per stem (prompts "edit number k" unless given); returns ``root``."""

    def make(root: Path, stems=("a", "b", "c"), size: int = 32, prompts=None) -> Path:
        for folder in DATASET_FOLDERS:
            (root / folder).mkdir(parents=True, exist_ok=True)
        for k, stem in enumerate(stems):
            for folder, img in _pair_images(k, size).items():
                img.save(root / folder / f"{stem}.png")
        if prompts is None:
            prompts = [f"edit number {k}" for k in range(len(stems))]
        (root / "prompts.txt").write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
        return root

    return make


@pytest.fixture()
def pair_folder(make_pairs, tmp_path):
    """Three valid 32x32 pairs a, b, c written to ``tmp_path`` (the test may change them)."""
    return make_pairs(tmp_path)


# --------------------------------------------------------------------------------------------------
# damaged files
# --------------------------------------------------------------------------------------------------


@pytest.fixture(params=("truncated", "garbage", "empty"))
def damage_file(request):
    """``damage_file(path)``: overwrite a file with what a failed copy or a full disk leaves of it; the test runs
    once per kind: ``truncated`` (its first half), ``garbage`` (as many random bytes), ``empty`` (0 bytes)."""

    def damage(path):
        data = Path(path).read_bytes()
        damaged = {"truncated": data[: len(data) // 2], "garbage": np.random.default_rng(0).bytes(len(data)),
                   "empty": b""}[request.param]
        Path(path).write_bytes(damaged)
        return path

    return damage


# --------------------------------------------------------------------------------------------------
# images, masks and depth maps for sampling
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def random_image():
    """``random_image(h, w, seed)``: an RGB PIL image of uniform random pixels."""

    def make(h, w, seed):
        return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))

    return make


@pytest.fixture(scope="session")
def random_depth():
    """``random_depth(h, w, seed=7)``: an 8-bit RGB depth map, a left-to-right ramp (near on the right) plus noise."""

    def make(h, w, seed=7):
        ramp = np.linspace(0, 255, w, dtype=np.float64)[None, :] * np.ones((h, 1))
        noise = np.random.default_rng(seed).integers(0, 40, (h, w))
        return Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8)).convert("RGB")

    return make


@pytest.fixture(scope="session")
def quadrant_mask():
    """``quadrant_mask(h, w)``: a ``[1, H, W]`` mask whose top-left quadrant is editable."""

    def make(h, w):
        m = torch.zeros(1, h, w)
        m[:, : h // 2, : w // 2] = 1.0
        return m

    return make


# --------------------------------------------------------------------------------------------------
# sampling, and an adapter trained for three steps
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def edit_prompt():
    """The prompt of the sampling and adapter tests."""
    return "make the cube red"


@pytest.fixture(scope="session")
def fast():
    """Sampling settings for the tiny model: 3 steps, guidance 2.5, 32 text tokens."""
    return dict(num_inference_steps=3, guidance_scale=2.5, max_sequence_length=32)


@pytest.fixture(scope="session")
def sample_latents(edit_prompt, fast):
    """``sample_latents(pipe, image, h, w, seed, **extra)``: ``kh.sample_edit`` at H x W, packed latents out."""

    def sample(pipe, image, h, w, seed, **extra):
        return kh.sample_edit(pipe, image, edit_prompt, height=h, width=w,
                              generator=torch.Generator().manual_seed(seed), output_type="latent", **fast, **extra)

    return sample


@pytest.fixture(scope="session")
def edit_latents(sample_latents, random_image, random_depth, quadrant_mask):
    """``edit_latents(pipe, region=None, seed=0, depth=True, **extra)``: one 64x64 edit of a fixed image, with the
    quadrant mask when a region module is given."""

    def edit(pipe, region=None, seed=0, depth=True, **extra):
        h = w = 64
        kw = dict(mask=quadrant_mask(h, w), region=region) if region is not None else {}
        return sample_latents(pipe, random_image(h, w, 11), h, w, seed,
                              depth=random_depth(h, w) if depth else None, **kw, **extra)

    return edit


@pytest.fixture(scope="session")
def attn_targets():
    """The attention projections of every block, spelt out: what ``trained``'s LoRA adapts."""
    return list(ATTN_TARGETS)


def _train_a_few_steps(pipe, mask, depth, prompt, targets, steps=3):
    """Three Adam steps (lr 1e-2) of the training objective on one pair: LoRA B becomes non-zero."""
    h = w = 64
    g = torch.Generator().manual_seed(0)
    ctx = torch.rand(1, 3, h, w, generator=g)
    tgt = ctx.clone()
    tgt[:, 0, : h // 2, : w // 2] = 1.0
    with torch.no_grad():
        ctx_tok, (h_tok, w_tok) = kh.pack_like_pipeline(kh.to_latents(kh.normalize_01_to_m11(ctx), pipe.vae))
        tgt_tok, _ = kh.pack_like_pipeline(kh.to_latents(kh.normalize_01_to_m11(tgt), pipe.vae))
    pe, pooled, txt_ids = kh.encode_prompts(pipe, prompt, max_sequence_length=32)
    ip = kh.encode_depth_for_ip_adapter(pipe, depth)
    lora = kh.add_lora(pipe.transformer, rank=4, alpha=8, targets=targets, include_ip_adapter=False)
    region = kh.MaskRegionToken(h_tok, w_tok, pipe.transformer.config.in_channels)
    opt = torch.optim.Adam([p for _, p in lora] + list(region.parameters()), lr=1e-2)
    m_small = kh.mask_to_token_grid(mask, h_tok, w_tok)
    for step in range(steps):
        noise = torch.randn(tgt_tok.shape, generator=g)
        sigma = torch.tensor([0.3 + 0.2 * step])
        noisy = (1 - sigma) * tgt_tok + sigma * noise
        pred = kh.kontext_forward(pipe.transformer, noisy, ctx_tok, region(m_small), sigma=sigma, prompt_embeds=pe,
                                  pooled_prompt_embeds=pooled, txt_ids=txt_ids, h_tok=h_tok, w_tok=w_tok,
                                  ip_adapter_image_embeds=ip)
        loss = kh.fm_masked_dual_loss_with_l2(pred, tgt_tok, ctx_tok, noise, m_small, h_tok, w_tok,
                                              region_token_module=region, lora_named_params=lora)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pipe.transformer.eval()
    region.eval()
    assert all(p.abs().max() > 0 for n, p in lora if "lora_B" in n), "training must make every lora_B non-zero"
    return region


@pytest.fixture(scope="module")
def trained(tmp_path_factory, quadrant_mask, random_depth, edit_prompt, attn_targets):
    """A tiny pipeline trained for three steps, its region module and the adapter saved from them (read-only;
    built once per test file that uses it)."""
    pipe = kh.load_pipeline("tiny")
    region = _train_a_few_steps(pipe, quadrant_mask(64, 64)[None], random_depth(64, 64), edit_prompt, attn_targets)
    path = str(tmp_path_factory.mktemp("adapter") / "my_edit")
    kh.save_adapter(pipe, region, path, config={"steps": 3, "learning_rate": 1e-2, "rank": 4})
    return pipe, region, path
