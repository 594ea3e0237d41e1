"""Shared benchmark machinery: device and version facts, timing, provider labels, ratios, JSON and tables.

In: a callable per provider plus several argument sets (inputs rotated across buffers so caches do not
flatter any provider). Out: `Timing` (median and quantiles over many runs) and result rows, which every
`bench_<family>.py` turns into one list of dicts that `python -m bench` writes as JSON and prints as a table.

Timing on CUDA uses one pair of CUDA events per run after warm-up; on CPU it uses time.perf_counter. Every
figure is a median; p20/p80 are kept so a noisy run shows as a wide band rather than a wrong number.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch

from tritonmoe import kernels as K

# Run-length policy. On CUDA a run is ~0.1-20 ms, so ~100 runs over ~0.3 s keeps the median stable to ~1%;
# on a shared 2-core CPU we can afford far fewer.
CUDA_WARMUP_S, CUDA_MEASURE_S, CUDA_MIN_RUNS, CUDA_MAX_RUNS = 0.05, 0.3, 10, 200
CPU_WARMUP_RUNS, CPU_MEASURE_S, CPU_MIN_RUNS, CPU_MAX_RUNS = 2, 0.2, 5, 50


@dataclass(frozen=True)
class Timing:
    median_ms: float  # the figure every rate and ratio is computed from
    p20_ms: float  # 20th percentile
    p80_ms: float  # 80th percentile
    min_ms: float  # fastest run, for spotting outliers only
    runs: int  # number of timed runs


def pick_device(requested: str | None = None) -> torch.device:
    """The device to benchmark on: `requested` if given, else CUDA when present, else CPU."""
    if requested is not None:
        dev = torch.device(requested)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {requested!r} requested but torch.cuda.is_available() is False")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bench_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (what training runs); fp32 on CPU, where bf16 GEMMs are emulated and would time that."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict[str, Any]:
    """What a reader needs to know to trust or reproduce a figure: hardware, versions, date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info: dict[str, Any] = {
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "triton_interpret_env": os.environ.get("TRITON_INTERPRET", ""),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, capability=f"sm_{props.major}{props.minor}",
                    sm_count=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    else:
        info.update(device_name=_cpu_name(), cpu_threads=torch.get_num_threads())
    return info


def ours_op(name: str, device: torch.device) -> tuple[Callable, str]:
    """The function timed as "ours" for kernel op `name` (the public op) and an honest label of what it runs.

    CUDA: the compiled Triton kernel. CPU: the PyTorch twin; the driver runs every benchmark inside
    `cpu_twin_path`, so the interpreter (a correctness tool) is never timed.
    """
    public = getattr(K, name)
    if device.type == "cuda":
        return public, "triton"
    backend = K.backend_for(torch.empty(0, device=device))
    if backend is K.Backend.INTERPRETER:
        return public, "triton (interpreter)"
    return public, "torch twin (CPU path of the public op)"


@contextlib.contextmanager
def cpu_twin_path(device: torch.device):
    """While benchmarking on CPU, make the public ops take their PyTorch-twin path even if the interpreter is
    on (the test suite turns it on): timing the interpreter would measure Python. No effect on CUDA."""
    with K.force_twins() if device.type == "cpu" else contextlib.nullcontext():
        yield


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable, arg_sets: Sequence[tuple], device: torch.device, *, quick: bool = False) -> Timing:
    """Median and quantiles of fn(*arg_sets[i % len(arg_sets)]) over many runs, after warm-up.

    The argument sets are distinct buffers holding random data, so consecutive runs do not find their
    inputs in cache. Run count adapts to the cost of one run (measured during warm-up).
    """
    if not arg_sets:
        raise ValueError("time_fn needs at least one argument set")
    n = len(arg_sets)
    if device.type == "cuda":
        fn(*arg_sets[0])
        _sync(device)
        t0 = time.perf_counter()
        i = 0
        while time.perf_counter() - t0 < (0.01 if quick else CUDA_WARMUP_S) or i < 2:
            fn(*arg_sets[i % n])
            _sync(device)
            i += 1
        per_run = (time.perf_counter() - t0) / i
        runs = int(min(CUDA_MAX_RUNS, max(CUDA_MIN_RUNS, (0.05 if quick else CUDA_MEASURE_S) / per_run)))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        for r in range(runs):
            starts[r].record()
            fn(*arg_sets[r % n])
            ends[r].record()
        _sync(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for i in range(CPU_WARMUP_RUNS):  # the first run pays for allocation and lazy init; estimate from the last
            t0 = time.perf_counter()
            fn(*arg_sets[i % n])
        per_run = time.perf_counter() - t0
        budget = 0.03 if quick else CPU_MEASURE_S
        runs = int(min(CPU_MAX_RUNS, max(CPU_MIN_RUNS, budget / max(per_run, 1e-9))))
        times = []
        for r in range(runs):
            t = time.perf_counter()
            fn(*arg_sets[r % n])
            times.append((time.perf_counter() - t) * 1e3)
    return summarize(times)


def summarize(times_ms: Sequence[float]) -> Timing:
    if not times_ms:
        raise ValueError("no timings to summarize")
    s = sorted(times_ms)
    q = statistics.quantiles(s, n=5, method="inclusive") if len(s) > 1 else [s[0]] * 4
    return Timing(median_ms=statistics.median(s), p20_ms=q[0], p80_ms=q[3], min_ms=s[0], runs=len(s))


def rotation_count(bytes_per_set: int, device: torch.device, want: int = 4) -> int:
    """How many input buffers to rotate through: `want`, fewer when memory is short (at least one)."""
    if device.type != "cuda":
        return min(want, 2)
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(want, int(0.25 * free // max(bytes_per_set, 1))))


def copy_sets(n_bytes_moved: int, dtype: torch.dtype, device: torch.device, n_sets: int) -> list[tuple]:
    """`n_sets` (dst, src) pairs for ``torch.Tensor.copy_``, each copy reading and writing `n_bytes_moved`
    bytes in total: the bandwidth ceiling of a memory-bound op, rotated like the op's own inputs so the
    ceiling is not flattered by a source left in cache."""
    n = n_bytes_moved // 2 // (torch.finfo(dtype).bits // 8)
    return [(torch.empty(n, device=device, dtype=dtype), torch.randn(n, device=device, dtype=dtype))
            for _ in range(n_sets)]


def max_rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference of `a` from `ref`, relative to the largest magnitude in `ref` (fp32)."""
    return float(((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item())


def sig(x: float, digits: int = 3) -> float:
    """x rounded to `digits` significant digits (relative errors span 1e-8..1e-1)."""
    return float(f"{x:.{digits}g}")


def row(bench: str, case: dict[str, Any], provider: str, backend: str, timing: Timing | None,
        rate: float | None, unit: str, **extra: Any) -> dict[str, Any]:
    """One result record: the case, who ran it, how long, and its rate (TFLOP/s or GB/s)."""
    r = {"bench": bench, **case, "provider": provider, "backend": backend, "unit": unit,
         "rate": None if rate is None else sig(rate, 4)}
    if timing is not None:
        r.update({k: sig(v, 4) if isinstance(v, float) else v for k, v in asdict(timing).items()})
    r.update(extra)
    return r


def add_ratios(rows: list[dict[str, Any]], case_keys: Sequence[str], ours: str, peers: Sequence[str],
               ceiling: str | None) -> None:
    """Annotate the `ours` row of every case with vs_best_peer (ours / best peer's rate, same run) and
    of_ceiling (ours / ceiling's rate). Providers that did not run (rate None) are left out."""
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault(tuple(r.get(k) for k in case_keys), {})[r["provider"]] = r
    for provs in by_case.values():
        mine = provs.get(ours)
        if mine is None or mine["rate"] is None:
            continue
        peer_rates = [(provs[p]["rate"], p) for p in peers if p in provs and provs[p]["rate"]]
        if peer_rates:
            best, who = max(peer_rates)
            mine["vs_best_peer"] = round(mine["rate"] / best, 3)
            mine["best_peer"] = who
        if ceiling and ceiling in provs and provs[ceiling]["rate"]:
            mine["of_ceiling"] = round(mine["rate"] / provs[ceiling]["rate"], 3)


def format_table(rows: list[dict[str, Any]], case_keys: Sequence[str], providers: Sequence[str],
                 title: str, ratio_keys: Sequence[str] = ("vs_best_peer", "of_ceiling")) -> str:
    """One line per case: the case fields, each provider's rate, then ours' ratios (`ratio_keys`; keys
    starting with "of_" print as percentages, the rest as multiples)."""
    if not rows:
        return f"{title}\n  (no results)"
    unit = rows[0]["unit"]
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault(tuple(r.get(k) for k in case_keys), {})[r["provider"]] = r
    head = list(case_keys) + [f"{p} {unit}" for p in providers] + list(ratio_keys)
    body = []
    for key, provs in by_case.items():
        cells = [str(v) for v in key]
        for p in providers:
            rate = provs.get(p, {}).get("rate")
            cells.append("-" if rate is None else f"{rate:.3g}")
        mine = provs.get(providers[0], {})
        cells += ["-" if k not in mine else f"{mine[k]:.0%}" if k.startswith("of_") else f"{mine[k]:.2f}x"
                  for k in ratio_keys]
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    backends = sorted({f"{r['provider']}={r['backend']}" for r in rows if r["provider"] == providers[0]})
    lines = [title, "  " + "; ".join(backends), fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*b) for b in body]
    return "\n".join(lines)

