"""The one entry point of the benchmarks:

    python -m bench [--quick] [--out FILE] [--only gemm,permute,swiglu,moe,fp8] [--device DEV] | --compile-report
    python -m bench scale [...]        DeepSeek-V3 671B at scale, on paper (bench/scale.py; --help for its options)
    python -m bench fp8-train [...]    the tiny model trained in fp32, bf16 and bf16 + FP8 experts (bench/fp8_train.py)

Without a subcommand: the grouped-GEMM, permute, SwiGLU, MoE-layer and FP8 benchmarks on whatever device exists
(CUDA if present, else CPU with small shapes), one JSON file (device name, torch/triton versions, date, every
figure), the tables printed last. --quick is the CI-sized run. --compile-report compiles every grouped-GEMM
tile config for sm_90a (no GPU needed) and prints registers per thread, spill bytes, local-memory instructions,
wgmma count and shared memory per config.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

import torch

from . import bench_fp8, bench_grouped_gemm, bench_moe, bench_permute, bench_swiglu, common

BENCHES = {"gemm": bench_grouped_gemm, "permute": bench_permute, "swiglu": bench_swiglu, "fp8": bench_fp8,
           "moe": bench_moe}
SUBCOMMANDS = ("scale", "fp8-train")
DEFAULT_OUT = "bench-results.json"
CPU_CAVEAT = ("CPU run: 'ours' is the PyTorch twin of each kernel on this host's cores; these figures check "
              "the harness and say nothing about GPU performance.")


def _parse_only(spec: str | None) -> list[str]:
    if spec is None:
        return list(BENCHES)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in BENCHES]
    if bad or not names:
        raise ValueError(f"--only {spec!r}: expected a comma-separated subset of {sorted(BENCHES)}")
    return names


def run_benchmarks(device: torch.device, names: list[str], quick: bool, threads: int | None = None) -> dict[str, Any]:
    """Run the named benchmarks; returns the JSON document (meta, results, skipped) plus rendered tables.

    threads: CPU threads for torch during the run (restored afterwards). The quick run defaults to one:
    on a shared 2-core CI machine, two OpenMP threads competing with other processes turned a 20 ms MoE
    step into 0.1-6 s outliers, while one thread stayed within 2x of its best.
    """
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    tables: list[str] = []
    saved_threads = torch.get_num_threads()
    if device.type == "cpu" and (threads or quick):
        torch.set_num_threads(threads or 1)
    try:
        meta = {**common.device_info(device), "quick": quick, "benches": names,
                "providers": {n: list(BENCHES[n].PROVIDERS) for n in names}}
        with common.cpu_twin_path(device):
            for name in names:
                print(f"[bench] {name} on {device.type}{' (quick)' if quick else ''} ...", file=sys.stderr,
                      flush=True)
                mod = BENCHES[name]
                rows, skip = mod.run(device, quick)
                results += rows
                skipped += skip
                tables.append(mod.table(rows))
    finally:
        torch.set_num_threads(saved_threads)
    if device.type == "cpu":
        meta["caveat"] = CPU_CAVEAT
    return {"meta": meta, "results": results, "skipped": skipped, "tables": tables}


# --------------------------------------------------------------------------------- sm_90a compile report

def compile_report() -> list[dict[str, Any]]:
    from tritonmoe.kernels._sm90 import SM90_SMEM_LIMIT, compile_sm90_all
    from tritonmoe.kernels._sm90_jobs import grouped_gemm_jobs

    jobs = grouped_gemm_jobs(torch.bfloat16)
    print(f"[bench] compiling {len(jobs)} grouped-GEMM configs for sm_90a ...", file=sys.stderr, flush=True)
    reports = compile_sm90_all([j for _, _, j in jobs])
    return [{"pass": pas, "block_m": c.block_m, "block_n": c.block_n, "block_d": c.block_d,
             "num_warps": c.num_warps, "num_stages": c.num_stages, "registers": r.registers,
             "spill_bytes": r.spill_bytes, "local_ops": r.local_ops, "hgmma": r.hgmma,
             "shared_kib": round(r.shared_bytes / 1024, 1), "fits_smem": r.shared_bytes <= SM90_SMEM_LIMIT}
            for (pas, c, _), r in zip(jobs, reports)]


def compile_table(rows: list[dict[str, Any]]) -> str:
    """Markdown, so it can be pasted into bench/NOTES.md as printed."""
    cols = ["pass", "block_m", "block_n", "block_d", "num_warps", "num_stages", "registers", "spill_bytes",
            "local_ops", "hgmma", "shared_kib", "fits_smem"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(f".{argv[0].replace('-', '_')}", __package__)
        return module.main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m bench", description="\n\n".join(__doc__.split("\n\n")[:2]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI-sized run")
    ap.add_argument("--out", default=None, help=f"JSON output file (default {DEFAULT_OUT})")
    ap.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(BENCHES))
    ap.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU only: torch threads (default: torch's own; 1 with --quick)")
    ap.add_argument("--compile-report", action="store_true",
                    help="compile the grouped-GEMM configs for sm_90a and report registers/spills/HGMMA")
    args = ap.parse_args(argv)

    if args.compile_report:
        rows = compile_report()
        doc: dict[str, Any] = {"meta": {**common.device_info(torch.device("cpu")), "target": "sm_90a"},
                               "compile_report": rows}
        if args.out:
            with open(args.out, "w") as f:
                json.dump(doc, f, indent=1)
        print(compile_table(rows))
        return doc

    device = common.pick_device(args.device)
    doc = run_benchmarks(device, _parse_only(args.only), args.quick, args.threads)
    tables = doc.pop("tables")
    out = args.out or DEFAULT_OUT
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"[bench] wrote {out}", file=sys.stderr)
    header = f"device: {doc['meta']['device_name']} | torch {doc['meta']['torch']} | triton {doc['meta']['triton']}"
    if device.type == "cpu":
        header += "\n" + CPU_CAVEAT
    print(header + "\n\n" + "\n\n".join(tables))
    return doc


if __name__ == "__main__":
    main()
