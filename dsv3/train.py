"""Training example: DeepSeek-V3 (MLA + MoE + MTP) with FSDP2 + expert parallelism, exact resume.

    torchrun --nproc_per_node=N -m tritonmoe.dsv3.train [--preset tiny] [--ep E] [--steps S] [--out DIR] ...
    torchrun ... -m tritonmoe.dsv3.train --init-from DCP_DIR ...   (start from `convert hf2dcp` weights)
    python -m tritonmoe.dsv3.train ...          (one process, world size 1)

With no arguments on a machine without GPUs: the `tiny` preset, byte-level on the Python standard library's
.py sources (data.py), gloo, EP = gcd(world, experts) (= min(world, experts) whenever one divides the
other). With GPUs: NCCL, one GPU per rank, bf16 compute with fp32 master weights, fp32 routers and fp32 gradient
reduction (--mixed-precision auto; `--mixed-precision bf16` runs the same dtype flow on CPU).

The model is built on the meta device, parallelized (experts Shard(0) over "ep", FSDP2 over the rest), then
materialized with to_empty: no rank ever holds more than its shards (plus, transiently, one init block of
~64K values). Each rank then fills its shards by the model's init rule with values seeded by (seed, parameter
name, expert index or dense row block), drawing only what its shards cover, so the initial global weights are
the same for every world size and EP degree (parallel/init.py); or, with --init-from DIR, loads a weights-only
DCP checkpoint (`convert hf2dcp` output, or a training checkpoint's step_XXXXXXXX) resharded to this layout;
the config then comes from DIR/config.json (both kinds write one) unless --preset is given.

Per step s (numbered from 1): the global batch of --batch-size sequences is a function of (seed, s) only and
is split across the data-parallel ranks; forward + backward; gradient clipping by the global norm over dense
and expert shards; AdamW with linear warmup and cosine decay; then update_expert_bias (aux-loss-free
balancing, token counts summed over all ranks). Output: one human line per step on rank 0 and one JSON object
per step in DIR/metrics.jsonl (step, loss, lm_loss, mtp_loss, tokens_per_s, max_load_ratio, lr, grad_norm,
memory_mb, and val_loss on validation steps). Checkpoints: DIR/step_XXXXXXXX (parallel/checkpoint.py, with the
model's config.json) after every --ckpt-every steps and after the last; --resume continues from the newest
complete one to --steps. A resume must train the same thing: the checkpoint records the seed, the global batch
and sequence length, the data source (resolved --data path, --data-dtype, token counts) and the LR schedule
(--lr, --warmup, --decay-steps, --min-lr-ratio, --weight-decay, --clip), and a run asking for other values
stops with an error naming the option. Only --steps (extending the run) and options that leave the math alone
(--out, --ckpt-every, --log-every, --val-every, --val-batches, --ac, --ep and the world size, up to fp32
rounding) may change; --warmup and --decay-steps, when not given, are the checkpoint's, so that extending
--steps does not stretch the schedule of the steps already trained. Not checked: --mixed-precision (a run may
move between bf16 GPUs and fp32 CPUs) and the model config beyond the shapes the load compares.
A NaN/inf loss or gradient norm stops the run before the optimizer step, leaving the last checkpoint as it was.

Host syncs per step on GPUs: one per MoE layer forward (the all-to-all split sizes; a recomputed forward
under --ac pays it again), one before the optimizer step (global-batch losses and gradient norm in a single
copy, which the NaN/inf stop needs), and one after it for the step time and the expert-load ratio.
"""

import argparse
import json
import math
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from ..parallel import (CheckpointError, apply_expert_parallel, apply_fsdp, build_meshes, check_ep_degree,
                        clip_grad_norm_, init_sharded_, latest_checkpoint, load_checkpoint, load_model_weights,
                        local_device, read_train_state, save_checkpoint)
from .config import PRESETS, DeepseekV3Config
from .data import batch, load_corpus
from .moe import update_expert_bias


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stopped without applying that step."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchrun --nproc_per_node=N -m tritonmoe.dsv3.train",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help=f"model preset ({', '.join(PRESETS)}) or a config.json path "
                   "(default: DIR/config.json with --init-from DIR, else tiny)")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="start from the weights of a DCP checkpoint: `convert hf2dcp` output or a training "
                        "checkpoint's step_XXXXXXXX folder (any world size / EP degree)")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel degree (default gcd(world, experts))")
    p.add_argument("--steps", type=int, default=200, help="train steps 1..STEPS")
    p.add_argument("--batch-size", type=int, default=16, help="global batch in sequences, split over ranks")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=None,
                   help="warmup steps (default decay-steps // 10; with --resume, the checkpoint's)")
    p.add_argument("--decay-steps", type=int, default=None,
                   help="length of the LR schedule (default --steps; with --resume, the checkpoint's): set it "
                        "to stop early and --resume later on the same schedule")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="max global gradient norm (0: no clipping)")
    p.add_argument("--out", default=None, help="output folder (default: the first free runs/PRESET[-N]; with "
                   "--resume the newest of them)")
    p.add_argument("--ckpt-every", type=int, default=0, help="checkpoint every N steps (and after the last)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ac", action="store_true", help="activation checkpointing of every decoder block")
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "bf16", "none"],
                   help="bf16: bf16 compute, fp32 master weights, routers and gradient reduction; none: fp32 "
                        "throughout; auto (default): bf16 on GPUs, none on CPU")
    p.add_argument("--val-every", type=int, default=50, help="validation loss every N steps and at the end")
    p.add_argument("--val-batches", type=int, default=4, help="global batches in one validation")
    p.add_argument("--data", default=None, help="text file or folder (byte-level), or a token file with "
                                                "--data-dtype; default: the Python stdlib's .py sources")
    p.add_argument("--data-dtype", default=None, choices=["uint16", "uint32"], help="token file dtype")
    p.add_argument("--log-every", type=int, default=1, help="print every N steps (metrics.jsonl gets all)")
    return p


# The root module returns MTP logits as slices of larger tensors; nothing modifies them in place.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def _init_distributed() -> None:
    """Join torchrun's process group, or make a world of one for a plain `python -m` run."""
    if dist.is_initialized():
        return
    # Plain python (no torchrun): a world of one over an in-memory store, so the code path is the same and no
    # TCP port has to be picked (a port found free can be taken by another process before we bind it).
    alone = {} if "RANK" in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)
    if torch.cuda.is_available():
        local_rank, n_gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= n_gpus:
            raise ValueError(f"LOCAL_RANK {local_rank} but this node has {n_gpus} GPU(s): run at most {n_gpus} "
                             "processes per node (--nproc_per_node)")
        # Bind the rank to its GPU before NCCL starts: collectives, barriers and object broadcasts
        # (broadcast_object_list) then all use this device, never GPU 0 from every rank.
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, **alone)
    else:
        dist.init_process_group("gloo", **alone)


def _schedule(args) -> tuple[int, int]:
    """(warmup, total) of the LR schedule: total = --decay-steps (default --steps), warmup = --warmup (default
    total // 10)."""
    total = args.decay_steps or args.steps
    return (total // 10 if args.warmup is None else args.warmup), total


def _lr_at(step: int, args) -> float:
    """Linear warmup over steps 1..warmup, then cosine from lr to lr * min_lr_ratio at step decay_steps."""
    warmup, total = _schedule(args)
    if step <= warmup:  # never true for warmup 0
        return args.lr * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _check_args(args, cfg: DeepseekV3Config, world: int) -> int:
    """Every user error is raised here, before anything is written. Returns the EP degree."""
    for name in ("steps", "batch_size", "seq_len", "val_batches", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.decay_steps is not None and args.decay_steps < 1:
        raise ValueError(f"--decay-steps must be >= 1, got {args.decay_steps}")
    for name in ("ckpt_every", "val_every"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the world size {world}")
    if args.seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} > max_position_embeddings {cfg.max_position_embeddings}")
    E = cfg.n_routed_experts
    ep = args.ep if args.ep is not None else (math.gcd(world, E) if E else 1)
    check_ep_degree(world, ep, E if E else None)
    return ep


def _load_config(preset: str | None, init_from: str | None) -> DeepseekV3Config:
    if init_from is not None and not Path(init_from).is_dir():
        raise CheckpointError(f"--init-from {init_from} does not exist (or is not a folder)")
    if preset is None and init_from is not None:
        config = Path(init_from) / "config.json"
        if not config.is_file():
            raise ValueError(f"--init-from {init_from} has no config.json (`convert hf2dcp` and training "
                             "checkpoints write one): pass --preset with the model's preset or config.json")
        return DeepseekV3Config.from_hf(config)
    preset = "tiny" if preset is None else preset
    if preset not in PRESETS and not Path(preset).exists():
        raise ValueError(f"unknown --preset {preset!r}: use one of {', '.join(PRESETS)} or a config.json path")
    return DeepseekV3Config.from_hf(preset)


def _checkpoint_config(cfg: DeepseekV3Config) -> dict:
    """The model's config.json for a checkpoint folder (the file `convert` writes: cfg.to_hf()), which
    from_hf reads back to the same model. A moe_layer_freq != 1, which transformers cannot express (to_hf
    refuses it by default), is written as it is: our own reader keeps it."""
    return cfg.to_hf(for_transformers=False)


def _train_state(args, corpus) -> dict:
    """What a checkpoint records so that a resume can refuse to train something else: batch layout, data source
    and LR schedule (resolved: --warmup and --decay-steps as _lr_at uses them)."""
    warmup, total = _schedule(args)
    return {"seed": args.seed, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "data": str(Path(args.data).resolve()) if args.data is not None else None,
            "data_dtype": args.data_dtype,
            "data_tokens": f"{corpus.train.size} train + {corpus.val.size} validation tokens",
            "lr": args.lr, "warmup": warmup, "decay_steps": total,
            "min_lr_ratio": args.min_lr_ratio, "weight_decay": args.weight_decay, "clip": args.clip}


def _resume_option(key: str) -> str:
    """How a resume message names a train state key: its command-line option (data_tokens: the data's size)."""
    return "--data holding" if key == "data_tokens" else "--" + key.replace("_", "-")


def _check_resume(args, corpus, recorded: dict, ckpt: Path) -> dict:
    """Refuse to resume `ckpt` with another batch layout, data source or LR schedule (ValueError naming the
    option, the checkpoint's value and this run's). --warmup / --decay-steps not given on the command line
    take the checkpoint's values (set on `args`). Returns the train state this run records."""
    if args.decay_steps is None and recorded.get("decay_steps") is not None:
        args.decay_steps = recorded["decay_steps"]
    if args.warmup is None and recorded.get("warmup") is not None:
        args.warmup = recorded["warmup"]
    state = _train_state(args, corpus)

    def show(v) -> str:
        return "(not given)" if v is None else str(v)

    unchecked = []
    for key, value in state.items():
        if key not in recorded:  # a checkpoint written before the key was recorded
            unchecked.append(_resume_option(key))
        elif recorded[key] != value:
            option = _resume_option(key)
            fix = ("the data changed since the checkpoint" if key == "data_tokens" else
                   "pass the same value (only --steps and options that do not change the training may differ)")
            raise ValueError(f"--resume: checkpoint {ckpt} was trained with {option} {show(recorded[key])}, this run "
                             f"asks for {option} {show(value)}; {fix}")
    if unchecked and dist.get_rank() == 0:
        print(f"warning: checkpoint {ckpt} does not record {', '.join(unchecked)} (an older checkpoint): "
              "cannot check that they match", file=sys.stderr, flush=True)
    return state


def _run_name(args) -> str:
    """The folder name of a run without --out: the preset's, or the --init-from folder's."""
    if args.preset is None and args.init_from is not None:
        return Path(args.init_from).resolve().name
    return Path(args.preset or "tiny").stem


def _param_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """FSDP's compute dtype for --mixed-precision (None: the parameters' own fp32)."""
    if mixed_precision == "auto":
        mixed_precision = "bf16" if device.type == "cuda" else "none"
    return torch.bfloat16 if mixed_precision == "bf16" else None


def _build_model(cfg: DeepseekV3Config, seed: int, ep: int, device: torch.device,
                 param_dtype: torch.dtype | None, init_from: str | None = None):
    """Meta-device build -> expert parallelism + FSDP2 on the meta model -> to_empty (each rank allocates its
    shards only) -> fill them: from --init-from's checkpoint, else by the model's init rule with values that
    depend on (seed, name, expert index) only, not on the layout."""
    from .model import DeepseekV3ForCausalLM

    torch.manual_seed(seed)  # the same RNG state on every rank and for every layout
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg)
    meshes = build_meshes(ep, cfg.n_routed_experts or None)
    if ep > 1:
        apply_expert_parallel(model, meshes.expert)
    apply_fsdp(model, meshes.dense, meshes.expert, param_dtype=param_dtype)
    model.to_empty(device=device)
    # Also with --init-from: the non-persistent buffers (token counters) are in no checkpoint, and a cheap
    # init of the local shards means no parameter can start from to_empty's garbage.
    init_sharded_(model, seed)
    if init_from is not None:
        load_model_weights(model, init_from)
    return model


def _make_optimizer(model, args) -> torch.optim.Optimizer:
    # No decay on norms' gains and other vectors (standard for transformers; DeepSeek-V3 report sec. 4.2).
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.95), eps=1e-8, foreach=False)


def _losses(model, rows: torch.Tensor):
    """(loss, lm_loss, mtp_loss) of one local batch of windows [b, seq_len] (the model shifts labels)."""
    out = model(rows, labels=rows)
    zero = out.loss.new_zeros(())
    mtp = out.mtp_loss if out.mtp_loss is not None else zero
    return out.loss, out.lm_loss, mtp


@torch.no_grad()
def _validate(model, corpus, args, world: int, rank: int, device) -> float:
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(1, args.val_batches + 1):
        # A fixed set of validation windows (own seed stream, not tied to the step being validated).
        rows = batch(corpus.val, args.seed + 1_000_003, i, args.batch_size, args.seq_len, rank, world, device)
        total += _losses(model, rows)[1].double()
    dist.all_reduce(total)
    model.train()
    return total.item() / (args.val_batches * world)


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _holds_run(out: Path) -> bool:
    return (out / "metrics.jsonl").exists() or any(out.glob("step_*"))


def _default_out(name: str, resume: bool) -> Path:
    """Without --out: a fresh run takes the first of runs/NAME, runs/NAME-2, ... that holds no run, so the
    default command can be repeated and never touches an earlier run; --resume continues the newest of them.
    Rank 0 decides and broadcasts, so no rank can see another's half-created folder."""
    def nth(n: int) -> Path:
        return Path("runs") / (name if n == 1 else f"{name}-{n}")

    choice = [None]
    if dist.get_rank() == 0:
        n = 1
        while _holds_run(nth(n)):
            n += 1
        choice = [str(nth(n - 1) if resume and n > 1 else nth(n))]
    dist.broadcast_object_list(choice, src=0)
    return Path(choice[0])


def _prepare_out(out: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); refuses to overwrite an existing run."""
    ckpt = latest_checkpoint(out)
    if resume:
        if ckpt is None:
            found = sorted(p.name for p in out.glob("step_*")) if out.is_dir() else []
            raise CheckpointError(f"--resume: no complete checkpoint in {out}"
                                  + (f" (incomplete: {', '.join(found)})" if found else ""))
        return ckpt
    if ckpt is not None or (out / "metrics.jsonl").exists():
        raise ValueError(f"{out} already holds a run ({ckpt.name if ckpt else 'metrics.jsonl'}): pass --resume to "
                         "continue it, or choose another --out")
    return None


def _trim_metrics(path: Path, last_step: int) -> None:
    """Drop metrics of steps after the checkpoint we resume from (they are about to be redone)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    path.write_text("".join(ln + "\n" for ln in lines if json.loads(ln)["step"] <= last_step))


def main(argv: list[str] | None = None, on_step=None) -> dict:
    """Run training; returns {"losses": {step: loss}, "val_loss": ..., "out": DIR} on every rank.

    on_step(step, model, record) is called on every rank after every step (tests read expert biases here).
    """
    args = build_parser().parse_args(argv)
    cfg = _load_config(args.preset, args.init_from)
    model_config = _checkpoint_config(cfg)  # written into every checkpoint (before the run-time --ac below)
    # The model recomputes each decoder block (MTP blocks too) inside its FSDP unit; its router does not
    # count tokens again during the recomputation.
    cfg = cfg.replace(activation_checkpointing=args.ac)
    _init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    ep = _check_args(args, cfg, world)
    out = Path(args.out) if args.out else _default_out(_run_name(args), args.resume)
    resume_from = _prepare_out(out, args.resume)
    corpus = load_corpus(args.data, args.data_dtype)
    for name, part in (("training", corpus.train), ("validation", corpus.val if args.val_every else None)):
        if part is not None and part.size < args.seq_len:
            raise ValueError(f"the {name} split of {corpus.description.split(':')[0]} holds {part.size} tokens, "
                             f"fewer than one sequence (--seq-len {args.seq_len})")
    if corpus.vocab_size > cfg.vocab_size:
        raise ValueError(f"data has token ids up to {corpus.vocab_size - 1} but the model's vocab_size is "
                         f"{cfg.vocab_size}")
    # A resume is checked against what the checkpoint recorded before any weight is built or read.
    train_state = (_check_resume(args, corpus, read_train_state(resume_from), resume_from)
                   if resume_from is not None else _train_state(args, corpus))
    device = local_device()

    param_dtype = _param_dtype(args.mixed_precision, device)
    # A resumed run's weights come from its own checkpoint; --init-from only starts a fresh run.
    model = _build_model(cfg, args.seed, ep, device, param_dtype, args.init_from if resume_from is None else None)
    optimizer = _make_optimizer(model, args)
    start = 1
    metrics_path = out / "metrics.jsonl"
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer)
        start = state["step"] + 1
        if rank == 0:
            _trim_metrics(metrics_path, state["step"])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        n_params = sum(p.numel() for p in model.parameters())
        resumed = (f" (resumed from {resume_from.name})" if resume_from else
                   f" (weights from {args.init_from})" if args.init_from else "")
        precision = "bf16 compute" if param_dtype is not None else "fp32"
        preset = args.preset or (Path(args.init_from) / "config.json" if args.init_from else "tiny")
        print(f"tritonmoe train: preset {preset}, {n_params / 1e6:.2f}M params, world {world} "
              f"({dist.get_backend()}), ep {ep} x edp {world // ep}, global batch {args.batch_size} x "
              f"{args.seq_len}, {precision}, steps {start}..{args.steps}{resumed}\n  data: {corpus.description}\n"
              f"  out: {out}", flush=True)

    losses, val_loss, last_ckpt = {}, None, resume_from
    tokens_per_step = args.batch_size * args.seq_len
    metrics = open(metrics_path, "a") if rank == 0 else None
    try:
        for step in range(start, args.steps + 1):
            t0 = time.perf_counter()
            lr = _lr_at(step, args)
            for g in optimizer.param_groups:
                g["lr"] = lr
            rows = batch(corpus.train, args.seed, step, args.batch_size, args.seq_len, rank, world, device)
            loss, lm_loss, mtp_loss = _losses(model, rows)
            loss.backward()
            # Global gradient norm over dense and expert shards (clipped to --clip unless it is 0). The logged
            # losses are means over the global batch: one all-reduce of the three scalars. Both come to the
            # host in one copy, before the optimizer step, so that a non-finite value stops the run first.
            grad_norm = clip_grad_norm_(model.parameters(), args.clip if args.clip > 0 else math.inf)
            logged = torch.stack([loss.detach(), lm_loss.detach(), mtp_loss.detach()]).double()
            dist.all_reduce(logged)
            *logged, grad_norm = torch.cat([logged / world, grad_norm.double().view(1)]).tolist()
            if not all(math.isfinite(v) for v in logged):
                raise NonFiniteLossError(
                    f"step {step}: loss is {logged[0]} (lm {logged[1]}, mtp {logged[2]}); stopped before the "
                    f"optimizer step. Last good checkpoint: {last_ckpt or 'none'}")
            if not math.isfinite(grad_norm):
                raise NonFiniteLossError(
                    f"step {step}: gradient norm is {grad_norm} (loss {logged[0]}); stopped before the optimizer "
                    f"step. Last good checkpoint: {last_ckpt or 'none'}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            counts = update_expert_bias(model)  # token counts summed over every rank
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            record = {"step": step, "loss": logged[0], "lm_loss": logged[1], "mtp_loss": logged[2],
                      "tokens_per_s": tokens_per_step / dt, "lr": lr, "grad_norm": grad_norm}
            if counts is not None:
                load = counts.double()
                record["max_load_ratio"] = (load.max(1).values / load.mean(1)).max().item()
            record["memory_mb"] = _memory_mb(device)
            if args.val_every and (step % args.val_every == 0 or step == args.steps):
                val_loss = record["val_loss"] = _validate(model, corpus, args, world, rank, device)
            losses[step] = record["loss"]
            if rank == 0:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if step % args.log_every == 0 or step == args.steps or "val_loss" in record:
                    print(f"step {step:5d}/{args.steps}  loss {record['loss']:.4f} (lm {record['lm_loss']:.4f}, "
                          f"mtp {record['mtp_loss']:.4f})  {record['tokens_per_s']:,.0f} tok/s  "
                          f"max/mean expert load {record.get('max_load_ratio', float('nan')):.2f}  "
                          f"mem {record['memory_mb']:,.0f} MiB  lr {lr:.2e}"
                          + (f"  val {record['val_loss']:.4f}" if "val_loss" in record else ""), flush=True)
            if on_step is not None:
                on_step(step, model, record)
            if (args.ckpt_every and step % args.ckpt_every == 0) or step == args.steps:
                last_ckpt = save_checkpoint(out, step, model, optimizer, train_state, config=model_config)
    finally:
        if metrics is not None:
            metrics.close()
    return {"losses": losses, "val_loss": val_loss, "out": str(out), "ep": ep, "world": world,
            "last_checkpoint": str(last_ckpt) if last_ckpt else None}


def cli(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one clear line (rank 0) and exit with status 2; no traceback."""
    try:
        main(argv)
    except (ValueError, CheckpointError, NonFiniteLossError) as e:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
