"""Notebook 04: checkpoints that are never half-written, and resume that refuses a config it cannot continue.

A checkpoint is the folder ``output_dir/checkpoints/step-NNNNNN/``: the LoRA (PEFT's key format, the same
as a saved adapter), the region module, the depth module, the optimizer, the scheduler, the loss history and the run's
config. It is written to a temporary folder, synced, then renamed into place, so a crash or a full disk
leaves either the complete folder or none. Every random draw of a training step derives from
``(seed, step)``, so nothing else is needed to resume exactly.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from torch import nn

from .models import read_safetensors

_CKPT_RE = re.compile(r"^step-(\d{6,})$")

# Config fields that shape the saved tensors: a checkpoint cannot continue a run where any of them differs.
# (resolution sets the region module's token grid, region_kind its tensors, use_depth and depth_kind whether a depth
# module exists; optimizer sets the layout of the optimizer state.)
RESUME_MUST_MATCH = ("rank", "alpha", "lora_targets", "lora_ip_adapter", "resolution", "optimizer", "region_kind",
                     "use_depth", "depth_kind")
# What checkpoints written before a field existed trained with (depth went through the IP-Adapter).
_BEFORE_THE_FIELD = {"depth_kind": "ip_adapter"}
# Fields that say where or whether to resume, not how to train: never compared.
_RESUME_IGNORED = ("resume", "output_dir", "expected_peak_memory_gb", "peak_memory_source")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, a storage that went away); the run stops, nothing is lost."""


def _checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints ``(step, path)``, oldest first. A folder without ``state.json`` is ignored."""
    root = _checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _CKPT_RE.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, "state.json")):
            found.append((int(m.group(1)), path))
    return sorted(found)


def read_checkpoint_config(path: str) -> dict:
    """The training config a checkpoint was written with (its ``state.json``), without loading any tensor."""
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f).get("config", {})


def resume_config_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """Compare the config of a checkpoint with the one a run resumes with.

    Returns ``(blocking, accepted)``: lines ``"name: saved -> current"``. ``blocking`` lists the fields of
    :data:`RESUME_MUST_MATCH` that differ; ``accepted`` every other field that differs (steps, learning
    rates, checkpoint spacing, ...), which the resumed run uses.
    """
    blocking, accepted = [], []
    saved = {**_BEFORE_THE_FIELD, **saved}
    for name in sorted(set(saved) | set(current)):
        if name in _RESUME_IGNORED or saved.get(name) == current.get(name):
            continue
        line = f"{name}: {saved.get(name)!r} -> {current.get(name)!r}"
        (blocking if name in RESUME_MUST_MATCH else accepted).append(line)
    return blocking, accepted


def _flatten(prefix: str, state: dict, tensors: dict, scalars: dict) -> None:
    """``{"a": {"b": t}}`` -> ``tensors["prefix.a.b"] = t``: bitsandbytes nests its 8-bit state one dict deeper."""
    for key, value in state.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            _flatten(name, value, tensors, scalars)
        elif torch.is_tensor(value):  # a copy: bitsandbytes shares one quantization map between parameters
            tensors[name] = value.detach().to("cpu", copy=True).contiguous()
        else:
            scalars[name] = value


def _optimizer_to_files(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (safetensors) and everything else (JSON)."""
    sd = optimizer.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "scalars": {}}
    for idx, state in sd["state"].items():
        _flatten(str(idx), state, tensors, meta["scalars"])
    return tensors, meta


def optimizer_state_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The inverse of the split: an ``optimizer.state_dict()`` to pass to ``optimizer.load_state_dict``."""
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, *path, name = key.split(".")
        node = state.setdefault(int(idx), {})
        for part in path:
            node = node.setdefault(part, {})
        node[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # not every filesystem (e.g. a Drive mount) supports directory fsync
        pass


def _write_checkpoint_files(folder: str, step: int, *, lora_state, region_module, optimizer, lr_scheduler,
                            history, config, depth_module=None) -> None:
    """Every file of one checkpoint into ``folder``; ``state.json`` last (a folder without it is incomplete)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in lora_state.items()},
              os.path.join(folder, "lora.safetensors"))
    if region_module is not None:  # region_kind="none": a LoRA alone
        save_file({k: v.detach().cpu().contiguous() for k, v in region_module.state_dict().items()},
                  os.path.join(folder, "region.safetensors"))
    if depth_module is not None:  # depth_kind "tokens"
        save_file({k: v.detach().cpu().contiguous() for k, v in depth_module.state_dict().items()},
                  os.path.join(folder, "depth.safetensors"))
    opt_tensors, opt_meta = _optimizer_to_files(optimizer)
    save_file(opt_tensors, os.path.join(folder, "optimizer.safetensors"))
    with open(os.path.join(folder, "optimizer.json"), "w") as f:
        json.dump(opt_meta, f)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    state = {"step": step, "lr_scheduler": lr_scheduler.state_dict(), "history": history, "config": config_dict,
             "region": None if region_module is None else {
                 "kind": region_module.kind, "h_tok": region_module.h_tok, "w_tok": region_module.w_tok,
                 "c_in": region_module.c_in},
             "depth": None if depth_module is None else {
                 "kind": depth_module.kind, "c_in": depth_module.c_in, "patch": depth_module.patch,
                 "on_context": depth_module.on_context}}
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump(state, f, default=str)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(folder)


def _write_failed(output_dir: str, step: int, tmp: str, err: Exception) -> CheckpointWriteError:
    """The plain message of a failed write: what failed, where, and which checkpoint to resume from."""
    done = list_checkpoints(output_dir)
    resume = (f"the last complete checkpoint is step {done[-1][0]} ({done[-1][1]}): resume from it with "
              "resume=True" if done else "no complete checkpoint exists yet: a rerun starts from step 0")
    return CheckpointWriteError(
        f"could not write the checkpoint of step {step} to {_checkpoint_root(output_dir)} "
        f"({type(err).__name__}: {err}). The partial folder {tmp} was removed; {resume}."
        + ("" if isinstance(err, TypeError | ValueError) else " Free disk space (or reconnect the drive) first."))


def save_checkpoint(output_dir: str, step: int, *, lora_state: dict[str, torch.Tensor], region_module: nn.Module | None,
                    optimizer, lr_scheduler, history: list[dict], config, keep: int = 3,
                    depth_module: nn.Module | None = None) -> str:
    """Write ``output_dir/checkpoints/step-NNNNNN/`` atomically: a temporary folder, fsync, then rename.

    Holds ``lora.safetensors`` (PEFT keys, as :func:`kontext_helpers.models.lora_state_dict`),
    ``region.safetensors`` (absent without a region module), ``depth.safetensors`` (absent without a depth
    module), ``optimizer.safetensors`` + ``optimizer.json`` and
    ``state.json`` (step, scheduler, history, config; written last). Keeps the newest ``keep`` complete checkpoints.

    Raises:
        CheckpointWriteError: the write failed (disk full, storage gone); the temporary folder is removed and
            the message names the last complete checkpoint.
    """
    root = _checkpoint_root(output_dir)
    final = os.path.join(root, f"step-{step:06d}")
    tmp = os.path.join(root, f".tmp-step-{step:06d}-{os.getpid()}")
    try:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        _write_checkpoint_files(tmp, step, lora_state=lora_state, region_module=region_module, optimizer=optimizer,
                                lr_scheduler=lr_scheduler, history=history, config=config, depth_module=depth_module)
        if os.path.exists(final):  # a re-run of the same step: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except Exception as err:  # safetensors raises its own SafetensorError for a full disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(output_dir, step, tmp, err) from err
    _fsync_dir(root)
    for _, old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint folder written by :func:`save_checkpoint` (tensors on the CPU).

    Returns ``state.json``'s fields (``step``, ``lr_scheduler``, ``history``, ``config``, ``region``, ``depth``)
    plus ``lora`` (the LoRA state dict), ``region["state_dict"]``, ``depth["state_dict"]`` (``depth`` is ``None``
    without a depth module, and in checkpoints written before depth modules), ``optimizer`` (a ``state_dict``) and
    ``path``.

    Raises:
        ValueError: a damaged ``.safetensors`` part; the message names it and the previous checkpoint to resume from.
    """
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    with open(os.path.join(path, "optimizer.json")) as f:
        opt_meta = json.load(f)
    fix = _resume_advice(path)
    parts = {part: read_safetensors(os.path.join(path, f"{part}.safetensors"), fix)[0] for part in _parts(state)}
    state.update(lora=parts["lora"],
                 region=None if state["region"] is None else dict(state["region"], state_dict=parts["region"]),
                 depth=None if state.get("depth") is None else dict(state["depth"], state_dict=parts["depth"]),
                 optimizer=optimizer_state_from_files(parts["optimizer"], opt_meta), path=path)
    return state


def _parts(state: dict) -> list[str]:
    """The ``<part>.safetensors`` files a checkpoint holds, from its ``state.json``."""
    return ["lora", "optimizer"] + [part for part in ("region", "depth") if state.get(part) is not None]


def check_checkpoint_files(path: str) -> None:
    """Check every ``.safetensors`` part of the checkpoint ``path`` without reading a tensor: a damaged one raises
    :func:`load_checkpoint`'s ``ValueError`` before a resumed run does any model work."""
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    fix = _resume_advice(path)
    for part in _parts(state):
        read_safetensors(os.path.join(path, f"{part}.safetensors"), fix, tensors=False)


def _resume_advice(path: str) -> str:
    """What to do when a file of the checkpoint ``path`` is damaged: resume from the one before it."""
    folder = os.path.abspath(path)
    output_dir = os.path.dirname(os.path.dirname(folder))
    m = _CKPT_RE.match(os.path.basename(folder))
    earlier = [(step, p) for step, p in list_checkpoints(output_dir)
               if os.path.abspath(p) != folder and (m is None or step < int(m.group(1)))]
    move = f"move the damaged folder {path} out of {_checkpoint_root(output_dir)}"
    if not earlier:
        return (f"Copy the checkpoint again if it came from elsewhere; otherwise {move}: kh.list_checkpoints("
                f"{output_dir!r}) lists no other complete checkpoint, so a run with resume=True then starts from "
                "step 0.")
    step, previous = earlier[-1]
    return (f"Resume from the previous checkpoint: {move}, and resume=True continues from step {step} ({previous}; "
            f"kh.list_checkpoints({output_dir!r}) lists them all).")
