"""Hugging Face safetensors checkpoints <-> our model: ``from_pretrained`` / ``save_pretrained``, and what the
streaming converter (``convert.py``) shares with them, so that both follow one set of rules: opening a checkpoint
(``open_hf_checkpoint``: the key check and the missing-MTP policy), the dtype each tensor loads in, the one load loop
(``load_group``: a group of HF keys -> our tensors, with the CRC-32 of every stored tensor read), the one MTP-copy
check, and the HF writing loop (``write_hf_checkpoint``).

In:  a checkpoint folder in the published DeepSeek-V3 layout (``config.json`` + ``model.safetensors`` or shards +
     ``model.safetensors.index.json``), bf16/fp32 or float8_e4m3fn with 128x128 block scales.
Out: our model (or, for the converter, our tensors one decoder layer at a time), and back.

The key mapping is ``hf_mapping`` (names only); reading and writing files is ``safetensors_io``.

Dtypes: parameters load in one dtype (the caller's, else the config's ``dtype``/``torch_dtype``, else the
checkpoint's majority floating dtype, FP8 counting as the bf16 it dequantizes to), as transformers does; the
routers' weights and balancing biases load in fp32 whatever that dtype is, since the router computes in fp32 by
design (``moe.Router``): a transformers checkpoint stores them in fp32, and a round trip keeps them bit-exact.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from .hf_mapping import (CheckpointLayout, MappedTensor, Op, check_against, is_mtp_key, mtp_copies_to_hf,
                         mtp_layers_present, ours_groups, ours_tensor_to_hf, ours_to_hf_name, plan_hf_keys)
from .safetensors_io import (CONFIG_FILE, INDEX_FILE, SINGLE_FILE, SafetensorsCheckpoint, ShardedSafetensorsWriter,
                             clear_partial, publish)
from ..parallel.checkpoint import write_durable

# File names and the reader are re-exported for the code that took them from here before the split.
__all__ = ["CONFIG_FILE", "INDEX_FILE", "MISSING_MTP_POLICIES", "SINGLE_FILE", "HFSource", "SafetensorsCheckpoint",
           "build_meta_model", "check_mtp_copies", "fp32_tensors", "from_pretrained", "load_group", "majority_dtype",
           "open_hf_checkpoint", "save_pretrained", "write_hf_checkpoint"]

MISSING_MTP_POLICIES = ("drop", "init", "error")


def fp32_tensors(model: nn.Module) -> frozenset[str]:
    """Our tensors that stay fp32 whatever dtype the rest loads in: those a module lists in its ``keeps_fp32``
    (each router's weight and balancing bias)."""
    return frozenset(f"{name}.{t}" for name, m in model.named_modules() for t in getattr(m, "keeps_fp32", ()))


@dataclass
class HFSource:
    """An HF checkpoint opened for loading into our model."""

    ckpt: SafetensorsCheckpoint
    hf_cfg: dict                        # its config.json; num_nextn_predict_layers 0 when the MTP layers are dropped
    layout: CheckpointLayout
    model: nn.Module                    # our model built from hf_cfg on the meta device
    expected: dict[str, torch.Tensor]   # its state dict (meta tensors): names, shapes, dtypes
    buffers: frozenset[str]
    fp32: frozenset[str]                # ``fp32_tensors(model)``
    init_mtp: bool                      # missing_mtp="init": the MTP modules are initialized, not loaded

    def dtype_of(self, key: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype our tensor `key` loads in when parameters load in `dtype`."""
        want = self.expected[key]
        if key in self.fp32:
            return torch.float32
        return want.dtype if key in self.buffers or not want.is_floating_point() else dtype

    def default_dtype(self) -> torch.dtype:
        """The config's ``dtype`` (transformers 5) or ``torch_dtype``, else the majority floating dtype of the
        stored tensors by element count (FP8 counts as bf16)."""
        name = self.hf_cfg.get("dtype") or self.hf_cfg.get("torch_dtype")
        named = getattr(torch, name.removeprefix("torch."), None) if isinstance(name, str) else None
        if isinstance(named, torch.dtype) and named.is_floating_point and named.itemsize >= 2:
            return named
        counts: Counter = Counter()
        for k in self.ckpt.keys():
            dtype = self.ckpt.stored_dtype(k)
            if dtype is not None and dtype.is_floating_point:
                shape = self.ckpt.stored(k)[0]
                counts[torch.bfloat16 if dtype.itemsize == 1 else dtype] += torch.Size(shape).numel()
        return counts.most_common(1)[0][0] if counts else torch.float32


def build_meta_model(hf_cfg: Mapping, cls: type, source: object = CONFIG_FILE) -> nn.Module:
    """Our model class `cls` (DeepseekV3ForCausalLM; the caller passes it, so this module never imports the model)
    built from a config dict on the meta device: no memory and no random init for weights a checkpoint overwrites
    (at 671B the init alone is 1.3 TB of normal_ in bf16). ValueError naming `source` when the config is invalid."""
    from .config import DeepseekV3Config

    try:
        cfg = DeepseekV3Config.from_hf(dict(hf_cfg))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: {e}") from e
    with torch.device("meta"):
        return cls(cfg)


def open_hf_checkpoint(hf_dir: str | os.PathLike, cls: type, missing_mtp: str = "drop",
                       report: Callable[[str], None] = warnings.warn) -> HFSource:
    """Open an HF checkpoint for our model class `cls` (DeepseekV3ForCausalLM): read index, headers and
    config, apply the missing-MTP policy, build the model on the meta device and check every key against it.

    missing_mtp: what to do when config.json asks for MTP modules but the checkpoint holds none (transformers'
    own ``save_pretrained`` drops them): "drop" builds the model without MTP (told through `report`), "init" keeps
    randomly initialized MTP modules, "error" refuses. Raises ValueError naming the file and the keys."""
    if missing_mtp not in MISSING_MTP_POLICIES:
        raise ValueError(f"missing_mtp must be one of {MISSING_MTP_POLICIES}, got {missing_mtp!r}")
    ckpt = SafetensorsCheckpoint(hf_dir)
    cfg_file = ckpt.path / CONFIG_FILE
    hf_cfg = ckpt.config()
    layout = CheckpointLayout.from_hf_config(hf_cfg, cfg_file)
    init_mtp = False
    if layout.num_mtp_layers and not mtp_layers_present(ckpt.keys(), layout):
        what = (f"{hf_dir}: config.json has num_nextn_predict_layers={layout.num_mtp_layers} but the checkpoint holds "
                f"no MTP layers (no layer >= num_hidden_layers={layout.num_hidden_layers})")
        if missing_mtp == "error":
            raise ValueError(what)
        if missing_mtp == "drop":
            report(f"{what}; dropping MTP: num_nextn_predict_layers=0 from here on (from_pretrained's "
                   "missing_mtp='init' keeps randomly initialized MTP modules instead)")
            hf_cfg = {**hf_cfg, "num_nextn_predict_layers": 0}
            layout = CheckpointLayout.from_hf_config(hf_cfg, cfg_file)
        else:
            init_mtp = True
    model = build_meta_model(hf_cfg, cls, cfg_file)
    expected = model.state_dict()
    plan = plan_hf_keys(ckpt.keys(), layout)
    check_against([t.key for t in plan.tensors if t.op is not Op.SHARED], expected, layout, plan,
                  is_mtp_key if init_mtp else None)
    return HFSource(ckpt, hf_cfg, layout, model, expected, frozenset(n for n, _ in model.named_buffers()),
                    fp32_tensors(model), init_mtp)


def load_group(src: HFSource, keys: Iterable[str], dtype: torch.dtype, crcs: dict[str, str],
               ignore_mtp_copies: bool = False, report: Callable[[str], None] = warnings.warn,
               device: torch.device | str | None = None,
               empty: Callable[..., torch.Tensor] = torch.empty) -> dict[str, torch.Tensor]:
    """The load loop of from_pretrained and hf2dcp: read the HF keys of one group (or any complete set) into our
    tensors, each allocated once (``empty(shape, dtype=, device=)``; every element is then written) in the dtype
    ``src.dtype_of`` gives and filled in place (expert stacks included).

    `crcs` (HF name -> CRC-32 of the stored bytes) receives every tensor read, MTP copies included, which are
    then checked against their main tensors (``check_mtp_copies``: the main tensors' CRCs must be in `crcs`
    already; groups come globals first). Raises ValueError naming the keys and shapes."""
    plan = plan_hf_keys(keys, src.layout)
    if plan.problems():
        raise ValueError(f"checkpoint keys do not match the config: {plan.problems()}")
    tensors = {}
    for mapped in plan.tensors:
        if mapped.op is Op.SHARED:
            crcs[mapped.sources[0]] = src.ckpt.fingerprint(mapped.sources[0])
        else:
            want = src.expected[mapped.key]
            out = empty(tuple(want.shape), dtype=src.dtype_of(mapped.key, dtype), device=device)
            into = f"{mapped.key} {tuple(want.shape)} of the model built from config.json"
            for hf_key, view in mapped.parts(out):
                crcs[hf_key] = src.ckpt.read_into(hf_key, view, into)
            tensors[mapped.key] = out
    src.ckpt.release()
    check_mtp_copies(src, plan.tensors, crcs, ignore_mtp_copies, report)
    return tensors


def check_mtp_copies(src: HFSource, mapped: Iterable[MappedTensor], crcs: Mapping[str, str], ignore: bool,
                     report: Callable[[str], None]) -> None:
    """The one MTP-copy check: each SHARED source (an MTP layer's embed_tokens / shared_head.head, or a tied
    lm_head) must be stored exactly as the main tensor it stands for: same shape, dtype and CRC-32 of the bytes.
    A mismatch raises ValueError, or with `ignore` is reported and the copy dropped."""
    for m in mapped:
        if m.op is not Op.SHARED:
            continue
        copy, main = m.sources[0], ours_to_hf_name(m.key, src.layout)
        assert main in crcs, f"{main} must be read before its copy {copy} is checked"
        if src.ckpt.stored(copy) == src.ckpt.stored(main) and crcs[copy] == crcs[main]:
            continue
        msg = (f"{copy} differs from {main}, which our model uses in its place (the published DeepSeek-V3 stores "
               "identical copies)")
        if not ignore:
            raise ValueError(msg + "; pass ignore_mtp_copies=True (--ignore-mtp-copies) to drop the copy and use the "
                                   "main tensor")
        report(msg + "; dropped, the main tensor is used")


def from_pretrained(cls, hf_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, missing_mtp: str = "drop",
                    ignore_mtp_copies: bool = False):
    """Build `cls` (DeepseekV3ForCausalLM) from an HF safetensors checkpoint directory.

    dtype: the parameters' dtype (None: the config's dtype, else the checkpoint's majority floating dtype; see
    the module docstring); routers and buffers keep theirs. device: where the model is built and loaded.
    missing_mtp: "drop" (default), "init" or "error" (``open_hf_checkpoint``).
    ignore_mtp_copies: drop the MTP layers' embed_tokens / shared_head.head copies even when they differ from
    the main tensors (warning) instead of raising.
    Raises ValueError naming missing, unexpected and mis-shaped keys, and unreadable files.
    """
    from .init import init_weights_

    src = open_hf_checkpoint(hf_dir, cls, missing_mtp, warnings.warn)
    dtype = src.default_dtype() if dtype is None else dtype
    device = torch.device(device) if device is not None else torch.device("cpu")
    state: dict[str, torch.Tensor] = {}
    crcs: dict[str, str] = {}
    for keys in src.ckpt.groups().values():
        state.update(load_group(src, keys, dtype, crcs, ignore_mtp_copies, warnings.warn, device))
    model = src.model
    if src.init_mtp:  # only the MTP modules are initialized, then cast to the dtype they load in
        for mtp in model.model.mtp:
            mtp.to_empty(device=device)
            init_weights_(mtp, model.config.initializer_range)
        state.update({k: v.to(src.dtype_of(k, dtype)) for k, v in model.state_dict().items() if is_mtp_key(k)})
    model.load_state_dict(state, strict=True, assign=True)
    _materialize_meta_buffers(model, device)
    return model


def _materialize_meta_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers are in no checkpoint: after a meta-device build they are still meta. The only ones
    the model has are the routers' token counters, which start at zero (rope tables are plain CPU attributes)."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_meta:
                assert name in module._non_persistent_buffers_set, f"persistent buffer {name} was not loaded"
                module._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not left, f"tensors left on the meta device after loading: {left[:4]}"


def _model_hf_config(model) -> dict:
    cfg = getattr(model, "config", None) or getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "to_hf"):
        raise ValueError(f"save_pretrained: {type(model).__name__} has no DeepseekV3Config at .config/.cfg")
    return cfg.to_hf()


def majority_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    """The floating dtype holding the most elements (fp32 when there is none): what config.json's dtype says."""
    counts: Counter = Counter()
    for t in tensors:
        if t.is_floating_point():
            counts[t.dtype] += t.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


def save_pretrained(model, out_dir: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `model` as an HF checkpoint: config.json + sharded safetensors + index, published per-expert layout
    (MTP modules as layers L+k with their embed/head copies), loadable by transformers'
    ``DeepseekV3ForCausalLM.from_pretrained``. Written under a temporary name, fsynced and moved into place, so an
    interrupted save leaves no half checkpoint. Sharded (DTensor) models: save with DCP and use
    ``python -m tritonmoe.dsv3.convert dcp2hf``.
    """
    from torch.distributed.tensor import DTensor

    hf_cfg = _model_hf_config(model)
    layout = CheckpointLayout.from_hf_config(hf_cfg, f"{type(model).__name__}.config")
    state = model.state_dict()
    sharded = [k for k, v in state.items() if isinstance(v, DTensor)]
    if sharded:
        raise ValueError(f"save_pretrained needs plain tensors, but {sharded[0]} is a DTensor (FSDP/EP model): save "
                         "it with DCP and convert with `python -m tritonmoe.dsv3.convert dcp2hf`")
    hf_cfg["dtype"] = str(majority_dtype(state.values())).removeprefix("torch.")
    write_hf_checkpoint(out_dir, hf_cfg, layout, {k: (tuple(v.shape), v.dtype) for k, v in state.items()},
                        state.__getitem__, state.__getitem__, max_shard_bytes)


def write_hf_checkpoint(out_dir: str | os.PathLike, hf_cfg: Mapping, layout: CheckpointLayout,
                        specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]], load: Callable[[str], torch.Tensor],
                        get_main: Callable[[str], torch.Tensor], max_shard_bytes: int,
                        after_group: Callable[[int | None], None] | None = None) -> None:
    """The HF writing loop of ``save_pretrained`` and ``convert dcp2hf``. `specs` gives each of our tensors' shape
    and dtype, from which the shards are planned before any data moves. Then, group by group (``ours_groups``:
    globals, then layers), `load(key)` gives one of our tensors at a time, streamed in the published per-expert
    layout into the shards under ``<out_dir>.partial`` and dropped before the next is loaded (DCP's reader holds a
    second copy of the tensors it reads: loading whole groups, dcp2hf's peak RSS growth was 2.35x the largest
    layer); an MTP group's embedding/head copies come from `get_main`; `after_group(group)` runs after each group.
    Then `hf_cfg` goes to config.json and the folder is published."""
    groups = ours_groups(specs, layout)

    def pieces(get: Callable[[str], torch.Tensor], main: Callable[[str], torch.Tensor]):
        """(group, HF name, tensor) in writing order. Generator expressions, so that no frame keeps a view of a
        tensor alive once its pieces are out."""
        for g, keys in groups.items():
            for key in keys:
                yield from ((g, name, t) for name, t in ours_tensor_to_hf(key, get(key), layout))
            yield from ((g, name, t) for name, t in mtp_copies_to_hf(keys, layout, main))

    meta = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in specs.items()}
    plan = [(name, tuple(t.shape), t.dtype) for _, name, t in pieces(meta.__getitem__, meta.__getitem__)]
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    clear_partial(tmp)
    writer = ShardedSafetensorsWriter(tmp, plan, max_shard_bytes)
    group = next(iter(groups), None)
    try:
        for g, name, t in pieces(load, get_main):
            if g != group and after_group is not None:
                after_group(group)
            group = g
            writer.add(name, t)
            del t
        if after_group is not None and groups:
            after_group(group)
        writer.finish()
    finally:
        writer.close()
    write_durable(tmp / CONFIG_FILE, json.dumps(hf_cfg, indent=2) + "\n")
    publish(tmp, out_dir)
