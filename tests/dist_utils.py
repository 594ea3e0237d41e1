"""Run a function on N real gloo processes (CPU) and collect each rank's return value.

Processes are forked (torch is already imported in the parent, so a group starts in well under a second
instead of paying an interpreter + torch import per rank). Each child sets the torchrun environment
variables (RANK, WORLD_SIZE, LOCAL_RANK), initialises the default gloo group through a FileStore in a fresh
temporary folder (no TCP port to pick: a port found free and released can be taken before the ranks bind it),
runs fn(*args), and reports its result or its traceback. One intra-op thread per rank: the CI machine has 2
cores and a group has up to 4 ranks.

Kernels: the children run the kernels' PyTorch twins (inside ``force_twins()``), as the CPU training example
does. These tests are about dispatch, sharding and training state, and
the kernels' own tests check the Triton kernels against the same twins; through the interpreter a group
took ~10x longer.
"""

import multiprocessing as mp
import os
import pickle
import tempfile
import traceback


def _child(rank, world, store_path, fn, args, queue):
    import torch
    import torch.distributed as dist

    from tritonmoe.kernels import force_twins

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
        with force_twins():
            result = fn(*args)
        # Plain pickle bytes: through the queue's own pickler torch would pass tensors as shared-memory
        # handles, which vanish when this process exits.
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # report every failure, including SystemExit from an argparse error
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world: int, *args, timeout: float = 120.0) -> list:
    """fn(*args) on `world` gloo ranks; returns [result of rank 0, ..., rank world-1].
    Raises AssertionError with the failing ranks' tracebacks if any rank fails or times out."""
    # Import the trainer and everything under it (DTensor, FSDP2, DCP: ~2.5 s) once here, before forking:
    # otherwise every rank of every group pays it again.
    import tritonmoe.dsv3.train  # noqa: F401

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    store_dir = tempfile.TemporaryDirectory(prefix="tritonmoe-store-")
    store_path = os.path.join(store_dir.name, "store")
    procs = [ctx.Process(target=_child, args=(r, world, store_path, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    try:
        for _ in range(world):
            rank, ok, value = queue.get(timeout=timeout)
            (results if ok else errors)[rank] = pickle.loads(value) if ok else value
            if errors:  # the others are probably blocked in a collective with the failed rank
                break
    except Exception as e:  # queue.Empty on timeout
        errors[-1] = f"timed out after {timeout} s waiting for ranks ({type(e).__name__})"
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
        store_dir.cleanup()
    if errors:
        raise AssertionError("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))
    return [results[r] for r in range(world)]
