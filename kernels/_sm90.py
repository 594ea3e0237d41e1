"""Compile a Triton kernel for Hopper (sm_90a) without a GPU and report what the machine code looks like.

In: a ``@triton.jit`` kernel, its signature (Triton type strings such as ``"*bf16"``, ``"i32"``), the
constexpr values and the launch options. Out: ``Sm90Report`` with registers per thread, spill/local-memory
bytes, the number of HGMMA (wgmma) instructions in the SASS, the shared memory a launch needs, and the PTX.

Why: CI has no GPU, yet a Hopper kernel that silently falls back to mma.sync, spills its accumulator or
asks for more shared memory than an SM has is broken. ``triton.compile`` with ``GPUTarget("cuda", 90, 32)``
builds the cubin on any machine, and the ``cuobjdump`` bundled in the triton wheel reads it.

    from tritonmoe.kernels._sm90 import compile_sm90
    rep = compile_sm90(my_kernel, {"x_ptr": "*bf16", "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 1024},
                       num_warps=4, num_stages=3)
    assert rep.spill_bytes == 0

Specialisation: Triton's launcher marks pointers (and integers) that are multiples of 16 with
``tt.divisibility=16`` and turns integers equal to 1 into constants; without that, loads do not vectorise
or pipeline and the report describes a kernel nobody runs. ``aligned`` names the arguments to mark (default:
every pointer); pass strides equal to 1 as constexprs.

Under ``TRITON_INTERPRET=1`` (the test suite) ``triton.jit`` builds interpreter objects, including the
``@jit`` helpers inside ``triton.language`` itself, and ``triton.compile`` fails on them. In that case the
jobs run in one child Python process with the variable removed, which imports the kernel by its module and
name (so kernels must be module-level functions of an importable module).
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import triton

SM90_SMEM_LIMIT = 232448  # bytes of shared memory one CTA may use on H100 (227 KiB opt-in)


@dataclass(frozen=True)
class Sm90Report:
    """What one sm_90a compilation produced."""
    name: str  # kernel name plus the constexprs and options that distinguish this compilation
    registers: int  # registers per thread (cuobjdump -res-usage REG)
    spill_bytes: int  # stack + local memory per thread (STACK + LOCAL); 0 means no spills
    local_ops: int  # LDL/STL instructions in the SASS (local-memory traffic, i.e. spills)
    hgmma: int  # wgmma instructions in the SASS (HGMMA: 16-bit operands, QGMMA: FP8); 0: mma.sync or FMA
    shared_bytes: int  # shared memory a launch needs (Triton's metadata, dynamic + static)
    ptx: str = field(repr=False)  # PTX text, for grepping (e.g. ld.global.v4 for 16-byte accesses)
    sass: str = field(repr=False)  # SASS text from cuobjdump -sass


@dataclass(frozen=True)
class Sm90Job:
    """One compilation request; see compile_sm90 for the fields."""
    kernel: object
    signature: dict
    constexprs: dict = field(default_factory=dict)
    aligned: tuple | None = None
    num_warps: int = 4
    num_stages: int = 3


def compile_sm90(kernel, signature: dict, constexprs: dict | None = None, *, aligned=None, num_warps: int = 4,
                 num_stages: int = 3) -> Sm90Report:
    """Compile `kernel` for sm_90a and report on it.

    kernel: a module-level ``@triton.jit`` function. signature: every argument name -> Triton type string
    (``"*bf16"``, ``"i32"``, ``"i64"``, ``"fp32"``) or ``"constexpr"``. constexprs: values of the constexpr
    arguments. aligned: argument names given ``tt.divisibility=16`` (default: all pointers).
    """
    job = Sm90Job(kernel, dict(signature), dict(constexprs or {}), None if aligned is None else tuple(aligned),
                  num_warps, num_stages)
    return compile_sm90_all([job])[0]


def compile_sm90_all(jobs: list[Sm90Job], workers: int | None = None) -> list[Sm90Report]:
    """compile_sm90 for many jobs; under the interpreter they run in `workers` child processes at once
    (default: one per CPU core, at most 4), each compiling an interleaved share: a compile is ~1 s of one
    core, so on CI's 2 cores this halves the wait."""
    if not _interpreting(jobs):
        return [_compile_here(job) for job in jobs]
    if not jobs:
        return []
    workers = max(1, min(workers or min(os.cpu_count() or 1, 4), len(jobs)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The child must import the same kernel modules this process sees.
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    reports: list = [None] * len(jobs)
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for w in range(workers):
            # stderr to a file: a child blocked on a full stderr pipe while we read another's stdout would hang.
            err = open(Path(tmp) / f"stderr{w}", "w+")
            proc = subprocess.Popen(
                [sys.executable, "-c", "from tritonmoe.kernels._sm90 import _child_main; _child_main()"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
            procs.append((w, proc, err))
        # Feed every child before reading any: communicate() on one at a time would serialise them.
        for w, proc, _ in procs:
            proc.stdin.write(json.dumps([_job_to_json(job) for job in jobs[w::workers]]))
            proc.stdin.close()
        for w, proc, err in procs:
            out = proc.stdout.read()
            rc = proc.wait()
            err.seek(0)
            msg = err.read()
            err.close()
            if rc != 0:
                raise RuntimeError(f"sm_90a compilation failed in the child process:\n{msg[-4000:]}")
            reports[w::workers] = [Sm90Report(**r) for r in json.loads(out)]
    return reports


def _interpreting(jobs) -> bool:
    from triton import knobs
    return knobs.runtime.interpret or any(type(j.kernel).__name__ == "InterpretedFunction" for j in jobs)


def _cuobjdump() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _compile_here(job: Sm90Job) -> Sm90Report:
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    fn = job.kernel
    names = fn.arg_names
    aligned = job.aligned if job.aligned is not None else [n for n, t in job.signature.items() if t.startswith("*")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature=job.signature, constexprs=job.constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": job.num_warps, "num_stages": job.num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_cuobjdump(), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    res = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    if "REG" not in res:
        raise RuntimeError(f"unexpected cuobjdump -res-usage output:\n{usage}")
    consts = ",".join(f"{k}={v}" for k, v in job.constexprs.items() if k.isupper())
    return Sm90Report(
        name=f"{fn.__name__}[{consts}|w{job.num_warps}s{job.num_stages}]",
        registers=int(res["REG"]),
        spill_bytes=int(res.get("STACK", 0)) + int(res.get("LOCAL", 0)),
        local_ops=len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        hgmma=len(re.findall(r"\b[HQ]GMMA\.", sass)),
        shared_bytes=int(compiled.metadata.shared),
        ptx=compiled.asm["ptx"],
        sass=sass,
    )


def _job_to_json(job: Sm90Job) -> dict:
    fn = getattr(job.kernel, "fn", job.kernel)
    return {"kernel": [fn.__module__, fn.__name__], "signature": job.signature, "constexprs": job.constexprs,
            "aligned": None if job.aligned is None else list(job.aligned), "num_warps": job.num_warps,
            "num_stages": job.num_stages}


def _child_main() -> None:
    import importlib

    jobs = []
    for d in json.loads(sys.stdin.read()):
        module, name = d.pop("kernel")
        kernel = getattr(importlib.import_module(module), name)
        jobs.append(Sm90Job(kernel=kernel, **d))
    json.dump([asdict(_compile_here(job)) for job in jobs], sys.stdout)
