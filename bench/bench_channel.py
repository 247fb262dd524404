"""Channel pruning benchmark: ResNet-50 conv layers at 50% input and output channels, and end to end.

    python -m bench.bench_channel            # GPU: fp16, batch 1 and 32, NCHW and channels-last
    python -m bench.bench_channel --quick    # a small subset (CPU: fp32, reduced sizes; proves it runs)

Kernel level, per conv shape and memory format (``speedup_vs_dense_same_layout`` against the unpruned
dense conv in the same layout, ``speedup_vs_best_dense`` against the faster dense layout, all measured in
this run; ``sparsity_pct`` = 75: half the input x half the output channels):
* ``dense``          F.conv2d with the full weight (cuDNN / oneDNN), the baseline;
* ``physical_slice`` F.conv2d on an input that already has only the kept channels, with the sliced
                     weight: what a slimmed model runs (``sparsecore.channel.slim``);
* ``sliced_dense``   the SLICED_DENSE backend: gather kept input channels, sliced conv, scatter to full width;
* ``channel_conv``   the TRITON_CHANNEL backend (kernels/channel_conv.py): gather/scatter fused, one launch.
The FLOP ceiling of 50% in x 50% out is 4x.

Model level: ResNet-50 (torchvision layout, random weights, eval) dense vs slimmed with 50% of every
prunable channel group kept (L1 scores, ``round_to=8``), batch 1 and 32; the slimmed output is checked
against the masked dense model (``max_rel_err_vs_masked_ref``). ``sparsity_pct`` there is the share of
output channels pruned. Column vocabulary: ``bench.common``. ``--layers-only`` skips the model, ``--batches``
sets the conv batch sizes; the layer table is rewritten after every (layer, batch), and a provider that raises
gets a row with the reason in ``error`` (exit 1 when it is one of sparsecore's).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import (BEST_DENSE_MS, ERROR, SPEEDUP, TIME_MS, Table, bench_parser, env_info, error_row, failed,
                          ints_arg, speedup_columns, time_ms, write_table)
from sparsecore.backends import Backend, ConvParams, resolve
from sparsecore.channel import channel_groups, masked_reference, plan_slim, apply_plan
from sparsecore.formats.channel import ChannelWeight
from sparsecore.models.resnet import resnet50

# (name, C_in, C_out, H, W, k, stride): ResNet-50 convs at 224 x 224 (H, W = the conv's input size).
SHAPES = [
    ("layer1.conv2", 64, 64, 56, 56, 3, 1),
    ("layer1.conv3", 64, 256, 56, 56, 1, 1),
    ("layer2.conv1", 256, 128, 56, 56, 1, 1),
    ("layer2.conv2", 128, 128, 28, 28, 3, 1),
    ("layer3.conv2", 256, 256, 14, 14, 3, 1),
    ("layer3.conv3", 256, 1024, 14, 14, 1, 1),
    ("layer4.conv1", 2048, 512, 7, 7, 1, 1),
    ("layer4.conv2", 512, 512, 7, 7, 3, 1),
]
KEEP = 0.5


def _half_mask(c_out: int, c_in: int, k: int, g: torch.Generator) -> torch.Tensor:
    keep_out = torch.randperm(c_out, generator=g) < int(c_out * KEEP)
    keep_in = torch.randperm(c_in, generator=g) < int(c_in * KEEP)
    return (keep_out[:, None] & keep_in[None, :])[:, :, None, None].expand(c_out, c_in, k, k).contiguous()


def bench_layers(device: torch.device, dtype: torch.dtype, batches: list[int], shapes: list, scale: int,
                 table: Table | None = None) -> list[dict]:
    """Rows of every (layer, batch, layout, provider); each (layer, batch) is added to ``table`` as soon as
    it is measured. A provider that raises gets a row with the reason in ``error``."""
    rows, g = [], torch.Generator().manual_seed(0)
    env = env_info(device)
    for name, c_in, c_out, h, w, k, stride in shapes:
        h, w = max(h // scale, 1), max(w // scale, 1)
        weight = torch.randn(c_out, c_in, k, k, generator=g).to(dtype)
        mask = _half_mask(c_out, c_in, k, g)
        kept_share = float(mask.float().mean())
        packed = ChannelWeight.from_dense(weight, mask).to(device)
        weight, mask = weight.to(device), mask.to(device)
        conv = ConvParams(stride=(stride, stride), padding=(k // 2, k // 2))
        w_sliced = packed.values
        for batch in batches:
            x = torch.randn(batch, c_in, h, w, generator=g).to(device, dtype)
            x_small = x.index_select(1, packed.in_idx.long())
            dense_best, case_rows, errors = None, [], []
            for layout in ("channels_last", "nchw"):
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                xl, xsl = x.contiguous(memory_format=fmt), x_small.contiguous(memory_format=fmt)
                wl, wsl = weight.contiguous(memory_format=fmt), w_sliced.contiguous(memory_format=fmt)
                providers = {
                    "dense": lambda: F.conv2d(xl, wl, None, conv.stride, conv.padding),
                    "physical_slice": lambda: F.conv2d(xsl, wsl, None, conv.stride, conv.padding),
                }
                for label, backend in (("sliced_dense", Backend.SLICED_DENSE), ("channel_conv", Backend.TRITON_CHANNEL)):
                    try:
                        impl = resolve("conv2d", backend, packed, xl)
                    except Exception as e:  # a provider that cannot run here is reported, never silently dropped
                        print(f"skip {label} ({name}, {layout}): {e}")
                        continue
                    state = impl.prepare(packed)
                    providers[label] = (lambda impl=impl, state=state: impl.run(state, xl, None, conv))
                times = {}
                for label, fn in providers.items():
                    try:
                        fn()  # compile / autotune / oneDNN primitive creation, kept apart from timing
                        times[label] = time_ms(fn, device)
                    except Exception as e:  # noqa: BLE001  (one provider's failure is one row, not a lost run)
                        print(f"!! {label} ({name}, {layout}, batch {batch}): {type(e).__name__}: {e}")
                        errors.append(error_row({"layer": name, "C_in": c_in, "C_out": c_out, "H": h, "W": w, "k": k,
                                                 "batch": batch, "dtype": str(dtype).removeprefix("torch."),
                                                 "layout": layout}, label, e, env))
                if "dense" not in times:
                    continue
                dense_best = min(times["dense"], dense_best or float("inf"))
                h_out = (h + 2 * (k // 2) - k) // stride + 1
                w_out = (w + 2 * (k // 2) - k) // stride + 1
                flops_dense = 2 * batch * h_out * w_out * c_out * c_in * k * k
                for label, t in times.items():
                    kept_flops = flops_dense if label == "dense" else flops_dense * packed.n_out * packed.n_in / (c_out * c_in)
                    case_rows.append({"layer": name, "C_in": c_in, "C_out": c_out, "H": h, "W": w, "k": k,
                                      "batch": batch, "sparsity_pct": round(100 * (1 - kept_share)),
                                      "dtype": str(dtype).removeprefix("torch."), "layout": layout, "provider": label,
                                      TIME_MS: t, "useful_TFLOP_per_s": kept_flops / (t * 1e-3) / 1e12,
                                      "speedup_vs_dense_same_layout": times["dense"] / t})
            # The best dense layout is known only once both layouts ran.
            done = [{**r, **speedup_columns(r[TIME_MS], dense_best), **env} for r in case_rows] + errors
            if table is not None:
                table.add(done)
            rows += done
    return rows


def _half_group_masks(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    from sparsecore.masks import as_matrix, keep_channels
    l1 = {f: as_matrix(m.weight.detach()).abs().sum(1).cpu() for f, m in model.named_modules()
          if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    masks = {}
    for grp in channel_groups(model, x):
        if not bool(grp.prunable.all()):
            continue
        masks.update(grp.expand(keep_channels(grp.scores(l1), max(1, int(grp.n_units * KEEP)))))
    return masks


def bench_model(device: torch.device, dtype: torch.dtype, batches: list[int], size: int, width: int) -> list[dict]:
    torch.manual_seed(0)
    model = resnet50(num_classes=1000, width=width).eval()
    x_trace = torch.randn(1, 3, size, size)
    masks = _half_group_masks(model, x_trace)
    plan = plan_slim(model, masks, x_trace, round_to=8)
    small = apply_plan(model, plan)
    ref = masked_reference(model, plan.masks, x_trace)
    rows, env = [], env_info(device)
    fmt = torch.channels_last
    nets = {name: m.to(device, dtype).to(memory_format=fmt) for name, m in (("dense", model), ("slimmed", small), ("masked_ref", ref))}
    for batch in batches:
        x = torch.randn(batch, 3, size, size).to(device, dtype).contiguous(memory_format=fmt)
        with torch.inference_mode():
            y_ref = nets["masked_ref"](x).float()
            # Relative to the output's scale: random-weight ResNet-50 logits are far from unit size.
            err = float((nets["slimmed"](x).float() - y_ref).abs().max() / y_ref.abs().max().clamp_min(1e-30))
            times = {}
            for name in ("dense", "slimmed"):
                net = nets[name]
                net(x)
                times[name] = time_ms(lambda: net(x), device)
        for name, t in times.items():
            params = sum(p.numel() for p in nets[name].parameters())
            rows.append({"model": "resnet50", "width": width, "input": size, "batch": batch,
                         "sparsity_pct": 0 if name == "dense" else round(100 * (1 - KEEP)),
                         "dtype": str(dtype).removeprefix("torch."), "layout": "channels_last", "provider": name,
                         "params": params, **speedup_columns(t, times["dense"]),
                         "max_rel_err_vs_masked_ref": err if name == "slimmed" else 0.0, **env})
    print(plan.summary().splitlines()[0])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser("bench.bench_channel", __doc__, "a small subset (the CPU default)")
    ap.add_argument("--out", dest="out_dir", type=Path, help=argparse.SUPPRESS)  # the former name of --out-dir
    ap.add_argument("--batches", type=ints_arg, help="conv batch sizes (default: 1,32 on GPU, 32 with --quick)")
    ap.add_argument("--layers-only", action="store_true", help="the conv layers only, not ResNet-50 end to end")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    quick = args.quick or not on_gpu
    if not on_gpu:
        print("no CUDA device: fp32 CPU subset at reduced sizes; channel_conv (Triton) needs CUDA and is skipped")
    dtype = torch.float16 if on_gpu else torch.float32
    shapes = [SHAPES[0], SHAPES[4]] if quick else SHAPES
    batches = args.batches or ([1] if not on_gpu else ([1, 32] if not args.quick else [32]))
    table = Table("channel_conv", device, args.out_dir)
    layer_rows = bench_layers(device, dtype, batches, shapes, scale=1 if on_gpu else 4, table=table)
    print(table.path)
    model_rows = []
    if not args.layers_only:
        model_rows = bench_model(device, dtype, [1, 32] if on_gpu else [1], size=224 if on_gpu else 64,
                                 width=64 if on_gpu else 16)
        print(write_table("channel_resnet50", model_rows, device, args.out_dir))
    for r in layer_rows + model_rows:
        if r.get(ERROR):
            continue
        key = r.get("layer", r.get("model"))
        print(f"{key:14s} b={r['batch']:<3d} {r['layout']:13s} {r['provider']:15s} {r[TIME_MS]:8.3f} ms  "
              f"x{r[SPEEDUP]:.2f} vs best dense ({r[BEST_DENSE_MS]:.3f} ms)")
    bad = failed(layer_rows, ("sliced_dense", "channel_conv"))  # sparsecore's own providers
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
