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

Atomicity and durability: a save goes to DIR/.step_XXXXXXXX.tmp and is renamed into place by rank 0 after every
rank has finished writing (config.json and meta.json included) and every file and the folder are fsynced, so a
crash or a power loss mid-save leaves the previous checkpoint as the newest complete one, never a "complete" one
with empty files.
Integrity: checksums.json records a CRC-32 of every file of the checkpoint (hashed by all ranks, a share each,
from the page cache after the write: ~6.6 GB/s per core here), and every load verifies the files first (a share
per rank again), so flipped bytes in a data file are an error naming the file instead of a resume that silently
trains on other weights. CRC-32 catches corruption, not tampering; what guards against a planted checkpoint is
that nothing in one is unpickled freely: `.metadata` goes through an allow-list of DCP's own metadata classes
(read_dcp_metadata), DCP's byte entries and the RNG files load with torch.load(weights_only=True).
A weights-only checkpoint (only "model", as written by the hf2dcp converter) loads with
`load_model_weights`.
"""

import io
import json
import os
import pickle
import random
import re
import shutil
import warnings
import zlib
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
    """A checkpoint directory is missing, incomplete, corrupt or unreadable."""


# ------------------------------------------------------------------------------------------------------------
# Reading DCP folders without unpickling anything but checkpoint metadata

# What DCP's .metadata is made of (torch 2.13): its metadata dataclasses, the file-storage record, torch.Size,
# dtypes and layouts, and the checkpoint id (a Path). Anything else in a .metadata file is refused.
_METADATA_CLASSES = {
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f, path: Path):
        super().__init__(f)
        self.path = path

    def find_class(self, module, name):
        if (module, name) in _METADATA_CLASSES or (
                module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout))):
            return super().find_class(module, name)
        raise CheckpointError(f"{self.path}: refused to unpickle {module}.{name}: a DCP .metadata file holds only "
                              "checkpoint metadata (this file may have been planted to run code when loaded)")


def read_dcp_metadata(path: str | os.PathLike):
    """The DCP Metadata of checkpoint folder `path`, unpickled through an allow-list of DCP's own metadata
    classes: a planted .metadata cannot run code. CheckpointError naming the file otherwise."""
    md_file = Path(path) / ".metadata"
    try:
        with open(md_file, "rb") as f:
            md = _MetadataUnpickler(f, md_file).load()
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"{md_file}: cannot read it ({e.strerror or e})") from e
    except Exception as e:  # truncated or random bytes: UnpicklingError, EOFError, ValueError, ...
        raise CheckpointError(f"{md_file}: not a DCP metadata file (truncated or corrupt: {type(e).__name__})") from e
    if type(md).__name__ != "Metadata" or not hasattr(md, "state_dict_metadata"):
        raise CheckpointError(f"{md_file}: holds a {type(md).__name__}, not DCP checkpoint metadata")
    return md


class SafeFileSystemReader(dcp.FileSystemReader):
    """dcp.FileSystemReader whose metadata goes through read_dcp_metadata (torch's own is a plain pickle.load)."""

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        md = read_dcp_metadata(self.path)
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class SafeLoadPlanner(dcp.DefaultLoadPlanner):
    """dcp.DefaultLoadPlanner that reads non-tensor entries (our "train" state: numbers, strings, lists) with
    torch.load(weights_only=True); torch's default unpickles them with weights_only=False."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._nested_dict import set_element  # as DefaultLoadPlanner.load_bytes does

        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load_dcp(state: dict, path: str | os.PathLike, allow_partial_load: bool = False, no_dist: bool | None = None,
             what: str = "cannot load checkpoint") -> None:
    """dcp.load(state) from folder `path` through SafeFileSystemReader and SafeLoadPlanner; any failure becomes one
    CheckpointError "{what} {path}: {reason}". no_dist defaults to "no process group is initialised"."""
    path = Path(path)
    no_dist = not dist.is_initialized() if no_dist is None else no_dist
    try:
        with warnings.catch_warnings():
            if no_dist:  # chosen here, not assumed: torch's "assuming the intent is to load in a single process"
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=SafeFileSystemReader(str(path)),
                     planner=SafeLoadPlanner(allow_partial_load=allow_partial_load), no_dist=no_dist)
    except CheckpointError:
        raise
    # DCP raises many types (missing keys, shape mismatch), and CheckpointException derives from BaseException:
    # catch both and name the directory.
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"{what} {path}: {_reason(e)}") from e


# ------------------------------------------------------------------------------------------------------------
# Integrity and durability of what a save writes
CHECKSUM_FILE = "checksums.json"
_CHUNK = 4 << 20


def file_crc32(path: Path) -> str:
    """CRC-32 of a file as 8 hex digits, read through one reused 4 MiB buffer (no per-chunk allocation)."""
    crc, buf = 0, bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return f"{crc:08x}"


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes | str) -> None:
    """Write a file and fsync it before returning."""
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def _checked_files(folder: Path) -> list[str]:
    """Every file of a checkpoint folder that checksums.json covers, in a fixed order (relative paths)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name not in (CHECKSUM_FILE, "meta.json"))


def _gather_crcs(folder: Path, names: list[str]) -> dict[str, str]:
    """CRC-32 of `names` in `folder`, each rank hashing an interleaved share, gathered on every rank."""
    mine = {n: file_crc32(folder / n) for n in names[_rank()::_world()]}
    if not dist.is_initialized():
        return mine
    parts = [None] * _world()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def verify_checksums(path: str | os.PathLike) -> None:
    """Compare every file of a checkpoint with its checksums.json (written at save time); collective when a
    process group is initialised (each rank hashes a share). CheckpointError naming the first file that differs or
    is missing. A folder without checksums.json (converter output, older checkpoints) is not checked."""
    path = Path(path)
    record = path / CHECKSUM_FILE
    if not record.is_file():
        return
    try:
        expected = json.loads(record.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{record}: unreadable ({type(e).__name__}); the checkpoint cannot be verified") from e
    missing = sorted(n for n in expected if not (path / n).is_file())
    if missing:
        raise CheckpointError(f"cannot load checkpoint {path}: {missing[0]} is missing (damaged: {CHECKSUM_FILE} "
                              "lists it)")
    got = _gather_crcs(path, sorted(expected))
    bad = sorted(n for n in expected if got[n] != expected[n])
    if bad:
        raise CheckpointError(f"cannot load checkpoint {path}: {bad[0]} does not match the checksum recorded when it "
                              "was saved (corrupt)" + (f"; {len(bad) - 1} more file(s) too" if len(bad) > 1 else ""))


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


def complete_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """The complete step_XXXXXXXX checkpoints in out_dir, oldest first. Temp dirs of crashed saves are ignored
    (their names start with '.'), and so is a step folder without DCP's .metadata or our meta.json (written last)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = sorted((int(m.group(1)), p) for p in out_dir.iterdir()
                   if (m := _STEP_DIR.match(p.name)) and p.is_dir() and is_complete(p) and
                   (p / "meta.json").is_file())
    return [p for _, p in found]


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in out_dir (complete_checkpoints), or None."""
    found = complete_checkpoints(out_dir)
    return found[-1] if found else None


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


# Optimizer state flattened to one entry per parameter name ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"): the
# same keys whatever the layout, so the states of several model parts (pipeline stages) merge into one checkpoint
# and load into any other split.
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _state_dicts(models, optimizers) -> tuple[dict, dict | None, list[tuple[list[str], list[str]]]]:
    """(model state dict, optimizer state dict or None, each part's (model keys, optimizer keys)) of the model
    parts on this rank, merged by name. A name two parts share (a pipeline's embedding replica, equal by
    construction) appears once."""
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    if optimizers is None:
        optimizers = [None] * len(models)
    optimizers = list(optimizers) if isinstance(optimizers, (list, tuple)) else [optimizers]
    model_sd, optim_sd, keys = {}, {}, []
    for m, o in zip(models, optimizers):
        part = get_model_state_dict(m)
        model_sd.update(part)
        opt_part = get_optimizer_state_dict(m, o, options=_OPTIM_OPTIONS) if o is not None else {}
        optim_sd.update(opt_part)
        keys.append((list(part), list(opt_part)))
    return model_sd, (optim_sd if any(o is not None for o in optimizers) else None), keys


def save_checkpoint(out_dir: str | os.PathLike, step: int, model, optimizer=None, train_state: dict | None = None,
                    config: dict | None = None) -> Path:
    """Save model (+ optimizer, + training state, + RNG) for `step` atomically; collective over all ranks.
    `model` is a module or a list of this rank's model parts (pipeline stages), `optimizer` an optimizer or one
    per part. `config` (JSON-able; the model's Hugging Face config.json dict) is written as config.json inside
    the checkpoint, before it is renamed into place. Returns the final directory. An existing checkpoint of the
    same step is replaced only after the new one is complete."""
    out_dir = Path(out_dir)
    final = checkpoint_dir(out_dir, step)
    tmp = out_dir / f".{final.name}.tmp"
    if _rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed save of the same step
        tmp.mkdir()
    _barrier()
    model_sd, optim_sd, _ = _state_dicts(model, optimizer)
    state = {"model": model_sd, "train": {"step": int(step), **(train_state or {})}}
    if optim_sd is not None:
        state["optim"] = optim_sd
    dcp.save(state, checkpoint_id=str(tmp))  # DCP fsyncs its own files (FileSystemWriter sync_files=True)
    buf = io.BytesIO()
    torch.save(_rng_state(), buf)
    write_durable(tmp / f"rng_rank{_rank()}.pt", buf.getvalue())
    if _rank() == 0 and config is not None:
        write_durable(tmp / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    _barrier()
    crcs = _gather_crcs(tmp, _checked_files(tmp))
    if _rank() == 0:
        write_durable(tmp / CHECKSUM_FILE, json.dumps({"algorithm": "crc32", "files": crcs}, indent=1))
        write_durable(tmp / "meta.json", json.dumps({"step": int(step), "world_size": _world()}))
        fsync_path(tmp)
        old = out_dir / f".{final.name}.old"
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        fsync_path(out_dir)
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


def _read_metadata(path: Path, what: str = "cannot load checkpoint"):
    """The checkpoint's DCP metadata (read_dcp_metadata); a failure names the folder and what was attempted."""
    try:
        return read_dcp_metadata(path)
    except CheckpointError as e:
        raise CheckpointError(f"{what} {path}: {e}") from e


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
    load_dcp(state, path, allow_partial_load=True)
    return dict(state["train"])


def _has_flat_optimizer_state(path: Path) -> bool:
    """Whether the checkpoint's optimizer state is the flattened per-parameter layout load_checkpoint reads
    (keys optim.param_groups.<parameter>.<hyperparameter>); older checkpoints hold optim.param_groups.<index>."""
    keys = _read_metadata(Path(path)).state_dict_metadata
    groups = [k for k in keys if k.startswith("optim.param_groups.")]
    return not groups or any(not k.split(".")[2].isdigit() for k in groups)


def load_checkpoint(path: str | os.PathLike, model, optimizer=None, train_state: dict | None = None,
                    verify: bool = True) -> dict:
    """Load a checkpoint written by save_checkpoint into model/optimizer (any world size, EP or pipeline degree;
    `model` and `optimizer` as save_checkpoint takes them).

    `train_state` gives the keys (and their types, by example values) to read back from "train"; "step" is
    always read, and keys the checkpoint does not hold (written by an older version) are left out of the
    result. Restores this rank's RNG states when the checkpoint was saved with the same world size.
    Returns the training state dict. Collective over all ranks. verify=False skips the checksum pass (for a
    caller that already verified the folder).
    """
    path = Path(path)
    _check_readable(path)
    if verify:
        verify_checksums(path)
    stored = set(_stored_train_keys(path))
    wanted = {k: v for k, v in {"step": 0, **(train_state or {})}.items() if k in stored or k == "step"}
    model_sd, optim_sd, keys = _state_dicts(model, optimizer)
    state = {"model": model_sd, "train": wanted}
    if optim_sd is not None:
        state["optim"] = optim_sd
    if optim_sd is not None and not _has_flat_optimizer_state(path):
        raise CheckpointError(f"cannot resume from {path}: its optimizer state has the nested layout of checkpoints "
                              "written before pipeline parallelism (now flattened per parameter); start from its "
                              "weights with --init-from instead")
    load_dcp(state, path)
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    optimizers = (list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]) if optimizer is not None \
        else [None] * len(models)
    for m, o, (model_keys, optim_keys) in zip(models, optimizers, keys):
        set_model_state_dict(m, {k: state["model"][k] for k in model_keys})
        if o is not None:
            set_optimizer_state_dict(m, o, {k: state["optim"][k] for k in optim_keys}, options=_OPTIM_OPTIONS)
    meta_path = path / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    rng_path = path / f"rng_rank{_rank()}.pt"
    if meta.get("world_size") == _world() and rng_path.is_file():
        try:
            _set_rng_state(torch.load(rng_path, weights_only=True))
        except Exception as e:  # weights_only refuses anything but tensors and plain containers
            raise CheckpointError(f"{rng_path}: not an RNG state file ({type(e).__name__}: {e})") from e
    return dict(state["train"])


def check_model_entries(path: str | os.PathLike, sd: dict, strict: bool | str = True) -> None:
    """Compare the checkpoint's "model" entries with the model's state dict (global shapes) before reading any
    tensor: one error naming the mismatched, missing and (strict) unexpected keys, instead of DCP's per-rank
    tracebacks. `sd` may hold meta tensors (only shapes are read)."""
    path = Path(path)
    md = _read_metadata(path, "cannot read checkpoint metadata of")
    stored = {k.removeprefix("model."): m for k, m in md.state_dict_metadata.items() if k.startswith("model.")}
    if not stored:
        raise CheckpointError(f"{path} holds no model weights (no 'model' entry)")
    problems = [f"{k}: {tuple(stored[k].size)} in the checkpoint, {tuple(v.shape)} in the model"
                for k, v in sd.items() if isinstance(v, torch.Tensor) and k in stored
                and hasattr(stored[k], "size") and tuple(stored[k].size) != tuple(v.shape)]
    if strict:
        problems += [f"{k}: missing from the checkpoint" for k in sd if k not in stored]
    if strict is True:
        problems += [f"{k}: in the checkpoint, not in the model" for k in stored if k not in sd]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"{path} does not fit this model: " + "; ".join(problems[:5]) + more)


def load_model_weights(model: nn.Module, dcp_dir: str | os.PathLike, strict: bool | str = True,
                       verify: bool = True) -> nn.Module:
    """Load only the "model" entry of a DCP checkpoint (a full training checkpoint or a weights-only one
    from the converter) into `model`, whatever its sharding: plain, EP DTensors, FSDP. Works with or without
    an initialised process group. Global shapes are checked against the checkpoint first (CheckpointError
    naming the keys); strict (default) also requires the same keys, strict=False tolerates keys missing from
    the checkpoint and extra ones in it, strict="part" requires every key of `model` but tolerates the
    checkpoint's others (a pipeline stage loading its part of the whole model). verify=False skips the checksum
    pass for a caller that already ran verify_checksums on the folder (it reads every byte once)."""
    path = Path(dcp_dir)
    _check_readable(path)
    if verify:
        verify_checksums(path)
    sd = get_model_state_dict(model)
    check_model_entries(path, sd, strict)
    load_dcp({"model": sd}, path, allow_partial_load=strict is not True, what="cannot load model weights from")
    set_model_state_dict(model, sd, options=StateDictOptions(strict=strict is not False))
    return model
