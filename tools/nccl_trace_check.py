"""Capture a small CUDA + NCCL trace and read it with distattn's overlap analyser (GPU path).

Usage (repository root, GPUs visible):
    torchrun --nproc-per-node N tools/nccl_trace_check.py [--out DIR]
    python tools/nccl_trace_check.py [--out DIR]          # one process, world size 1

Each rank alternates GEMMs with asynchronous NCCL all-reduces (issued through
distattn.comm, so the host-side comm/comm_wait labels are there too), exports
its Chrome trace, and prints what `distattn.profile.trace.analyze` finds: the
NCCL kernels (communication), the other kernels (compute), exposed
communication and the overlap ratio. `distattn profile --analyze DIR` reads the
same traces.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/nccl_check")
    ap.add_argument("--size-mib", type=int, default=256, help="all-reduce payload per step")
    ap.add_argument("--gemm", type=int, default=8192, help="GEMM side length")
    a = ap.parse_args()

    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile, record_function

    from distattn.comm import Comm, CommLedger, ledgered_backend
    from distattn.profile.trace import STEP_PREFIX, analyze, load_trace

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    rank = dist.get_rank()
    ledger = CommLedger()
    comm = Comm(None, ledger)
    dev = torch.device("cuda", local)
    buf = torch.ones(a.size_mib * 2**20 // 4, device=dev)
    x = torch.randn(a.gemm, a.gemm, device=dev, dtype=torch.bfloat16)
    for _ in range(2):  # warm-up: NCCL communicator, cuBLAS handles
        comm.all_reduce(buf, async_op=True).wait()
        x @ x
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(3):
            with record_function(f"{STEP_PREFIX}{i}"):
                h = comm.all_reduce(buf, async_op=True)  # travels while the GEMMs run
                for _ in range(4):
                    x @ x
                h.wait()
                comm.all_reduce(buf)  # nothing to hide behind: exposed
                if dist.get_world_size() == 1:  # Comm runs a 1-rank group locally: call NCCL directly,
                    nccl = dist                  # still counted, through the ledger's foreign-backend hook
                    with ledgered_backend(nccl, comm.ledger, tag="direct"):
                        w = nccl.all_reduce(buf, async_op=True)
                        for _ in range(2):
                            x @ x
                        w.wait()
                        nccl.all_reduce(buf)
                torch.cuda.synchronize()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"rank{rank}.json"
    prof.export_chrome_trace(str(path))
    tr = load_trace(path)
    kernels = sorted({e.name.split("(")[0] for e in tr.events if e.cat == "kernel"})
    res = analyze(tr)
    print(json.dumps({"rank": rank, "world": dist.get_world_size(), "kernels": kernels[:20],
                      "analysis": res.as_dict()}, indent=1, default=str))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
