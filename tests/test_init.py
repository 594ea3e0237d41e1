"""Initialization owned by each module, applied once by one walker (dsv3/init.py).

The trainer's name-seeded sharded init and from_pretrained's init of missing MTP modules must give the same
values as before the rules moved into the modules: the digests below were recorded from commit 80f7731, the
last one with the old `model.init_rule` switch, by this file's own `_digest` on the same builds (the state dict:
parameters and persistent buffers; later commits add non-persistent counters, which hold no initial weight).
"""

import ast
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tritonmoe.dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM, MoE

# sha256 over (name, bytes) of every state-dict tensor, sorted by name: tiny preset, seed 3, world 1 (the trainer's
# _build_model), and the MTP module of from_pretrained(missing_mtp="init") after torch.manual_seed(11).
TRAINER_TINY_SEED3 = "c934a88a12ca56d6c3cd09725e699c6d80bac741edf0a475008a86232c53054d"
MTP_INIT_SEED11 = "2f2607815127ec18b3d69be68ca4aef58852c26730a6af5052aaa1b307e8b957"


def _digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        h.update(name.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _trainer_init():
    from tritonmoe.dsv3.train import _build_model

    model = _build_model(DeepseekV3Config.from_hf("tiny"), 3, 1, torch.device("cpu"), None)
    return _digest(model.state_dict())


def test_trainer_init_is_bit_identical_to_before(tmp_path):
    from dist_utils import run_distributed

    (digest,) = run_distributed(_trainer_init, 1)
    assert digest == TRAINER_TINY_SEED3


def test_missing_mtp_init_is_bit_identical_to_before(tmp_path):
    transformers = __import__("pytest").importorskip("transformers")
    cfg = DeepseekV3Config.from_hf("tiny")
    hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in cfg.to_hf().items() if k != "architectures"})
    torch.manual_seed(0)
    transformers.DeepseekV3ForCausalLM(hf_cfg).save_pretrained(tmp_path)  # transformers writes no MTP layer
    torch.manual_seed(11)
    ours = DeepseekV3ForCausalLM.from_pretrained(tmp_path, missing_mtp="init")
    assert _digest({n: t for n, t in ours.state_dict().items() if n.startswith("model.mtp.")}) == MTP_INIT_SEED11


class _Draws(TorchDispatchMode):
    """Elements each random fill op writes on real (non-meta) tensors."""

    def __init__(self):
        super().__init__()
        self.n = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("normal_", "uniform_", "kaiming_uniform_") and not args[0].is_meta:
            self.n[name] = self.n.get(name, 0) + args[0].numel()
        return func(*args, **(kwargs or {}))


def test_eager_build_draws_every_value_once():
    # Before: every level initialized in its constructor (nn.Linear's kaiming draw, then MoE, then the model),
    # so each expert weight was drawn three times. Now constructors allocate and one walk draws each value once.
    cfg = DeepseekV3Config.from_hf("tiny")
    with _Draws() as draws:
        model = DeepseekV3ForCausalLM(cfg)
    normal = sum(p.numel() for n, p in model.named_parameters() if model.init_rule(n).kind == "normal")
    assert draws.n == {"normal_": normal}
    assert all((model.get_parameter(n) == 1).all() for n, _ in model.named_parameters() if n.endswith("norm.weight"))
    assert all((b == 0).all() for _, b in model.named_buffers())
    with _Draws() as draws:
        moe = MoE(cfg)  # the drop-in layer built alone initializes itself, once
    assert draws.n == {"normal_": sum(p.numel() for p in moe.parameters())}
    with _Draws() as draws, torch.device("meta"):
        DeepseekV3ForCausalLM(cfg)
    assert draws.n == {}


def test_meta_build_does_not_import_dynamo():
    # Before: nn.Embedding's own normal_ ran on the meta device, whose decomposition imports torch._dynamo
    # (0.4-1 s of every from_pretrained / generate launch). Constructors only allocate.
    code = ("import sys, torch\nfrom tritonmoe.dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM\n"
            "with torch.device('meta'):\n    DeepseekV3ForCausalLM(DeepseekV3Config.from_hf('tiny'))\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def _relative_imports(path: Path) -> set[str]:
    """Sibling modules a dsv3 module imports, at top level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_no_import_cycle_inside_dsv3():
    root = Path(__file__).resolve().parent.parent / "dsv3"
    graph = {p.stem: _relative_imports(p) for p in root.glob("*.py") if p.stem != "__init__"}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph.get(start, ()))

    cycles = sorted(m for m in graph if reaches(m, m))
    assert not cycles, {m: sorted(graph[m]) for m in cycles}
    assert json.dumps(sorted(graph["init"])) == "[]"  # the walker is a leaf
