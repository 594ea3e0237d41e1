"""What changes over a training run, as functions of the step: the learning rate, and DeepSeek-V3's schedules of
the global batch size, the MTP loss weight and the balancing bias rate (report sec. 4.2).

In: the trainer's options (parsed and validated here, each error naming its option). Out: a frozen `Schedules`
whose methods give the values at step s (numbered from 1). Every value depends on the step alone (the tokens
trained before step s follow from the batch sizes of steps 1..s-1), never on the world size or the micro-batch
size, so every layout trains the same thing and a resume at any step continues it.

- LR: linear warmup over steps 1..warmup, then cosine from lr to lr * min_lr_ratio at step decay_steps.
- ``--batch-size-ramp TOKENS:FROM``: the global batch grows from FROM sequences to --batch-size over the first
  TOKENS training tokens, in levels that are multiples of FROM (the report: 3,072 -> 15,360 over 469B tokens, which
  is 5 levels of 3,072). Levels as multiples of FROM rather than of one layout's micro-batch keep the batch of
  every step the same for every layout; FROM must divide --batch-size and be divisible by dp * micro-batch size.
- ``--mtp-weight-schedule 0.3:TOKENS:0.1``: lambda 0.3 while fewer than TOKENS tokens were trained, then 0.1 (the
  report: 0.3 for the first 10T tokens, 0.1 for the remaining 4.8T).
- ``--bias-rate-schedule TOKENS_LEFT:0``: the aux-loss-free balancing rate gamma (the config's bias_update_rate)
  until TOKENS_LEFT tokens remain in the run (--decay-steps worth of tokens), then 0 (the report: 0.001, then 0.0 for
  the last 500B tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _tokens(text: str, option: str) -> int:
    """A token count: an integer, optionally with a K/M/B/T suffix (10T = 10**13)."""
    units = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
    t = text.strip().upper()
    scale = units.get(t[-1:], 1)
    try:
        value = float(t[:-1] if t[-1:] in units else t) * scale
    except ValueError:
        raise ValueError(f"{option}: {text!r} is not a token count (an integer, or e.g. 469B, 10T)") from None
    if not math.isfinite(value) or value < 0 or value != int(value):
        raise ValueError(f"{option}: {text!r} is not a whole, non-negative token count")
    return int(value)


def _number(text: str, option: str, lo: float = 0.0, hi: float = math.inf) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{option}: {text!r} is not a number") from None
    if not (math.isfinite(v) and lo <= v <= hi):
        raise ValueError(f"{option}: {text!r} must be a finite number in [{lo}, {hi}]")
    return v


@dataclass(frozen=True)
class Schedules:
    lr: float                  # peak learning rate
    warmup: int                # warmup steps
    decay_steps: int           # length of the cosine schedule
    min_lr_ratio: float        # cosine floor as a fraction of lr
    batch_size: int            # global batch in sequences once the ramp (if any) is over
    seq_len: int
    ramp_tokens: int = 0       # --batch-size-ramp TOKENS (0: no ramp)
    ramp_from: int = 0         # --batch-size-ramp FROM
    mtp_weight: tuple[float, int, float] | None = None  # (lambda before, tokens, lambda after) or None: config's
    bias_rate_left: int | None = None  # tokens left in the run when gamma drops to 0, or None: never

    # ---------------------------------------------------------------------------------------- parsing
    @classmethod
    def from_args(cls, args, warmup: int, decay_steps: int) -> "Schedules":
        ramp_tokens = ramp_from = 0
        if args.batch_size_ramp:
            parts = args.batch_size_ramp.split(":")
            if len(parts) != 2:
                raise ValueError(f"--batch-size-ramp {args.batch_size_ramp!r}: expected TOKENS:FROM (e.g. 469B:3072)")
            ramp_tokens = _tokens(parts[0], "--batch-size-ramp")
            ramp_from = int(_number(parts[1], "--batch-size-ramp", 1, args.batch_size))
            if args.batch_size % ramp_from:
                raise ValueError(f"--batch-size-ramp: FROM={ramp_from} must divide --batch-size {args.batch_size} "
                                 "(the ramp's levels are multiples of FROM)")
        mtp = None
        if args.mtp_weight_schedule:
            parts = args.mtp_weight_schedule.split(":")
            if len(parts) != 3:
                raise ValueError(f"--mtp-weight-schedule {args.mtp_weight_schedule!r}: expected "
                                 "BEFORE:TOKENS:AFTER (e.g. 0.3:10T:0.1)")
            mtp = (_number(parts[0], "--mtp-weight-schedule"), _tokens(parts[1], "--mtp-weight-schedule"),
                   _number(parts[2], "--mtp-weight-schedule"))
        left = None
        if args.bias_rate_schedule:
            parts = args.bias_rate_schedule.split(":")
            if len(parts) != 2 or _number(parts[1], "--bias-rate-schedule") != 0:
                raise ValueError(f"--bias-rate-schedule {args.bias_rate_schedule!r}: expected TOKENS_LEFT:0 "
                                 "(e.g. 500B:0): the rate drops to 0 for the last TOKENS_LEFT tokens")
            left = _tokens(parts[0], "--bias-rate-schedule")
        return cls(lr=args.lr, warmup=warmup, decay_steps=decay_steps, min_lr_ratio=args.min_lr_ratio,
                   batch_size=args.batch_size, seq_len=args.seq_len, ramp_tokens=ramp_tokens, ramp_from=ramp_from,
                   mtp_weight=mtp, bias_rate_left=left)

    def record(self) -> dict:
        """The JSON-able values a checkpoint records and a resume must find again."""
        return {"lr": self.lr, "warmup": self.warmup, "decay_steps": self.decay_steps,
                "min_lr_ratio": self.min_lr_ratio, "batch_size_ramp": f"{self.ramp_tokens}:{self.ramp_from}"
                if self.ramp_tokens else None,
                "mtp_weight_schedule": ":".join(str(v) for v in self.mtp_weight) if self.mtp_weight else None,
                "bias_rate_schedule": f"{self.bias_rate_left}:0" if self.bias_rate_left is not None else None}

    # ---------------------------------------------------------------------------------------- values
    def lr_at(self, step: int) -> float:
        if step <= self.warmup:  # never true for warmup 0
            return self.lr * step / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.decay_steps - self.warmup))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def _batch_after(self, tokens_before: int) -> int:
        if not self.ramp_tokens or tokens_before >= self.ramp_tokens:
            return self.batch_size
        levels = self.batch_size // self.ramp_from
        level = 1 + int((levels - 1) * tokens_before / self.ramp_tokens)
        return min(self.batch_size, level * self.ramp_from)

    def batch_at(self, step: int) -> tuple[int, int]:
        """(global batch in sequences of step `step`, tokens trained in steps 1..step-1)."""
        tokens = 0
        if self.ramp_tokens:
            for s in range(1, step):
                b = self._batch_after(tokens)
                if b == self.batch_size:  # ramp over: every later step has the full batch
                    tokens += (step - s) * b * self.seq_len
                    break
                tokens += b * self.seq_len
        else:
            tokens = (step - 1) * self.batch_size * self.seq_len
        return self._batch_after(tokens), tokens

    def mtp_weight_at(self, tokens_before: int, default: float) -> float:
        if self.mtp_weight is None:
            return default
        before, switch, after = self.mtp_weight
        return before if tokens_before < switch else after

    def bias_rate_at(self, tokens_before: int, default: float) -> float:
        if self.bias_rate_left is None:
            return default
        _, total = self.batch_at(self.decay_steps + 1)  # the run's tokens: steps 1..decay_steps
        return 0.0 if tokens_before >= total - self.bias_rate_left else default
