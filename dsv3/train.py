"""Training: DeepSeek-V3 (MLA + MoE + MTP) with FSDP2 + expert parallelism, gradient accumulation and exact resume.

    torchrun --nproc_per_node=N -m tritonmoe.dsv3.train [--preset tiny] [--ep E] [--steps S] [--out DIR] ...
    python -m tritonmoe.dsv3.train ...          (one process, world size 1)

With no arguments on a machine without GPUs: the `tiny` preset, byte-level on the Python standard library's .py
sources (data.py), gloo, EP = gcd(world, experts). With GPUs: NCCL, one GPU per rank, bf16 compute with fp32
master weights, fp32 routers and fp32 gradient reduction (--mixed-precision auto).

Setup (``setup``): every option is checked before anything is written; the output folder is locked (run_dir.py);
the model is built on the meta device, parallelized (experts over "ep", FSDP2 over the rest), materialized with
to_empty and filled by the name-seeded init (parallel/init.py: the same global weights for every layout) or from
--init-from's DCP weights, or from the checkpoint --resume continues.

One step (``train_step``), numbered s = 1, 2, ...: the global batch of B_s sequences (schedules.py: --batch-size,
or its ramp) is a function of (seed, s) only; dp rank r takes its share and runs it as A = share / M micro-batches of
M = --micro-batch-size sequences (forward + backward each), then clips the global gradient norm, steps AdamW
(linear warmup, cosine decay) and updates the balancing bias once (token counts summed over every micro-batch and
rank). Losses use ONE denominator per term for the whole step, so the result does not depend on how the batch is
cut (world size, EP degree, M):

    L_main = (1/N) * sum over the step's valid targets t of CE_t,   N = valid main-head targets of the global batch
    L_k    = (1/N) * sum over depth k's valid targets of CE         (DeepSeek-V3 report eq. 24: normalised by the
                                                                     main sequence's count, not depth k's)
    L_MTP  = lambda / D * sum_k L_k                                 (eq. 25; lambda: mtp_loss_weight or its schedule)
    L_bal  = alpha * (1/B_s) * sum over the step's sequences of sum_i f_i P_i     (eq. 17-20, averaged over the
                                                                     step's B_s sequences)
    loss   = L_main + L_MTP + L_bal        (what is optimized and logged as `loss`)

Each micro-batch contributes its share of the sums divided by the global N (or B_s), and FSDP sums the gradients
over the ranks (apply_fsdp(reduce="sum")), so the step's gradient is the gradient of `loss` whatever the cut.
FSDP reduce-scatters after every micro-batch (least memory); --accum-no-sync keeps unsharded gradients until the
last one and reduces once (set_requires_gradient_sync): less communication, more memory.

Output: one human line per step (rank 0) and one JSON object per step in DIR/metrics.jsonl: step, loss, lm_loss,
mtp_loss, seq_aux_loss, tokens (trained so far), tokens_per_s, tokens_per_s_per_device, lr, grad_norm, memory_mb,
micro_batches, batch_size, mtp_weight, layer_load
(per MoE layer, MTP layers included: max/mean and min/mean token load, idle experts), max_load_ratio, mfu (CUDA),
val_loss on validation steps, expert_counts every --load-every steps and at the last step; the first line this run
writes also records the layout. --tensorboard writes the same to DIR/tb. MFU = tokens/s per device * FLOPs per
token / peak, with FLOPs per token = 3 * (2 * matmul parameters a token uses + attention), per decoder layer and MTP
block: attention = n_heads * (qk_head_dim + v_head_dim) * (S + 1) (QK^T and PV over the causal mean context (S+1)/2,
2 FLOPs per multiply-add), matmul parameters = the projections, the dense MLP or the router + shared + top-K
routed experts, plus the head (and MTP's eh_proj); the peak comes from PEAK_TFLOPS by device name or --peak-tflops.

Checkpoints: DIR/step_XXXXXXXX (parallel/checkpoint.py, with the model's config.json and checksums) after every
--ckpt-every steps and after the last; --resume continues from the newest complete one to --steps. A resume must
train the same thing: the checkpoint records the seed, the batch layout, the data (path, dtype, sizes, tokenizer and
corpus hashes) and every schedule, and a run asking for other values stops with an error naming the option. Only
--steps (extending the run) and options that leave the math alone (--out, --ckpt-every, --log-every, --val-every,
--val-batches, --load-every, --ac, --ep, --micro-batch-size, --accum-no-sync, --compile, --tensorboard and the world
size, up to fp32 rounding) may change; --warmup and --decay-steps, when not given, are the checkpoint's.
A NaN/inf loss or gradient norm stops the run before the optimizer step; a non-finite parameter or buffer after
it (the balancing bias too) stops it before anything is saved; either way the last checkpoint stays the last good
one, and the error names it.

Host syncs per step on GPUs: one per MoE layer forward under EP (the all-to-all split sizes; a recomputed forward
under --ac pays it again), one before the optimizer step (the step's losses and gradient norm in a single copy,
which the NaN/inf stop needs), and one after it (the state check, the expert loads and the step time).
"""

import argparse
import contextlib
import json
import math
import os
import resource
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..parallel import (CheckpointError, apply_expert_parallel, apply_fsdp, build_meshes, check_ep_degree,
                        clip_grad_norm_, init_sharded_, load_checkpoint, load_model_weights, local_device,
                        read_train_state, save_checkpoint)
from ..parallel.checkpoint import (CONFIG_FILE, check_model_entries, complete_checkpoints, is_complete,
                                   verify_checksums)
from .config import PRESETS, DeepseekV3Config
from .data import batch, load_corpus
from .moe import collect_aux_loss, set_seq_aux_denominator, update_expert_bias
from .run_dir import RunDir, RunDirError, claim, resume_folder
from .schedules import Schedules


class NonFiniteLossError(RuntimeError):
    """The loss, the gradient or the state became NaN or inf; the run stopped without saving that step."""


# Dense bf16 tensor-core peaks (TFLOP/s, datasheets, without sparsity), matched against the CUDA device name.
PEAK_TFLOPS = {"H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0,
               "H800": 989.0, "H20": 148.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "A800": 312.0,
               "L40S": 362.0}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchrun --nproc_per_node=N -m tritonmoe.dsv3.train",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help=f"model preset ({', '.join(PRESETS)}) or a config.json path "
                   "(default: DIR/config.json with --init-from DIR, else tiny)")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="start from the weights of a DCP checkpoint: `convert hf2dcp` output or a training "
                        "checkpoint's step_XXXXXXXX folder (any world size / EP degree)")
    p.add_argument("--ep", type=int, default=None,
                   help="expert-parallel degree inside each pipeline stage (default gcd(world / pp, experts))")
    p.add_argument("--steps", type=int, default=200,
                   help="train steps 1..STEPS (default 200; with --resume, the end of the checkpoint's LR schedule)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch in sequences, split over ranks")
    p.add_argument("--micro-batch-size", type=int, default=None, metavar="M",
                   help="sequences per rank per forward; the step accumulates batch / (dp * M) micro-batches "
                        "(default: the whole per-rank share in one)")
    p.add_argument("--accum-no-sync", action="store_true",
                   help="keep unsharded gradients between micro-batches and reduce once per step (less "
                        "communication, more memory); default: reduce-scatter after every micro-batch")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=None,
                   help="warmup steps (default decay-steps // 10; with --resume, the checkpoint's)")
    p.add_argument("--decay-steps", type=int, default=None,
                   help="length of the LR schedule (default --steps; with --resume, the checkpoint's): set it "
                        "to stop early and --resume later on the same schedule")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr, in [0, 1]")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="max global gradient norm (0: no clipping)")
    p.add_argument("--batch-size-ramp", default=None, metavar="TOKENS:FROM",
                   help="global batch ramps from FROM sequences to --batch-size over the first TOKENS tokens, in "
                        "multiples of FROM (DeepSeek-V3: 469B:3072 with --batch-size 15360)")
    p.add_argument("--mtp-weight-schedule", default=None, metavar="BEFORE:TOKENS:AFTER",
                   help="MTP loss weight BEFORE for the first TOKENS tokens, then AFTER (DeepSeek-V3: 0.3:10T:0.1)")
    p.add_argument("--bias-rate-schedule", default=None, metavar="TOKENS_LEFT:0",
                   help="balancing bias rate 0 for the last TOKENS_LEFT tokens of the schedule (DeepSeek-V3: 500B:0)")
    p.add_argument("--out", default=None, help="output folder (default: the first free runs/PRESET[-N]; with "
                   "--resume the newest of them)")
    p.add_argument("--ckpt-every", type=int, default=0, help="checkpoint every N steps (and after the last)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ac", action="store_true", help="activation checkpointing of every decoder block")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every decoder block (fullgraph; MoE blocks piece by piece around their FSDP "
                        "units)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree (stages of decoder layers)")
    p.add_argument("--pp-schedule", default="1F1B", help="1F1B, Interleaved1F1B, InterleavedZeroBubble, "
                   "ZBVZeroBubble or DualPipeV (torch.distributed.pipelining)")
    p.add_argument("--pp-microbatches", type=int, default=None,
                   help="micro-batches per step through the pipeline, splitting each dp rank's share (default: pp; "
                        "DualPipeV: one per stage)")
    p.add_argument("--pp-stages-per-rank", type=int, default=None,
                   help="stages each pipeline rank holds (default 1 for 1F1B, 2 for the others; V schedules need 2)")
    p.add_argument("--pp-layers", default=None, metavar="N,N,...",
                   help="decoder layers per stage (default: split by FLOPs; the last stage carries the head and MTP)")
    p.add_argument("--fp8", action="store_true",
                   help="routed experts' GEMMs (forward, dgrad, wgrad) in FP8 E4M3 with DeepSeek-V3's 1x128 / 128x128 "
                        "scales; shared experts, attention and the head stay in the compute dtype")
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "bf16", "none"],
                   help="bf16: bf16 compute, fp32 master weights, routers and gradient reduction; none: fp32 "
                        "throughout; auto (default): bf16 on GPUs, none on CPU")
    p.add_argument("--val-every", type=int, default=50, help="validation loss every N steps and at the end")
    p.add_argument("--val-batches", type=int, default=4, help="global batches in one validation")
    p.add_argument("--data", default=None, help="a folder written by `python -m tritonmoe.dsv3.data prepare` (its "
                   "meta.json gives the dtype, vocabulary and EOS), a text file or folder (byte-level), or a token "
                   "file with --data-dtype; default: the Python stdlib's .py sources")
    p.add_argument("--data-dtype", default=None, choices=["uint16", "uint32"], help="token file dtype")
    p.add_argument("--log-every", type=int, default=1, help="print every N steps (metrics.jsonl gets all)")
    p.add_argument("--load-every", type=int, default=50,
                   help="full per-layer per-expert token counts in the metrics every N steps (and at the last)")
    p.add_argument("--tensorboard", action="store_true", help="TensorBoard event files in DIR/tb")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak TFLOP/s for MFU (default: a table of known GPUs)")
    return p


# The root module returns MTP logits as slices of larger tensors; nothing modifies them in place.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


# ------------------------------------------------------------------------------------------------ options
@dataclass(frozen=True)
class Layout:
    """How this run's world is cut."""
    world: int           # ranks
    ep: int              # expert-parallel degree (inside each pipeline stage)
    dp: int              # data-parallel ranks (per stage): each holds its own share of each step's batch
    micro_batch: int | None   # --micro-batch-size, or None: a rank's whole share in one forward
    pp: int = 1          # pipeline stages' ranks (world = pp * dp)
    pp_schedule: str | None = None
    pp_microbatches: int = 1
    pp_stages_per_rank: int = 1
    pp_layers: list[int] | None = None  # --pp-layers, or None: split by FLOPs


def _check_args(args, cfg: DeepseekV3Config, world: int) -> Layout:
    """Every user error that needs no file is raised here, before anything is written."""
    for name in ("steps", "batch_size", "seq_len", "val_batches", "log_every", "load_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("decay_steps", "micro_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("ckpt_every", "val_every", "warmup"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name, lo, hi, lo_open in (("lr", 0.0, math.inf, True), ("weight_decay", 0.0, math.inf, False),
                                  ("min_lr_ratio", 0.0, 1.0, False), ("clip", 0.0, math.inf, False),
                                  ("peak_tflops", 0.0, math.inf, True)):
        v = getattr(args, name)
        if v is None:
            continue
        if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
            rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{']' if math.isfinite(hi) else ')'}"
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number in {rng}, got {v}")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be in [0, 2**63), got {args.seed}")
    D = cfg.num_nextn_predict_layers
    if args.seq_len < D + 2:
        raise ValueError(f"--seq-len {args.seq_len} is too short: the main head and {D} MTP depth(s) need at least "
                         f"{D + 2} tokens per sequence")
    if args.seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} > max_position_embeddings {cfg.max_position_embeddings}")
    pp = args.pp
    if pp < 1 or world % pp:
        raise ValueError(f"--pp {pp} must be >= 1 and divide the world size {world}")
    dp = world // pp
    if args.batch_size % dp:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the {dp} data-parallel ranks"
                         + (f" (world {world} / --pp {pp})" if pp > 1 else f" (the world size {world})"))
    E = cfg.n_routed_experts
    ep = args.ep if args.ep is not None else (math.gcd(dp, E) if E else 1)
    check_ep_degree(dp, ep, E if E else None)
    M = args.micro_batch_size
    pipeline = {}
    if pp > 1:
        from .pipeline import SPLIT_BACKWARD, check_pipeline_options, default_microbatches, default_stages_per_rank

        if M is not None or args.accum_no_sync:
            raise ValueError("--micro-batch-size / --accum-no-sync do not apply with --pp: --pp-microbatches splits "
                             "each dp rank's share, and the pipeline reduces gradients once per step")
        if args.batch_size_ramp:
            raise ValueError("--batch-size-ramp with --pp: the pipeline's stages have static shapes (one micro-batch "
                             "size for the run); ramp without --pp, or train at the full batch")
        if args.compile and args.pp_schedule in SPLIT_BACKWARD:
            raise ValueError(f"--compile with --pp-schedule {args.pp_schedule}: torch's zero-bubble schedules refuse "
                             "compiled stages; use 1F1B or Interleaved1F1B, or drop --compile")
        v = args.pp_stages_per_rank or default_stages_per_rank(args.pp_schedule)
        mb = args.pp_microbatches or default_microbatches(args.pp_schedule, pp, v)
        try:
            layers = [int(c) for c in args.pp_layers.split(",")] if args.pp_layers else None
        except ValueError:
            raise ValueError(f"--pp-layers {args.pp_layers!r}: expected comma-separated layer counts") from None
        check_pipeline_options(args.pp_schedule, v, pp, mb, cfg, layers)
        pipeline = dict(pp=pp, pp_schedule=args.pp_schedule, pp_microbatches=mb, pp_stages_per_rank=v,
                        pp_layers=layers)
    elif args.pp_layers or args.pp_microbatches or args.pp_stages_per_rank:
        raise ValueError("--pp-layers / --pp-microbatches / --pp-stages-per-rank need --pp > 1")
    unit = dp * (M or pipeline.get("pp_microbatches", 1))  # every batch splits into whole micro-batches per rank
    levels = [args.batch_size]
    if args.batch_size_ramp:
        from_ = Schedules.from_args(args, 0, 1).ramp_from
        levels = list(range(from_, args.batch_size + 1, from_))
    for b in levels:
        if b % unit:
            what = f"--batch-size-ramp level {b}" if b != args.batch_size else f"--batch-size {b}"
            per = (f"--micro-batch-size {M}" if M else
                   f"--pp-microbatches {pipeline['pp_microbatches']}" if pipeline else None)
            raise ValueError(f"{what} does not split into whole micro-batches: it must be divisible by "
                             f"{dp} data-parallel ranks" + (f" x {per} = {unit}" if per else ""))
    return Layout(world=world, ep=ep, dp=dp, micro_batch=M, **pipeline)


def _load_config(preset: str | None, init_from: str | None) -> DeepseekV3Config:
    if init_from is not None and not Path(init_from).is_dir():
        raise CheckpointError(f"--init-from {init_from} does not exist (or is not a folder)")
    if preset is None and init_from is not None:
        config = Path(init_from) / "config.json"
        if not config.is_file():
            raise ValueError(f"--init-from {init_from} has no config.json (`convert hf2dcp` and training "
                             "checkpoints write one): pass --preset with the model's preset or config.json")
        return _read_config(config, "--init-from")
    preset = "tiny" if preset is None else preset
    if preset in PRESETS:
        return DeepseekV3Config.from_hf(preset)
    path = Path(preset)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"--preset {preset}: the folder holds no config.json")
    elif not path.is_file():
        raise ValueError(f"unknown --preset {preset!r}: use one of {', '.join(PRESETS)} or a config.json path")
    return _read_config(path, "--preset")


def _check_init_from(init_from: str, cfg: DeepseekV3Config) -> None:
    """--init-from is a readable DCP checkpoint whose files match their checksums and whose weights have the model's
    keys and global shapes (all checked before anything is written)."""
    from .model import DeepseekV3ForCausalLM

    src = Path(init_from)
    if not is_complete(src):
        hf = any(src.glob("*.safetensors"))
        raise CheckpointError(f"--init-from {init_from} is not a DCP checkpoint (no .metadata)"
                              + ("; it holds safetensors: convert it first with `python -m tritonmoe.dsv3.convert "
                                 f"hf2dcp --input {init_from} --output DIR`" if hf else ""))
    verify_checksums(src)
    with torch.device("meta"):
        shapes = DeepseekV3ForCausalLM(cfg).state_dict()
    check_model_entries(src, shapes)


def _read_config(path: Path, option: str) -> DeepseekV3Config:
    try:
        return DeepseekV3Config.from_hf(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{option}: {path} is not a readable JSON config ({e})") from None
    except (TypeError, KeyError) as e:
        raise ValueError(f"{option}: {path} is not a DeepSeek-V3 config ({type(e).__name__}: {e})") from None


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


def _schedule_lengths(args) -> tuple[int, int]:
    """(warmup, decay_steps): --decay-steps (default --steps), --warmup (default a tenth of it)."""
    total = args.decay_steps or args.steps
    return (total // 10 if args.warmup is None else args.warmup), total


def _train_state(args, corpus, schedules: Schedules) -> dict:
    """What a checkpoint records so that a resume can refuse to train something else. Flat: DCP flattens nested
    dicts and read_train_state would not read them back."""
    return {"seed": args.seed, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "data": str(Path(args.data).resolve()) if args.data is not None else None,
            "data_dtype": args.data_dtype,
            "data_tokens": f"{len(corpus.train)} train + {len(corpus.val)} validation tokens",
            "data_tokenizer_sha256": corpus.identity.get("tokenizer_sha256"),
            "data_corpus_sha256": corpus.identity.get("corpus_sha256"),
            **schedules.record(), "weight_decay": args.weight_decay, "clip": args.clip}


# Train state keys that describe what --data holds rather than an option of their own.
_DATA_KEYS = {"data_tokens": "--data holding", "data_tokenizer_sha256": "--data's tokenizer (sha256)",
              "data_corpus_sha256": "--data's corpus (sha256)"}


def _resume_option(key: str) -> str:
    """How a resume message names a train state key: its command-line option, or what --data holds."""
    return _DATA_KEYS.get(key, "--" + key.replace("_", "-"))


def _check_resume(args, state: dict, recorded: dict, ckpt: Path) -> None:
    """Refuse to resume `ckpt` with another batch layout, data source or schedule (ValueError naming the option,
    the checkpoint's value and this run's)."""
    def show(v) -> str:
        return "(not given)" if v is None else str(v)

    unchecked = []
    for key, value in state.items():
        if key not in recorded:  # a checkpoint written before the key was recorded
            unchecked.append(_resume_option(key))
        elif recorded[key] != value:
            option = _resume_option(key)
            fix = ("the data changed since the checkpoint" if key in _DATA_KEYS else
                   "pass the same value (only --steps and options that do not change the training may differ)")
            raise ValueError(f"--resume: checkpoint {ckpt} was trained with {option} {show(recorded[key])}, this run "
                             f"asks for {option} {show(value)}; {fix}")
    if unchecked and dist.get_rank() == 0:
        print(f"warning: checkpoint {ckpt} does not record {', '.join(unchecked)} (an older checkpoint): "
              "cannot check that they match", file=sys.stderr, flush=True)


def _given_options(argv: list[str] | None) -> set[str]:
    """The destinations of the options given on the command line (not left at their defaults)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _defaults_from_checkpoint(args, argv: list[str] | None) -> tuple[Path, dict] | None:
    """--resume: the options a checkpoint records (seed, batch layout, data, schedules, weight decay, clipping)
    default to the newest checkpoint's values, the model to its config.json and --steps to the end of its LR
    schedule, so `--out DIR --resume` alone continues the run to its planned end; an option given on the command
    line must match (_check_resume, _check_resume_config). Returns (checkpoint, its train state) for setup to
    reuse, or None when the folder has no complete checkpoint or its train state is unreadable: the checks after
    claim() report those."""
    folder = resume_folder(Path(args.out) if args.out else None, _run_name(args))
    ckpts = complete_checkpoints(folder) if folder.is_dir() else []
    if not ckpts:
        return None
    try:
        recorded = read_train_state(ckpts[-1])
    except CheckpointError:
        return None
    args.out = str(folder)  # the folder found here, whatever --preset becomes below
    given = _given_options(argv)
    for key, value in recorded.items():
        if key in vars(args) and key not in given:
            setattr(args, key, value)
    if "steps" not in given and recorded.get("decay_steps"):  # continue to where the schedule ends
        args.steps = recorded["decay_steps"]
    config = ckpts[-1] / CONFIG_FILE
    if args.preset is None and args.init_from is None and config.is_file():
        args.preset = str(config)
    return ckpts[-1], recorded


def _check_resume_config(model_config: dict, ckpt: Path) -> None:
    """Refuse to resume `ckpt` with another model config than the config.json it carries."""
    path = ckpt / CONFIG_FILE
    if not path.is_file():  # written by a version that did not record it
        return
    saved, ours = json.loads(path.read_text()), json.loads(json.dumps(model_config))
    diff = sorted(k for k in saved.keys() | ours.keys() if saved.get(k) != ours.get(k))
    if diff:
        shown = ", ".join(f"{k} {saved.get(k)!r} there, {ours.get(k)!r} here" for k in diff[:3])
        raise ValueError(f"--resume: checkpoint {ckpt} was trained with another model config ({shown}"
                         + (f", and {len(diff) - 3} more" if len(diff) > 3 else "") + f"); leave --preset out to "
                         f"use its {CONFIG_FILE}")


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


# ------------------------------------------------------------------------------------------------ setup
def _build_model(cfg: DeepseekV3Config, seed: int, ep: int, device: torch.device,
                 param_dtype: torch.dtype | None, init_from: str | None = None, meshes=None):
    """Meta-device build -> expert parallelism + FSDP2 on the meta model -> to_empty (each rank allocates its
    shards only) -> fill them: from --init-from's checkpoint, else by the model's init rule with values that
    depend on (seed, name, expert index) only, not on the layout. FSDP sums gradients (the losses are divided by
    the step's global counts)."""
    from .model import DeepseekV3ForCausalLM

    torch.manual_seed(seed)  # the same RNG state on every rank and for every layout
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg)
    meshes = meshes or build_meshes(ep, cfg.n_routed_experts or None)
    return _parallelize(model, cfg, seed, ep, meshes, device, param_dtype, init_from)


def _parallelize(model, cfg, seed: int, ep: int, meshes, device, param_dtype, init_from: str | None, rule=None,
                 strict: bool | str = True, stage: bool = False):
    """EP and FSDP2 on a meta-built model (or pipeline stage), to_empty, then the name-seeded init (`rule`: the
    whole model's init rule by name, for a stage) or --init-from's weights.

    A pipeline stage keeps its parameters unsharded from its first forward to its last backward of the step
    (reshard_after_forward=False, as torchtitan does under PP): a schedule interleaves many micro-batches' forwards
    and backwards, and the zero-bubble schedules' weight-gradient pass finds the parameters in the autograd graph
    only while the module holds the unsharded ones (resharded, the first micro-batch's dW came out empty)."""
    from ..parallel import find_moe_layers

    if ep > 1 and find_moe_layers(model):
        apply_expert_parallel(model, meshes.expert)
    apply_fsdp(model, meshes.dense, meshes.expert, param_dtype=param_dtype, reduce="sum",
               reshard_after_forward=not stage)
    model.to_empty(device=device)
    # Also with --init-from: the non-persistent buffers (token counters) are in no checkpoint, and a cheap
    # init of the local shards means no parameter can start from to_empty's garbage.
    init_sharded_(model, seed, rule)
    if init_from is not None:
        load_model_weights(model, init_from, strict=strict, verify=False)  # _check_init_from verified it
    return model


def _build_pipeline(cfg: DeepseekV3Config, seed: int, layout: Layout, meshes, device, param_dtype, init_from,
                    seq_len: int, batch_size: int):
    """This rank's pipeline stages (dsv3/pipeline.py), each parallelized and filled like the whole model, and the
    Pipeline that runs them. Every stage keeps the whole model's names, so the init and the checkpoints are the
    same for every pipeline degree."""
    from .model import DeepseekV3ForCausalLM
    from .pipeline import Pipeline, StageModule, embedding_groups, split_layers, stage_ids

    torch.manual_seed(seed)
    with torch.device("meta"):
        whole = DeepseekV3ForCausalLM(cfg)  # for its init rule by name
    n_stages = layout.pp * layout.pp_stages_per_rank
    split = split_layers(cfg, n_stages, seq_len, layout.pp_layers)
    ids = stage_ids(meshes.pipeline.get_local_rank(), layout.pp, layout.pp_stages_per_rank, layout.pp_schedule)
    parts = [_parallelize(StageModule(cfg, split[i], first=i == 0, last=i == n_stages - 1), cfg, seed, layout.ep,
                          meshes, device, param_dtype, init_from, rule=whole.init_rule, strict="part", stage=True)
             for i in ids]
    groups = embedding_groups(layout.pp, layout.dp, n_stages, layout.pp_schedule)
    micro_batch = batch_size // layout.dp // layout.pp_microbatches
    pipeline = Pipeline(parts, ids, n_stages, layout.pp_schedule, layout.pp_microbatches, meshes.pipeline.get_group(),
                        device, micro_batch, seq_len, param_dtype or torch.float32, groups)
    return parts, pipeline, split


def _make_optimizer(model, args) -> torch.optim.Optimizer:
    # No decay on norms' gains and other vectors (standard for transformers; DeepSeek-V3 report sec. 4.2).
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.95), eps=1e-8, foreach=False)


def _compile_blocks(model, backend: str) -> int:
    """torch.compile every decoder block's computation (MTP blocks included) with fullgraph=True, inside the
    block's FSDP unit and inside activation checkpointing; returns the number of compiled regions.

    A dense block compiles whole. An MoE block holds FSDP units of its own (the experts; the router under bf16),
    whose hooks dynamo does not trace, so (as torchtitan does) its pieces compile separately: attention and the
    norms, the router, the experts, the shared experts, and the local dispatcher's dispatch and combine (route and
    weighted unpermute: torch ops and our torch.library kernels, no graph break; `torch._dynamo.explain` on an
    unsharded MoE layer shows none at all). The expert-parallel dispatcher stays eager: its all-to-all needs the
    split sizes on the host."""
    from .model import DecoderLayer
    from .moe import LocalDispatcher, MoE

    def compiled(fn):
        return torch.compile(fn, fullgraph=True, backend=backend)

    regions = 0
    for layer in [m for m in model.modules() if isinstance(m, DecoderLayer)]:
        moe = layer.mlp if isinstance(layer.mlp, MoE) else None
        if moe is None:
            layer._block = compiled(layer._block)
            regions += 1
            continue
        for m in (layer.input_layernorm, layer.self_attn, layer.post_attention_layernorm, moe.gate, moe.experts,
                  moe.shared_experts):
            if m is not None:
                m.forward = compiled(m.forward)
                regions += 1
        if isinstance(moe.dispatcher, LocalDispatcher):
            moe.dispatcher.dispatch = compiled(moe.dispatcher.dispatch)
            moe.dispatcher.combine = compiled(moe.dispatcher.combine)
            regions += 2
    return regions


def _plan_attention(model, device: torch.device, dtype: torch.dtype) -> str:
    """Fix every MLA's SDPA plan up front (compiled blocks must not decide it on their first call); returns the
    plan's description for the start-up line."""
    from .model import MLA, attention_plan

    desc = None
    for m in model.modules():
        if isinstance(m, MLA):
            m.pad_v, desc = attention_plan(device, dtype, m.n_heads, m.nope + m.rope, m.v_dim)
    return desc or "none"


def _intact_before(out: Path, step: int) -> Path | None:
    """The newest complete checkpoint in `out` older than `step` whose files match their checksums."""
    for ckpt in reversed(complete_checkpoints(out)):
        if int(ckpt.name.removeprefix("step_")) >= step:
            continue
        try:
            verify_checksums(ckpt)
            return ckpt
        except CheckpointError:
            continue
    return None


def _verified(ckpt: Path, out: Path) -> Path:
    """`ckpt`, after its files were checked against their checksums; a corrupt one is an error that names the
    newest intact earlier checkpoint."""
    try:
        verify_checksums(ckpt)
    except CheckpointError as e:
        intact = _intact_before(out, int(ckpt.name.removeprefix("step_")))
        hint = (f"the newest intact checkpoint is {intact}: move {ckpt.name} out of {out} and --resume again"
                if intact else "no earlier checkpoint in the folder is intact")
        raise CheckpointError(f"--resume: {e}; {hint}") from e
    return ckpt


@dataclass
class Run:
    """Everything a step needs, made once by ``setup``."""
    args: argparse.Namespace
    cfg: DeepseekV3Config
    layout: Layout
    schedules: Schedules
    corpus: object
    model: torch.nn.Module             # the model, or a ModuleList of this rank's pipeline stages (for module walks)
    parts: list                        # [model], or this rank's stage modules
    optimizers: list                   # one per part
    meshes: object                     # parallel.Meshes: dense "dp" (per stage), expert, pipeline
    device: torch.device
    rank: int
    start: int                         # first step this run trains
    out: Path
    run_dir: RunDir | None             # rank 0: the locked output folder
    train_state: dict
    model_config: dict                 # the config.json every checkpoint carries
    last_ckpt: Path | None
    flops_per_token: float
    peak_flops: float | None           # per device, for MFU (None: not on a known GPU)
    fp8_cache: object | None = None    # --fp8: the experts' weights quantized once per step
    pipeline: object | None = None     # --pp > 1: dsv3.pipeline.Pipeline
    n_params: int = 0
    tensorboard: object | None = None
    metrics: object | None = None      # rank 0: metrics.jsonl opened for appending
    timings: dict = field(default_factory=dict)
    wrote_layout: bool = False


def setup(argv: list[str] | None = None) -> Run | None:
    """Parse and check the options, claim the output folder, build the model and the optimizer (from a checkpoint
    for --resume). Returns None when a resume has nothing left to do."""
    t_imports = time.perf_counter()
    args = build_parser().parse_args(argv)
    found = _defaults_from_checkpoint(args, argv) if args.resume else None
    cfg = _load_config(args.preset, args.init_from)
    model_config = cfg.to_hf(for_transformers=False)  # written into every checkpoint (before the run-time --ac)
    cfg = cfg.replace(activation_checkpointing=args.ac)
    _init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    t_group = time.perf_counter()
    layout = _check_args(args, cfg, world)
    if args.init_from is not None and not args.resume:
        _check_init_from(args.init_from, cfg)
    if args.tensorboard and rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("--tensorboard needs the tensorboard package: pip install 'tritonmoe[tensorboard]'") \
                from None
    corpus = load_corpus(args.data, args.data_dtype)
    for name, part in (("training", corpus.train), ("validation", corpus.val if args.val_every else None)):
        if part is not None and len(part) < args.seq_len:
            raise ValueError(f"the {name} split of {corpus.description.split(':')[0]} holds {len(part)} tokens, "
                             f"fewer than one sequence (--seq-len {args.seq_len})")
    corpus.check_vocab(cfg.vocab_size)
    t_data = time.perf_counter()

    # The output folder: chosen and locked by rank 0 (the decision is broadcast), checked before anything is built.
    choice = [None, None]
    run_dir = None
    if rank == 0:
        try:
            run_dir = claim(Path(args.out) if args.out else None, _run_name(args), args.resume)
            latest = complete_checkpoints(run_dir.path)
            choice = [str(run_dir.path), str(latest[-1]) if args.resume else None]
        except (RunDirError, CheckpointError) as e:
            choice = [None, f"{type(e).__name__}:{e}"]
        except OSError as e:  # a folder that cannot be made (read-only place, a file on the path): every rank stops
            choice = [None, f"RunDirError:--out {args.out or 'runs/'}: cannot use it ({e.strerror or e})"]
    dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        kind, _, msg = choice[1].partition(":")
        raise (CheckpointError if kind == "CheckpointError" else RunDirError)(msg)
    out, resume_from = Path(choice[0]), (Path(choice[1]) if choice[1] else None)
    try:
        if resume_from is not None:
            resume_from = _verified(resume_from, out)
            # Read once: the train state _defaults_from_checkpoint read, when it is this (now verified) checkpoint.
            recorded = found[1] if found and found[0] == resume_from else read_train_state(resume_from)
            _check_resume_config(model_config, resume_from)
        schedules = Schedules.from_args(args, *_schedule_lengths(args))
        train_state = _train_state(args, corpus, schedules)
        if resume_from is not None:
            _check_resume(args, train_state, recorded, resume_from)
            if recorded["step"] >= args.steps:
                if rank == 0:
                    print(f"tritonmoe train: nothing to do: {resume_from} already trained step {recorded['step']} "
                          f">= --steps {args.steps} (pass a larger --steps to continue)", flush=True)
                if run_dir is not None:
                    run_dir.release()
                return None

        device = local_device()
        param_dtype = _param_dtype(args.mixed_precision, device)
        meshes = build_meshes(layout.ep, cfg.n_routed_experts or None, pp=layout.pp)
        # A resumed run's weights come from its own checkpoint; --init-from only starts a fresh run.
        init_from = args.init_from if resume_from is None else None
        pipeline, split = None, None
        if layout.pp > 1:
            parts, pipeline, split = _build_pipeline(cfg, args.seed, layout, meshes, device, param_dtype, init_from,
                                                     args.seq_len, args.batch_size)
            model = torch.nn.ModuleList(parts)
        else:
            model = _build_model(cfg, args.seed, layout.ep, device, param_dtype, init_from, meshes)
            parts = [model]
        optimizers = [_make_optimizer(part, args) for part in parts]
        attention = _plan_attention(model, device, param_dtype or torch.float32)
        fp8_cache = None
        if args.fp8:
            from ..kernels import Fp8WeightCache
            from .moe import enable_fp8

            fp8_cache = Fp8WeightCache()
            enable_fp8(model, fp8_cache)
        start, last_ckpt = 1, resume_from
        if resume_from is not None:
            start = load_checkpoint(resume_from, parts, optimizers, verify=False)["step"] + 1  # _verified() did
        if args.compile:
            for part in parts:
                _compile_blocks(part, args.compile_backend)
        t_build = time.perf_counter()

        if rank == 0:
            if resume_from is not None:
                run_dir.keep_metrics_until(start - 1, lambda m: print(f"warning: {m}", file=sys.stderr, flush=True))
            else:
                run_dir.start_fresh()
        from .flops import flops_per_token, peak_flops

        run = Run(args=args, cfg=cfg, layout=layout, schedules=schedules, corpus=corpus, model=model, parts=parts,
                  optimizers=optimizers, meshes=meshes, device=device, rank=rank, start=start, out=out, run_dir=run_dir,
                  train_state=train_state, model_config=model_config, last_ckpt=last_ckpt,
                  flops_per_token=flops_per_token(cfg, args.seq_len),
                  peak_flops=peak_flops(device, args.peak_tflops, PEAK_TFLOPS), fp8_cache=fp8_cache,
                  pipeline=pipeline, n_params=_count_params(cfg))
        if rank == 0:
            run.metrics = open(run_dir.metrics_path, "a")
            if args.tensorboard:  # SummaryWriter was imported (and its absence refused) before anything was built
                run.tensorboard = SummaryWriter(str(out / "tb"), purge_step=start)
        run.timings = {"imports": _seconds_since_process_start(t_imports), "process group": t_group - t_imports,
                       "config, data": t_data - t_group, "model": t_build - t_data}
        if rank == 0:
            _print_start(run, resume_from, param_dtype, attention, split)
        return run
    except BaseException:
        if run_dir is not None:
            run_dir.release()
        raise


def _seconds_since_process_start(t: float) -> float:
    """Seconds from this process's start (interpreter start-up, imports, torchrun's own set-up) to perf_counter
    time `t`, from /proc (0 where it is unavailable)."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
        now = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, now - started - (time.perf_counter() - t))
    except (OSError, ValueError, IndexError):
        return 0.0


def _count_params(cfg: DeepseekV3Config) -> int:
    """The whole model's parameters (a meta-device build: nothing allocated)."""
    from .model import DeepseekV3ForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in DeepseekV3ForCausalLM(cfg).parameters())


def _print_start(run: Run, resume_from, param_dtype, attention: str, split) -> None:
    args, layout = run.args, run.layout
    n_params = run.n_params
    resumed = (f" (resumed from {resume_from.name})" if resume_from else
               f" (weights from {args.init_from})" if args.init_from else "")
    precision = "bf16 compute" if param_dtype is not None else "fp32"
    preset = args.preset or (Path(args.init_from) / "config.json" if args.init_from else "tiny")
    accum = ""
    if layout.micro_batch:
        accum = f", micro-batch {layout.micro_batch} ({args.batch_size // (layout.dp * layout.micro_batch)} per step"
        accum += ", one reduce per step)" if args.accum_no_sync else ")"
    pipe = ""
    if layout.pp > 1:
        pipe = (f"pp {layout.pp} ({layout.pp_schedule}, {layout.pp_microbatches} micro-batches, stages of "
                f"{'|'.join(str(len(ls)) for ls in split)} decoder layers) x ")
    print(f"tritonmoe train: preset {preset}, {n_params / 1e6:.2f}M params, world {layout.world} "
          f"({dist.get_backend()}), {pipe}ep {layout.ep} x edp {layout.dp // layout.ep}, global batch {args.batch_size} x "
          f"{args.seq_len}{accum}, {precision}, steps {run.start}..{args.steps}{resumed}\n"
          f"  data: {run.corpus.description}\n  attention: {attention}\n  out: {run.out}", flush=True)
    total = sum(run.timings.values())
    if total > 2.0:
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in run.timings.items())
        print(f"  start-up before step {run.start}: {total:.1f} s ({parts})", flush=True)


# ------------------------------------------------------------------------------------------------ one step
def _state_finite(model) -> torch.Tensor:
    """0-d bool on the device: every local parameter and buffer shard is finite (the balancing bias included)."""
    flags = [torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all()
             for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)


def _layer_load(counts: torch.Tensor) -> list[dict]:
    load = counts.double()
    mean = load.mean(1).clamp_min(1e-12)
    return [{"max_over_mean": round(mx, 4), "min_over_mean": round(mn, 4), "idle_experts": idle}
            for mx, mn, idle in zip((load.max(1).values / mean).tolist(), (load.min(1).values / mean).tolist(),
                                    (load == 0).sum(1).tolist())]


def _nonfinite(run: Run, step: int, what: str) -> NonFiniteLossError:
    return NonFiniteLossError(f"step {step}: {what}; stopped before saving the step. Last good checkpoint: "
                              f"{run.last_ckpt or 'none'}")


def _forward_backward(run: Run, micro: tuple, n_main: torch.Tensor, mtp_weight: float, sums: torch.Tensor) -> None:
    """Forward and backward of every micro-batch of this rank's share; adds the detached losses to `sums`."""
    for j, mb in enumerate(micro):
        if run.args.accum_no_sync and len(micro) > 1:
            run.model.set_requires_gradient_sync(j == len(micro) - 1)
        out = run.model(mb, labels=mb, loss_denominator=n_main)
        mtp = out.mtp_loss if out.mtp_loss is not None else out.lm_loss.new_zeros(())
        objective = out.lm_loss + mtp_weight * mtp
        objective.backward()  # the sequence-wise term reaches the gradients inside the routers
        sums += torch.stack([objective.detach().double(), out.lm_loss.detach().double(), mtp.detach().double(),
                             sums.new_zeros(())])


def _pipeline_counts(run: Run, counts: torch.Tensor | None) -> torch.Tensor | None:
    """Every MoE layer's token counts in model order (MTP last), gathered from the pipeline's stages."""
    from .moe import routers

    mine, start = [], 0
    for stage, part in zip(run.pipeline.ids, run.parts):
        n = len(routers(part))
        mine.append((stage, counts[start:start + n].tolist() if n else []))
        start += n
    gathered = [None] * run.layout.pp
    dist.all_gather_object(gathered, mine, group=run.meshes.pipeline.get_group())
    rows = [row for _, stage_rows in sorted(p for rank in gathered for p in rank) for row in stage_rows]
    return torch.tensor(rows, dtype=torch.int64) if rows else None


def train_step(run: Run, step: int) -> dict:
    """Train step `step` (see the module docstring); returns its metrics record."""
    args, cfg, model, device = run.args, run.cfg, run.model, run.device
    t0 = time.perf_counter()
    B, tokens_before = run.schedules.batch_at(step)
    lr = run.schedules.lr_at(step)
    for optimizer in run.optimizers:
        for g in optimizer.param_groups:
            g["lr"] = lr
    mtp_weight = run.schedules.mtp_weight_at(tokens_before, cfg.mtp_loss_weight)
    # This rank's dp share (every pipeline rank of a dp replica holds the same one).
    rows = batch(run.corpus.train, args.seed, step, B, args.seq_len, run.rank % run.layout.dp, run.layout.dp, device)
    M = run.layout.micro_batch or rows.shape[0]
    micro = rows.split(M)
    # The step's denominators: valid main-head targets and sequences of the GLOBAL batch.
    n_main = (rows[:, 1:] != -100).sum().to(torch.float64)
    dist.all_reduce(n_main, group=run.meshes.dense.get_group())  # over one stage's dp ranks: the global batch
    set_seq_aux_denominator(model, B)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, lm, mtp, seq-aux
    with run.fp8_cache.step() if run.fp8_cache is not None else contextlib.nullcontext():
        if run.pipeline is not None:
            run.pipeline.step(rows, n_main, mtp_weight, sums)
        else:
            _forward_backward(run, micro, n_main, mtp_weight, sums)
    aux = collect_aux_loss(model)  # this rank's share of the sequence-wise term, recomputations not counted
    if aux is not None:
        sums += torch.stack([aux.double(), sums.new_zeros(()), sums.new_zeros(()), aux.double()])
    # Global gradient norm over dense and expert shards (clipped to --clip unless it is 0), and the step's losses
    # summed over ranks: one host copy, before the optimizer step, so that a non-finite value stops the run first.
    params, replicas = run.pipeline.norm_parameters() if run.pipeline is not None else (model.parameters(), ())
    grad_norm = clip_grad_norm_(params, args.clip if args.clip > 0 else math.inf, replicas=replicas)
    dist.all_reduce(sums)  # every rank's share (under --pp: the last stages' losses, every stage's seq-aux)
    loss, lm_loss, mtp_loss, aux_loss, grad_norm = torch.cat([sums, grad_norm.double().view(1)]).tolist()
    if not all(math.isfinite(v) for v in (loss, lm_loss, mtp_loss, aux_loss)):
        raise _nonfinite(run, step, f"loss is {loss} (lm {lm_loss}, mtp {mtp_loss}, seq-aux {aux_loss})")
    if not math.isfinite(grad_norm):
        raise _nonfinite(run, step, f"gradient norm is {grad_norm} (loss {loss})")
    for optimizer in run.optimizers:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    # Token counts summed over one stage's ranks (the whole step's tokens through these layers), one update.
    counts = update_expert_bias(model, group=run.meshes.dense.get_group(),
                                rate=run.schedules.bias_rate_at(tokens_before, cfg.bias_update_rate))
    if run.pipeline is not None:
        counts = _pipeline_counts(run, counts)
    finite = _state_finite(model).to(torch.int32)
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():  # also the step's sync for the time and the loads below
        raise _nonfinite(run, step, "a parameter or buffer (weights, balancing bias) became NaN or inf in the "
                                    "optimizer step or the bias update")
    dt = time.perf_counter() - t0
    tokens = B * args.seq_len
    record = {"step": step, "loss": loss, "lm_loss": lm_loss, "mtp_loss": mtp_loss, "seq_aux_loss": aux_loss,
              "tokens_per_s": tokens / dt, "tokens_per_s_per_device": tokens / dt / run.layout.world, "lr": lr,
              "grad_norm": grad_norm, "memory_mb": _memory_mb(device),
              "micro_batches": run.layout.pp_microbatches if run.pipeline is not None else len(micro),
              "batch_size": B, "tokens": tokens_before + tokens, "mtp_weight": mtp_weight}
    if run.peak_flops:
        record["mfu"] = record["tokens_per_s_per_device"] * run.flops_per_token / run.peak_flops
    if counts is not None:
        record["layer_load"] = _layer_load(counts)
        record["max_load_ratio"] = max(ld["max_over_mean"] for ld in record["layer_load"])
        if step % args.load_every == 0 or step == args.steps:
            record["expert_counts"] = counts.tolist()
    return record


@torch.no_grad()
def _validate(run: Run) -> float:
    """Mean next-token loss over --val-batches fixed global batches of the validation split."""
    args, model = run.args, run.model
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=run.device)  # summed CE, targets
    for i in range(1, args.val_batches + 1):
        # A fixed set of validation windows (own seed stream, not tied to the step being validated).
        rows = batch(run.corpus.val, args.seed + 1_000_003, i, args.batch_size, args.seq_len, run.rank % run.layout.dp,
                     run.layout.dp, run.device)
        if run.pipeline is not None:
            total += run.pipeline.evaluate(rows)
            continue
        for mb in rows.split(run.layout.micro_batch or rows.shape[0]):
            out = model(mb, labels=mb, loss_denominator=1.0)  # the summed cross-entropy
            total += torch.stack([out.lm_loss.double(), (mb[:, 1:] != -100).sum().double()])
    dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _log(run: Run, record: dict) -> None:
    """metrics.jsonl line, TensorBoard scalars and the human line (rank 0)."""
    args, step = run.args, record["step"]
    if not run.wrote_layout:
        record = {**record, "world": run.layout.world, "ep": run.layout.ep, "pp": run.layout.pp,
                  "pp_schedule": run.layout.pp_schedule,
                  "fp8": args.fp8, "compiled": args.compile}
        run.wrote_layout = True
    run.metrics.write(json.dumps(record) + "\n")
    run.metrics.flush()
    if run.tensorboard is not None:
        _to_tensorboard(run.tensorboard, record)
    if step % args.log_every == 0 or step == args.steps or "val_loss" in record:
        print(f"step {step:5d}/{args.steps}  loss {record['loss']:.4f} (lm {record['lm_loss']:.4f}, "
              f"mtp {record['mtp_loss']:.4f})  {record['tokens_per_s']:,.0f} tok/s  "
              f"max/mean expert load {record.get('max_load_ratio', float('nan')):.2f}  "
              f"mem {record['memory_mb']:,.0f} MiB  lr {record['lr']:.2e}"
              + (f"  mfu {record['mfu']:.1%}" if "mfu" in record else "")
              + (f"  val {record['val_loss']:.4f}" if "val_loss" in record else ""), flush=True)


def _to_tensorboard(writer, record: dict) -> None:
    step = record["step"]
    for key, tag in (("loss", "loss/total"), ("lm_loss", "loss/lm"), ("mtp_loss", "loss/mtp"),
                     ("seq_aux_loss", "loss/seq_aux"), ("val_loss", "loss/val"), ("lr", "optim/lr"),
                     ("grad_norm", "optim/grad_norm"), ("tokens_per_s", "throughput/tokens_per_s"),
                     ("tokens_per_s_per_device", "throughput/tokens_per_s_per_device"), ("mfu", "throughput/mfu"),
                     ("memory_mb", "memory/mb"), ("batch_size", "schedule/batch_size"),
                     ("mtp_weight", "schedule/mtp_weight"), ("max_load_ratio", "load/max_over_mean_worst")):
        if key in record:
            writer.add_scalar(tag, record[key], step)
    for i, ld in enumerate(record.get("layer_load", [])):
        for key, value in ld.items():
            writer.add_scalar(f"load/layer{i}/{key}", value, step)
    if "expert_counts" in record:
        writer.add_histogram("load/expert_counts", torch.tensor(record["expert_counts"], dtype=torch.float64), step)


# ------------------------------------------------------------------------------------------------ the run
def main(argv: list[str] | None = None, on_step=None) -> dict:
    """Run training; returns {"losses": {step: loss}, "val_loss": ..., "out": DIR, ...} on every rank.

    on_step(step, model, record) is called on every rank after every step (tests read expert biases here).
    """
    run = setup(argv)
    if run is None:
        return {"losses": {}, "val_loss": None, "out": None, "nothing_to_do": True}
    args = run.args
    losses, val_loss = {}, None
    try:
        for step in range(run.start, args.steps + 1):
            t_step = time.perf_counter()
            record = train_step(run, step)
            if args.val_every and (step % args.val_every == 0 or step == args.steps):
                val_loss = record["val_loss"] = _validate(run)
            if args.compile and step == run.start and run.rank == 0:
                print(f"  torch.compile: step {step} took {time.perf_counter() - t_step:.1f} s, compiling included",
                      flush=True)
            losses[step] = record["loss"]
            if run.rank == 0:
                _log(run, record)
            if on_step is not None:
                on_step(step, run.model, record)
            if (args.ckpt_every and step % args.ckpt_every == 0) or step == args.steps:
                run.last_ckpt = save_checkpoint(run.out, step, run.parts, run.optimizers, run.train_state,
                                                config=run.model_config)
    finally:
        if run.metrics is not None:
            run.metrics.close()
        if run.tensorboard is not None:
            run.tensorboard.close()
        if run.run_dir is not None:
            run.run_dir.release()
    return {"losses": losses, "val_loss": val_loss, "out": str(run.out), "ep": run.layout.ep,
            "world": run.layout.world, "last_checkpoint": str(run.last_ckpt) if run.last_ckpt else None}


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
