"""Names of the published Hugging Face DeepSeek-V3 layout <-> names of our state dict: the one key mapping.

No I/O: this module maps key names and says which slice of our tensor each HF tensor fills (``MappedTensor.parts``);
the reader that fills them is ``safetensors_io``, the loaders that drive it are ``checkpoint`` and ``convert``.

The mapping, applied one HF decoder layer at a time so that the streaming converter never holds more than one layer:

    model.layers.{i}.mlp.experts.{e}.{gate,up}_proj.weight  [I,H] -> model.layers.{i}.mlp.experts.gate_up_proj
        [E,2I,H] (gate rows first), experts sorted by INTEGER id (a string sort puts 10 before 2)
    model.layers.{i}.mlp.experts.{e}.down_proj.weight       [H,I] -> model.layers.{i}.mlp.experts.down_proj
        [E,H,I]; transformers 5's fused ``mlp.experts.gate_up_proj`` / ``down_proj`` are accepted as they are
    model.layers.{L+k}.{enorm,hnorm,eh_proj}.weight               -> model.mtp.{k}.<same>   (L = num_hidden_layers)
    model.layers.{L+k}.shared_head.norm.weight                    -> model.mtp.{k}.norm.weight
    model.layers.{L+k}.shared_head.head.weight, .embed_tokens.weight: copies of lm_head / model.embed_tokens,
        which our model shares with MTP (``Op.SHARED``: checked equal to the main tensor, never stored); on the
        way back they are written again, so that the published layout is reproduced.
    model.layers.{L+k}.<rest>                                     -> model.mtp.{k}.layer.<rest>
    *rotary_emb* buffers                                          -> ignored
    every other key                                               -> same name

Group ids: the HF layer index (an int; MTP module k is L+k) or ``None`` for the tensors outside the decoder
layers (embedding, final norm, head). Both directions group by the same ids, globals first.

Shape letters: E routed experts, I expert intermediate size, H hidden size.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Iterable, Iterator, Mapping

import torch

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
_MTP_KEY = re.compile(r"^model\.mtp\.(\d+)\.(.+)$")
_MTP_OWN = ("enorm.weight", "hnorm.weight", "eh_proj.weight")
_GLOBAL_KEYS = (EMBED, "model.norm.weight", HEAD)


@dataclass(frozen=True)
class CheckpointLayout:
    """What the mapping needs to know about a model, read from its HF ``config.json``."""

    num_hidden_layers: int     # decoder layers of the main stack (L)
    num_mtp_layers: int        # MTP modules, stored by HF as layers L .. L+num_mtp_layers-1
    num_experts: int           # routed experts per MoE layer (E)
    tie_word_embeddings: bool  # lm_head is model.embed_tokens (no lm_head key of its own)

    @classmethod
    def from_hf_config(cls, cfg: object, source: object = "config.json") -> "CheckpointLayout":
        """Raises ValueError naming `source` (the file the dict came from) and the key when a field is absent or
        not a whole number >= 0."""
        if not isinstance(cfg, Mapping):
            raise ValueError(f"{source}: holds a JSON {type(cfg).__name__}, not an object of config fields")

        def count(*names: str, required: bool = False) -> int:
            name = next((n for n in names if cfg.get(n) is not None), None)
            if name is None:
                if required:
                    raise ValueError(f"{source}: {names[0]} is missing (the number of decoder layers)")
                return 0
            value = cfg[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{source}: {name} must be a whole number >= 0, got {value!r}")
            return value

        return cls(count("num_hidden_layers", required=True), count("num_nextn_predict_layers", "num_mtp_layers"),
                   count("n_routed_experts"), bool(cfg.get("tie_word_embeddings", False)))

    def head_key(self) -> str:
        """Our tensor that plays the output head (the embedding when tied)."""
        return EMBED if self.tie_word_embeddings else HEAD


class Op(Enum):
    COPY = "copy"                    # one HF tensor, values unchanged
    STACK_GATE_UP = "stack_gate_up"  # sources: gate of experts 0..E-1, then up of experts 0..E-1 -> [E,2I,H]
    STACK_DOWN = "stack_down"        # sources: down of experts 0..E-1 -> [E,H,I]
    SHARED = "shared"                # an MTP copy of a main tensor: checked equal to `key`, never stored


@dataclass(frozen=True)
class MappedTensor:
    key: str                   # our state-dict name (for SHARED: the main-model tensor it must equal)
    op: Op
    sources: tuple[str, ...]   # HF names read to build it, in stacking order

    def parts(self, out: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """(HF name, the view of `out` it fills) for each source; `out` is our tensor (for SHARED: one of the main
        tensor's shape). Views of a contiguous `out` are contiguous: a reader can fill them in place."""
        if self.op in (Op.COPY, Op.SHARED):
            return [(self.sources[0], out)]
        if self.op is Op.STACK_DOWN:
            return [(name, out[e]) for e, name in enumerate(self.sources)]
        E, I = len(self.sources) // 2, out.shape[1] // 2  # gate rows first, then up rows
        return [(name, out[n % E, (n // E) * I:(n // E + 1) * I]) for n, name in enumerate(self.sources)]

    def stacked_shape(self, part_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Our tensor's shape when each source has `part_shape`."""
        if self.op is Op.STACK_GATE_UP:
            return (len(self.sources) // 2, 2 * part_shape[0], *part_shape[1:])
        if self.op is Op.STACK_DOWN:
            return (len(self.sources), *part_shape)
        return tuple(part_shape)


@dataclass
class MappingPlan:
    tensors: list[MappedTensor]   # what the HF keys become
    ignored: list[str]            # rotary buffers
    unexpected: list[str]         # HF keys the layout has no place for
    missing: list[str]            # HF keys a partly present expert stack lacks

    def problems(self) -> str:
        """'' when every key has a place and every expert stack is complete, else what is missing/unexpected."""
        return describe_key_problems(self.missing, self.unexpected)


def hf_group_of(hf_key: str) -> int | None:
    """The HF layer index of a key, or None for keys outside the decoder layers."""
    m = _LAYER_KEY.match(hf_key)
    return int(m.group(1)) if m else None


def ours_group_of(key: str, layout: CheckpointLayout) -> int | None:
    """The HF layer index our key is stored in (MTP module k -> L+k), or None outside the decoder layers."""
    m = _LAYER_KEY.match(key)
    if m:
        return int(m.group(1))
    m = _MTP_KEY.match(key)
    return layout.num_hidden_layers + int(m.group(1)) if m else None


def _by_group(keys: Iterable[str], group_of: Callable[[str], int | None]) -> dict[int | None, list[str]]:
    by_group: dict[int | None, list[str]] = defaultdict(list)
    for k in keys:
        by_group[group_of(k)].append(k)
    return dict(sorted(by_group.items(), key=lambda kv: -1 if kv[0] is None else kv[0]))


def hf_groups(hf_keys: Iterable[str]) -> dict[int | None, list[str]]:
    """HF keys by group id, in processing order: globals first, then HF layers ascending."""
    return _by_group(hf_keys, hf_group_of)


def ours_groups(keys: Iterable[str], layout: CheckpointLayout) -> dict[int | None, list[str]]:
    """Our keys by group id (``ours_group_of``), in the same order as ``hf_groups``."""
    return _by_group(keys, lambda k: ours_group_of(k, layout))


def mtp_layers_present(hf_keys: Iterable[str], layout: CheckpointLayout) -> bool:
    return any((g := hf_group_of(k)) is not None and g >= layout.num_hidden_layers for k in hf_keys)


def is_mtp_key(key: str) -> bool:
    return key.startswith("model.mtp.")


def plan_hf_keys(hf_keys: Iterable[str], layout: CheckpointLayout) -> MappingPlan:
    """Map a set of HF key names (any subset: one layer, or the whole checkpoint) to our tensors.

    Expert stacks must be complete within the given keys; a partial stack reports the absent experts' HF names in
    ``missing``, expert ids >= E land in ``unexpected``.
    """
    L, M, E = layout.num_hidden_layers, layout.num_mtp_layers, layout.num_experts
    plan = MappingPlan([], [], [], [])
    experts: dict[str, dict[str, dict[int, str]]] = defaultdict(lambda: defaultdict(dict))  # prefix -> proj -> id
    for hf_key in hf_keys:
        if "rotary_emb" in hf_key:
            plan.ignored.append(hf_key)
            continue
        m = _LAYER_KEY.match(hf_key)
        if m is None:
            if hf_key == HEAD and layout.tie_word_embeddings:
                plan.tensors.append(MappedTensor(EMBED, Op.SHARED, (hf_key,)))
            elif hf_key in _GLOBAL_KEYS:
                plan.tensors.append(MappedTensor(hf_key, Op.COPY, (hf_key,)))
            else:
                plan.unexpected.append(hf_key)
            continue
        i, rest = int(m.group(1)), m.group(2)
        if i < L:
            prefix = f"model.layers.{i}."
        elif i < L + M:
            k = i - L
            if rest in _MTP_OWN:
                plan.tensors.append(MappedTensor(f"model.mtp.{k}.{rest}", Op.COPY, (hf_key,)))
                continue
            if rest == "shared_head.norm.weight":
                plan.tensors.append(MappedTensor(f"model.mtp.{k}.norm.weight", Op.COPY, (hf_key,)))
                continue
            if rest in ("shared_head.head.weight", "embed_tokens.weight"):
                main = layout.head_key() if rest.startswith("shared_head") else EMBED
                plan.tensors.append(MappedTensor(main, Op.SHARED, (hf_key,)))
                continue
            prefix = f"model.mtp.{k}.layer."
        else:
            plan.unexpected.append(hf_key)
            continue
        e = _HF_EXPERT.match(rest)
        if e is None:
            plan.tensors.append(MappedTensor(prefix + rest, Op.COPY, (hf_key,)))
        elif int(e.group(1)) >= E:
            plan.unexpected.append(hf_key)
        else:
            experts[prefix][e.group(2)][int(e.group(1))] = hf_key
    for prefix, by_proj in experts.items():
        hf_prefix = _hf_prefix_of(prefix, layout)
        names = {p: [by_proj[p].get(x, f"{hf_prefix}mlp.experts.{x}.{p}.weight") for x in range(E)]
                 for p in ("gate_proj", "up_proj", "down_proj")}
        plan.missing += [n for p in names for x, n in enumerate(names[p]) if x not in by_proj[p]]
        if prefix + _FUSED_EXPERTS[0] in {t.key for t in plan.tensors}:
            plan.unexpected += [n for p in by_proj.values() for n in p.values()]  # fused AND per-expert
            continue
        plan.tensors.append(MappedTensor(prefix + _FUSED_EXPERTS[0], Op.STACK_GATE_UP,
                                         tuple(names["gate_proj"] + names["up_proj"])))
        plan.tensors.append(MappedTensor(prefix + _FUSED_EXPERTS[1], Op.STACK_DOWN, tuple(names["down_proj"])))
    return plan


def _hf_prefix_of(our_layer_prefix: str, layout: CheckpointLayout) -> str:
    m = re.match(r"^model\.mtp\.(\d+)\.layer\.$", our_layer_prefix)
    return f"model.layers.{layout.num_hidden_layers + int(m.group(1))}." if m else our_layer_prefix


def check_part_shape(hf_key: str, shape: tuple[int, ...], view: torch.Tensor, into: str) -> None:
    """Raise ValueError naming `hf_key` when a source of `shape` cannot fill `view` (a part of our tensor `into`)."""
    if tuple(shape) != tuple(view.shape):
        raise ValueError(f"{hf_key}: shape {tuple(shape)} does not fit {into} (expected {tuple(view.shape)})")


def iter_hf_to_ours(hf_keys: Iterable[str], get: Callable[[str], torch.Tensor], layout: CheckpointLayout,
                    ) -> Iterator[tuple[MappedTensor, torch.Tensor]]:
    """HF tensors already in memory (`get(hf_name)`; one layer or any complete set) -> (mapping, our tensor), one at
    a time. COPY and SHARED entries yield the source tensor itself; stacks are built from the sources' shapes.
    Raises ValueError naming the keys when the set has keys the layout has no place for, an incomplete expert stack,
    or experts of different shapes."""
    plan = plan_hf_keys(hf_keys, layout)
    if plan.problems():
        raise ValueError(f"checkpoint keys do not match the config: {plan.problems()}")
    for mapped in plan.tensors:
        if mapped.op in (Op.COPY, Op.SHARED):
            yield mapped, get(mapped.sources[0])
            continue
        first = get(mapped.sources[0])
        out = torch.empty(mapped.stacked_shape(tuple(first.shape)), dtype=first.dtype, device=first.device)
        for hf_key, view in mapped.parts(out):
            t = get(hf_key)
            check_part_shape(hf_key, tuple(t.shape), view, f"{mapped.key} {tuple(out.shape)} (the other experts' "
                                                           "shape)")
            view.copy_(t)
        yield mapped, out


def ours_to_hf_name(key: str, layout: CheckpointLayout) -> str:
    """The HF name of one of our non-expert tensors (expert stacks expand in `iter_ours_to_hf`)."""
    m = _MTP_KEY.match(key)
    if m is None:
        return key
    base = f"model.layers.{layout.num_hidden_layers + int(m.group(1))}."
    rest = m.group(2)
    if rest in _MTP_OWN:
        return base + rest
    if rest == "norm.weight":
        return base + "shared_head.norm.weight"
    if rest.startswith("layer."):
        return base + rest[len("layer."):]
    raise ValueError(f"{key}: not a tensor of an MTP module (expected enorm/hnorm/eh_proj/norm/layer.*)")


def iter_ours_to_hf(tensors: Mapping[str, torch.Tensor], layout: CheckpointLayout,
                    get_main: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Our tensors (one group or all) -> (HF name, contiguous tensor) in the published per-expert layout
    (``ours_tensor_to_hf`` for each, then ``mtp_copies_to_hf``), so the published layout is reproduced."""
    for key, t in tensors.items():
        yield from ours_tensor_to_hf(key, t, layout)
    yield from mtp_copies_to_hf(tensors, layout, get_main)


def ours_tensor_to_hf(key: str, t: torch.Tensor, layout: CheckpointLayout) -> Iterator[tuple[str, torch.Tensor]]:
    """One of our tensors -> (HF name, contiguous tensor): an expert stack becomes one tensor per expert and
    projection (views of the stack, no copy when it is contiguous); works on meta tensors too, to plan shapes."""
    if not key.endswith(_FUSED_EXPERTS):
        yield ours_to_hf_name(key, layout), t.contiguous()
        return
    gate_up = key.endswith(_FUSED_EXPERTS[0])
    prefix = ours_to_hf_name(key, layout)[: -len("gate_up_proj" if gate_up else "down_proj")]
    if t.dim() != 3 or t.shape[0] != layout.num_experts:
        raise ValueError(f"{key}: expected [E={layout.num_experts}, ...] expert stack, got {tuple(t.shape)}")
    for e in range(t.shape[0]):
        if gate_up:
            inter = t.shape[1] // 2
            yield f"{prefix}{e}.gate_proj.weight", t[e, :inter].contiguous()
            yield f"{prefix}{e}.up_proj.weight", t[e, inter:].contiguous()
        else:
            yield f"{prefix}{e}.down_proj.weight", t[e].contiguous()


def mtp_copies_to_hf(keys: Iterable[str], layout: CheckpointLayout,
                     get_main: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """For every MTP module among our `keys`, its copies of the embedding and output head as the published
    checkpoint stores them, from `get_main(our_key)`."""
    for k in sorted({int(m.group(1)) for key in keys if (m := _MTP_KEY.match(key))}):
        base = f"model.layers.{layout.num_hidden_layers + k}."
        yield base + "embed_tokens.weight", get_main(EMBED).contiguous()
        yield base + "shared_head.head.weight", get_main(layout.head_key()).contiguous()


def describe_key_problems(missing: Iterable[str], unexpected: Iterable[str], limit: int = 12) -> str:
    out = []
    for what, names in (("missing", sorted(missing, key=natural)), ("unexpected", sorted(unexpected, key=natural))):
        if names:
            shown = ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
            out.append(f"{len(names)} {what} key(s): {shown}")
    return "; ".join(out)


def natural(name: str):
    """Sort key treating digit runs as integers (layer 10 after layer 2)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def hf_names_for(key: str, layout: CheckpointLayout) -> str:
    """HF name(s) one of our keys comes from, for error messages."""
    if key.endswith(_FUSED_EXPERTS):
        base = ours_to_hf_name(key, layout).rsplit("mlp.experts.", 1)[0]
        projs = "{gate,up}_proj" if "gate_up" in key else "down_proj"
        return f"{base}mlp.experts.{{0..{layout.num_experts - 1}}}.{projs}.weight"
    return ours_to_hf_name(key, layout)


def check_against(plan_keys: Iterable[str], expected: Mapping[str, object], layout: CheckpointLayout,
                  plan: MappingPlan | None = None, skip_missing: Callable[[str], bool] | None = None) -> None:
    """Raise ValueError listing missing and unexpected keys (ours and their HF names) of a whole checkpoint."""
    plan_keys = set(plan_keys)
    missing = [f"{k} (HF {hf_names_for(k, layout)})" for k in expected if k not in plan_keys
               and not (skip_missing and skip_missing(k))]
    missing += plan.missing if plan else []
    unexpected = [k for k in plan_keys if k not in expected]
    unexpected += plan.unexpected if plan else []
    problems = describe_key_problems(missing, unexpected)
    if problems:
        raise ValueError(f"checkpoint does not match the model built from its config.json: {problems}")
