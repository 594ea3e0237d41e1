"""How every parameter and buffer of the model starts, and the one walker that applies it.

Each of our modules owns its rule (``init_rule(name) -> InitRule`` for its own tensors: RMSNorm's gains 1, the
router's weight N(0, std) and its buffers 0, the experts' stacks N(0, std)); torch's own layers, which cannot carry
a method, take the rule of transformers' DeepSeek-V3 init here (``default_rule``: Linear and Embedding weights
N(0, initializer_range), biases 0). Constructors only allocate. ``init_weights_`` walks a module tree once and
fills every tensor by its owner's rule; the public roots (``DeepseekV3ForCausalLM``, the drop-in ``MoE``) build
their children on the meta device and call it once (``build_then_init``), so an eagerly built model draws each
value exactly once, and a model built on the meta device draws nothing. The trainer's sharded init
(tritonmoe.parallel.init_sharded_) asks the same rules by parameter name (``rule_for``), so both paths agree.

A leaf module: it imports nothing from the rest of the package, so model, moe and checkpoint code can all use it
without an import cycle.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass(frozen=True)
class InitRule:
    """How one parameter or buffer starts."""
    kind: Literal["normal", "ones", "zeros"]  # N(0, std) / norm gains / biases, balancing bias, token counters
    std: float = 0.0                          # for "normal"

    def fill_(self, t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        with torch.no_grad():
            if self.kind == "normal":
                return t.normal_(0.0, self.std, generator=generator)
            return t.fill_(1 if self.kind == "ones" else 0)


def default_rule(module: nn.Module, name: str, std: float) -> InitRule:
    """The rule for torch's own layers: Linear and Embedding weights N(0, std), Linear biases 0."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        return InitRule("normal", std) if name == "weight" else InitRule("zeros")
    raise ValueError(f"no init rule for {name!r} of {type(module).__name__} (give the module an init_rule method)")


def rule_for(module: nn.Module, name: str, std: float) -> InitRule:
    """The rule for `module`'s own parameter or buffer `name`: the module's ``init_rule`` when it has one, else
    ``default_rule`` with the model's initializer_range `std`."""
    own = getattr(module, "init_rule", None)
    return own(name) if own is not None else default_rule(module, name, std)


def init_weights_(root: nn.Module, std: float) -> nn.Module:
    """Fill every parameter and buffer of `root` by its owner's rule, in module order, from the global RNG."""
    for m in root.modules():
        for name, t in itertools.chain(m.named_parameters(recurse=False), m.named_buffers(recurse=False)):
            rule_for(m, name, std).fill_(t)
    return root


@contextlib.contextmanager
def build_then_init(root: nn.Module, std: float):
    """For a root module's constructor: the children built inside the block go on the meta device (they only
    allocate, so nothing is drawn there); after it they are allocated where the root is being built and
    initialized once by ``init_weights_``. Built under ``torch.device("meta")`` already, the root stays there."""
    device = torch.get_default_device()
    with torch.device("meta"):
        yield
    if device.type != "meta":
        root.to_empty(device=device)
        init_weights_(root, std)
