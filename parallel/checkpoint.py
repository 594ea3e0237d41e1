"""Distributed checkpoints (torch.distributed.checkpoint, DCP) that reshard on load.

A checkpoint directory DIR/step_XXXXXXXX holds one DCP checkpoint of
    {"model": model state dict (our names; expert weights as global tensors),
     "optim": optimizer state dict (same keys, same sharding as the parameters),
     "train": {"step": int, ... JSON-able training state such as the data position}}
plus rng_rank{r}.pt (each rank's RNG states, restored only when the world size matches), meta.json
(step, world size, written last) and, when the caller passes the model's config, config.json (so the folder is
self-describing: `train --init-from DIR` and `convert dcp2hf --input DIR` need no other file). DCP stores every
tensor by its global shape, so a checkpoint saved with one world size / EP degree loads into another: each rank
reads exactly the slice of the global tensor its DTensor shard covers (rank r of an ep group gets experts
[r*E/ep, (r+1)*E/ep)).

Atomicity: a save goes to DIR/.step_XXXXXXXX.tmp and is renamed into place by rank 0 after every rank has
finished writing (config.json and meta.json included), so a crash mid-save leaves the previous checkpoint as the
newest complete one.
A weights-only checkpoint (only "model", as written by the hf2dcp converter) loads with
`load_model_weights`.
"""

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or unreadable."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoint_dir(out_dir: str | os.PathLike, step: int) -> Path:
    return Path(out_dir) / f"step_{step:08d}"


def is_complete(path: str | os.PathLike) -> bool:
    """True when `path` holds a finished DCP checkpoint (DCP's .metadata is written last by DCP itself)."""
    return (Path(path) / ".metadata").is_file()


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete step_XXXXXXXX checkpoint in out_dir, or None. Temp dirs of crashed saves are
    ignored (their names start with '.')."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in out_dir.iterdir()
                   if (m := _STEP_DIR.match(p.name)) and p.is_dir() and is_complete(p) and
                   (p / "meta.json").is_file())
    return found[-1][1] if found else None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


CONFIG_FILE = "config.json"


def save_checkpoint(out_dir: str | os.PathLike, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, train_state: dict | None = None,
                    config: dict | None = None) -> Path:
    """Save model (+ optimizer, + training state, + RNG) for `step` atomically; collective over all ranks.
    `config` (JSON-able; the model's Hugging Face config.json dict) is written as config.json inside the
    checkpoint, before it is renamed into place. Returns the final directory. An existing checkpoint of the same
    step is replaced only after the new one is complete."""
    out_dir = Path(out_dir)
    final = checkpoint_dir(out_dir, step)
    tmp = out_dir / f".{final.name}.tmp"
    if _rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed save of the same step
        tmp.mkdir()
    _barrier()
    state = {"model": get_model_state_dict(model), "train": {"step": int(step), **(train_state or {})}}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng_rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        if config is not None:
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "meta.json").write_text(json.dumps({"step": int(step), "world_size": _world()}))
        old = out_dir / f".{final.name}.old"
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not is_complete(path):
        raise CheckpointError(f"checkpoint {path} is incomplete: no DCP .metadata file (an interrupted save?)")


def _reason(e: BaseException) -> str:
    """One line for an error message: DCP's CheckpointException carries every rank's traceback."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


def _dcp_load(state: dict, path: Path, what: str = "cannot load checkpoint", **load_kwargs) -> None:
    """dcp.load(state) from `path` (load_kwargs: planner, no_dist); any failure becomes one CheckpointError
    "{what} {path}: {reason}"."""
    try:
        dcp.load(state, checkpoint_id=str(path), **load_kwargs)
    # DCP raises many types (unpickling, missing keys, shape mismatch), and CheckpointException derives from
    # BaseException: catch both and name the directory.
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"{what} {path}: {_reason(e)}") from e


def _read_metadata(path: Path, what: str = "cannot load checkpoint"):
    """The checkpoint's DCP metadata; a failure becomes one CheckpointError "{what} {path}: {reason}"."""
    try:
        return dcp.FileSystemReader(str(path)).read_metadata()
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"{what} {path}: {_reason(e)}") from e


def _stored_train_keys(path: Path) -> list[str]:
    """The keys of the checkpoint's "train" entry, from its DCP metadata."""
    md = _read_metadata(path)
    return [fqn[len("train."):] for fqn in md.state_dict_metadata if fqn.startswith("train.")]


def read_train_state(path: str | os.PathLike) -> dict:
    """Every entry of a checkpoint's "train" state (step, seed, schedule, data identity, ...), without building
    or loading any model: to check a resume before paying for the weights. Collective over all ranks when a
    process group is initialised."""
    path = Path(path)
    _check_readable(path)
    state = {"train": {k: None for k in _stored_train_keys(path)}}
    _dcp_load(state, path, planner=dcp.DefaultLoadPlanner(allow_partial_load=True),
              no_dist=not dist.is_initialized())
    return dict(state["train"])


def load_checkpoint(path: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, train_state: dict | None = None) -> dict:
    """Load a checkpoint written by save_checkpoint into model/optimizer (any world size or EP degree).

    `train_state` gives the keys (and their types, by example values) to read back from "train"; "step" is
    always read, and keys the checkpoint does not hold (written by an older version) are left out of the
    result. Restores this rank's RNG states when the checkpoint was saved with the same world size.
    Returns the training state dict. Collective over all ranks.
    """
    path = Path(path)
    _check_readable(path)
    stored = set(_stored_train_keys(path))
    wanted = {k: v for k, v in {"step": 0, **(train_state or {})}.items() if k in stored or k == "step"}
    state = {"model": get_model_state_dict(model), "train": wanted}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    _dcp_load(state, path)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    meta_path = path / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    rng_path = path / f"rng_rank{_rank()}.pt"
    if meta.get("world_size") == _world() and rng_path.is_file():
        _set_rng_state(torch.load(rng_path, weights_only=False))
    return dict(state["train"])


def _check_model_entries(path: Path, sd: dict, strict: bool) -> None:
    """Compare the checkpoint's "model" entries with the model's state dict (global shapes) before reading any
    tensor: one error naming the mismatched, missing and (strict) unexpected keys, instead of DCP's per-rank
    tracebacks."""
    md = _read_metadata(path, "cannot read checkpoint metadata of")
    stored = {k.removeprefix("model."): m for k, m in md.state_dict_metadata.items() if k.startswith("model.")}
    if not stored:
        raise CheckpointError(f"{path} holds no model weights (no 'model' entry)")
    problems = [f"{k}: {tuple(stored[k].size)} in the checkpoint, {tuple(v.shape)} in the model"
                for k, v in sd.items() if isinstance(v, torch.Tensor) and k in stored
                and hasattr(stored[k], "size") and tuple(stored[k].size) != tuple(v.shape)]
    if strict:
        problems += [f"{k}: missing from the checkpoint" for k in sd if k not in stored]
        problems += [f"{k}: in the checkpoint, not in the model" for k in stored if k not in sd]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"{path} does not fit this model: " + "; ".join(problems[:5]) + more)


def load_model_weights(model: nn.Module, dcp_dir: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load only the "model" entry of a DCP checkpoint (a full training checkpoint or a weights-only one
    from the converter) into `model`, whatever its sharding: plain, EP DTensors, FSDP. Works with or without
    an initialised process group. Global shapes are checked against the checkpoint first (CheckpointError
    naming the keys); strict (default) also requires the same keys, strict=False tolerates keys missing from
    the checkpoint and extra ones in it."""
    path = Path(dcp_dir)
    _check_readable(path)
    sd = get_model_state_dict(model)
    _check_model_entries(path, sd, strict)
    _dcp_load({"model": sd}, path, "cannot load model weights from",
              planner=dcp.DefaultLoadPlanner(allow_partial_load=not strict))
    set_model_state_dict(model, sd, options=StateDictOptions(strict=strict))
    return model
