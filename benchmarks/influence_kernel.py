"""Fused static-influence kernel vs the attention backward it rides on (run on a GPU).

For each layer shape, times (CUDA events, median of repeats) in one run:
  * sdpa_fwd_bwd   causal SDPA forward + backward (what a training step pays per layer);
  * kernel         ``moa_search.kernels.influence.static_influence`` with the default
                   static candidate grid;
  * torch          the same sums through the PyTorch loop (``static_influence_torch``);
  * sparq          SparQ candidates (default grid) at --sparq-rows sampled rows;
and the largest relative difference kernel vs torch (both float32 sums).

    python benchmarks/influence_kernel.py
    python benchmarks/influence_kernel.py --shapes 32x8x128@32768 --out k.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
import torch.nn.functional as F

from moa_search.kernels.influence import static_influence
from moa_search.profile.candidates import default_candidates, split_static
from moa_search.profile.influence import (
    LayerAttention,
    dropped_range,
    sparq_influence,
    sparq_stride_for,
    static_influence_torch,
)
from moa_search.profile.run import DEFAULT_SPARQ_ROWS

DEFAULT_SHAPES = ("9x3x64@2048", "9x3x64@8192", "32x8x128@8192", "32x8x128@32768")


def timed(fn, repeat: int) -> float:
    """Median milliseconds of ``repeat`` CUDA-event timed calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def run_shape(
    spec: str, repeat: int, sparq_rows: int, with_torch: bool, tune: bool, profile_sparq: bool
) -> dict:
    heads_spec, length = spec.split("@")
    hq, hkv, d = (int(x) for x in heads_spec.split("x"))
    n = int(length)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, do = (torch.randn(hq, n, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in "ab")
    k, v = (torch.randn(hkv, n, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in "ab")
    scale = d**-0.5
    static, sparq = split_static(default_candidates([n], 64, d))
    lo, hi = dropped_range(static, torch.arange(n, device="cuda"), n)

    def sdpa():
        leaves = [t[None].detach().requires_grad_(True) for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*leaves, is_causal=True, scale=scale, enable_gqa=True)
        torch.autograd.grad(out, leaves, do[None])

    row = {"shape": spec, "q_heads": hq, "kv_heads": hkv, "head_dim": d, "length": n}
    row["n_static"], row["n_sparq"], row["sparq_rows"] = len(static), len(sparq), sparq_rows
    row["device"] = torch.cuda.get_device_name()
    row["sdpa_fwd_bwd_ms"] = timed(sdpa, repeat)
    row["kernel_ms"] = timed(lambda: static_influence(q, k, v, do, scale, hi, lo, 64), repeat)
    if tune:  # other launch parameters, timed side by side with the default above
        for warps in (4, 8):
            for stages in (1, 2, 3):
                row[f"kernel_w{warps}s{stages}_ms"] = timed(
                    lambda w=warps, st=stages: static_influence(
                        q, k, v, do, scale, hi, lo, 64, num_warps=w, num_stages=st
                    ),
                    repeat,
                )
    stride = sparq_stride_for(n, sparq_rows)
    att = LayerAttention(q, k, v, do, scale)
    row["sparq_ms"] = timed(lambda: sparq_influence(att, sparq, stride), repeat)
    if with_torch:
        row["torch_ms"] = timed(
            lambda: static_influence_torch(att, static, 64), max(1, repeat // 3)
        )
        fused = static_influence(q, k, v, do, scale, hi, lo, 64)
        plain = static_influence_torch(att, static, 64)
        for key in ("moa", "row", "blocks"):
            ref = plain[key].double()
            err = (fused[key].double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)
            row[f"max_rel_err_{key}"] = float(err)
    row["kernel_over_sdpa"] = row["kernel_ms"] / row["sdpa_fwd_bwd_ms"]
    print({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    if profile_sparq:  # where SparQ pricing spends its time, op by op
        from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            sparq_influence(att, sparq, stride)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="HQxHKVxD@N, comma list")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--sparq-rows", type=int, default=DEFAULT_SPARQ_ROWS)
    ap.add_argument("--no-torch", action="store_true", help="skip the slow PyTorch loop")
    ap.add_argument("--tune", action="store_true", help="also time other num_warps/num_stages")
    ap.add_argument("--profile-sparq", action="store_true", help="print a torch.profiler table")
    ap.add_argument("--out", type=Path, default=None, help="CSV file to write")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("influence_kernel.py times GPU kernels: no CUDA device found")
    rows = [
        run_shape(
            s.strip(),
            args.repeat,
            args.sparq_rows,
            not args.no_torch,
            args.tune,
            args.profile_sparq,
        )
        for s in args.shapes.split(",")
    ]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
