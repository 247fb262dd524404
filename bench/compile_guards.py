"""Guard cost per call of a torch.compile'd all-MiniLM-L6-v2, dense or sparse: ``python -m bench.compile_guards
{dense,sparse}`` (results: ``bench/results/compile_guards_*.md``; old vs new code: run it from each tree).

Sparse: the 36 encoder linears magnitude-pruned 90%, every layer planned ``{128: cpu_columns, 1024:
cpu_columns}`` (fixed, so that two trees run the same backends). Seq 128, batches 1 and 8, ``torch.compile``
(inductor), one compiled model per process (models of one class share a code object and so a guard cache).
Per batch it prints: ``guard check`` (the matching cache entry's guard manager on the call's locals, hot,
200 rounds of 5), the torch.profiler ``TorchDynamo Cache Lookup`` event per call (20 calls: min, median), and
milliseconds per call with guards and with guard evaluation skipped (``skip_guard_eval_unsafe``), 12
alternating rounds.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
from torch.profiler import profile

import sparsecore as sc
from sparsecore.modules import SparseLinear

from .cpu_e2e import MiniLM, _encoder_linears


def main(which: str) -> None:
    torch.manual_seed(0)
    model = MiniLM().eval()
    if which == "sparse":
        cfg = sc.SparsityConfig("unstructured", 0.9)
        model = sc.sparsify(model, cfg, masks=sc.magnitude_masks(model, cfg, _encoder_linears)).eval()
        for m in model.modules():
            if isinstance(m, SparseLinear):
                m.load_plan({128: "cpu_columns", 1024: "cpu_columns"})
    g = torch.Generator().manual_seed(1)
    xs = {b: (torch.randint(0, 1000, (b, 128), generator=g), torch.ones(b, 128, dtype=torch.long)) for b in (1, 8)}
    c = torch.compile(model)
    with torch.no_grad():
        for x in xs.values():
            c(*x)
        entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(MiniLM.forward)
        for b, x in xs.items():
            loc = {"self": model, "input_ids": x[0], "attention_mask": x[1]}
            gm = [e for e in entries if e.guard_manager.check(loc)][0].guard_manager
            ts = []
            for _ in range(200):
                t = time.perf_counter()
                for _ in range(5):
                    gm.check(loc)
                ts.append((time.perf_counter() - t) / 5 * 1e6)
            for _ in range(3):
                c(*x)
            with profile() as prof:
                for _ in range(20):
                    c(*x)
            lk = sorted(ev.cpu_time_total for ev in prof.events() if ev.name == "TorchDynamo Cache Lookup")
            n = 10 if b == 1 else 2
            es, sk = [], []
            for _ in range(12):
                t = time.perf_counter()
                for _ in range(n):
                    c(*x)
                es.append((time.perf_counter() - t) / n * 1e3)
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    t = time.perf_counter()
                    for _ in range(n):
                        c(*x)
                    sk.append((time.perf_counter() - t) / n * 1e3)
            print(f"{which} b{b}: guard check min {min(ts):.0f} median {statistics.median(ts):.0f} us  profiler lookup "
                  f"min {lk[0]:.0f} median {lk[len(lk) // 2]:.0f} us/call  e2e {statistics.median(es):.2f} ms "
                  f"[{min(es):.2f}-{max(es):.2f}]  guards skipped {statistics.median(sk):.2f} ms "
                  f"[{min(sk):.2f}-{max(sk):.2f}]", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "sparse")
