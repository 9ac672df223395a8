"""Profiler cost vs one plain forward + backward over the same tokens (run on a GPU).

Cases: the default model (smollm2-135m) at 2k/4k/8k and a Llama-3-8B-shaped random-weight
model (32 layers, 32 q / 8 kv heads, d=128, hidden 4096, bf16) at 8k and 32k. For each:
  * baseline_s      forward + backward with the model's own SDPA attention, gradient
                    checkpointing and the chunked lm_head loss, no parameter grads: the
                    work the profile adds its influence computation to;
  * train_s         the same with parameter gradients (a plain training step);
  * profile_s       one profiled sample with the default candidate grid (SparQ priced at
                    at --sparq-rows rows, the profiler's default);
  * static_s        the same with dense/window/elastic candidates only (no SparQ);
  * torch_static_s  (--compare-torch) static candidates through the plain PyTorch loop
                    instead of the fused Triton kernel;
  * sparq_all_s     (--compare-torch) the full grid with SparQ priced at every row;
  * ratio = profile_s / baseline_s, and peak GPU memory of each.

    python benchmarks/profile_cost.py --out profile_cost.csv
    python benchmarks/profile_cost.py --cases smollm2-135m@2048 --out small.csv
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from moa_search.bench.models import build_model
from moa_search.profile.candidates import default_candidates, split_static
from moa_search.profile.capture import InfluenceRecorder, profile_sample, sample_loss
from moa_search.profile.run import DEFAULT_SPARQ_ROWS

DEFAULT_CASES = (
    "smollm2-135m@2048",
    "smollm2-135m@4096",
    "smollm2-135m@8192",
    "llama3-8b-shape@8192",
    "llama3-8b-shape@32768",
)


def timed(fn, device: str, repeat: int) -> tuple[float, float]:
    """Best wall time of ``repeat`` runs after one warm-up, and peak memory in GiB."""
    fn()
    best = float("inf")
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeat):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, torch.cuda.max_memory_allocated(device) / 2**30


def run_case(
    name: str,
    length: int,
    device: str,
    repeat: int,
    tile_rows: int | None,
    sparq_rows: int,
    compare_torch: bool,
) -> dict:
    model = build_model(name, torch.bfloat16, device)  # llama3-8b-shape: random weights
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    ids = torch.randint(0, cfg.vocab_size, (length,), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(length, dtype=torch.bool)
    cands = default_candidates([length], 64, head_dim)
    static, sparq = split_static(cands)
    row = {
        "case": f"{name}@{length}",
        "model": name,
        "length": length,
        "layers": cfg.num_hidden_layers,
        "q_heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": head_dim,
        "n_static": len(static),
        "n_sparq": len(sparq),
        "sparq_rows": sparq_rows,
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
    }

    def plain(param_grads: bool):
        def step():  # the model's own SDPA attention, checkpointed like the profile
            model.gradient_checkpointing_enable({"use_reentrant": False})
            model.train()
            for p in model.parameters():
                p.requires_grad_(param_grads)
            sample_loss(model, ids, mask, need_grad=True).backward()
            model.zero_grad(set_to_none=True)
            model.gradient_checkpointing_disable()
            model.eval()

        return step

    def prof(st, sq, rows=sparq_rows, backend="auto"):
        rec = InfluenceRecorder(st, sq, 64, tile_rows, rows, backend)
        return lambda: profile_sample(model, ids, mask, rec, gradient_checkpointing=True)

    todo = {
        "baseline": plain(False),
        "train": plain(True),
        "static": prof(static, []),
        "profile": prof(static, sparq),
    }
    if compare_torch:
        todo["torch_static"] = prof(static, [], backend="torch")
        todo["sparq_all"] = prof(static, sparq, rows=0)
    for key, fn in todo.items():
        try:
            # every case gets `repeat` runs up to 8k tokens (best of, like the baselines)
            reps = repeat if key in ("baseline", "train") or length <= 8192 else 1
            seconds, peak = timed(fn, device, reps)
            row[f"{key}_s"], row[f"{key}_peak_gib"] = round(seconds, 4), round(peak, 2)
        except torch.OutOfMemoryError:
            row[f"{key}_s"], row[f"{key}_peak_gib"] = "oom", "oom"
        torch.cuda.empty_cache()
        print(row["case"], key, row[f"{key}_s"], "s", row[f"{key}_peak_gib"], "GiB", flush=True)
    for key in ("profile", "static", "train", "torch_static", "sparq_all"):
        a, b = row.get(f"{key}_s"), row.get("baseline_s")
        if a is None:
            continue
        ok = isinstance(a, float) and isinstance(b, float)
        row[f"ratio_{key}"] = round(a / b, 3) if ok else ""
    todo.clear()
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="CSV file to write")
    ap.add_argument(
        "--cases",
        default=",".join(DEFAULT_CASES),
        help="comma list of MODEL@LENGTH (MODEL: a name/path or llama3-8b-shape)",
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of the baselines")
    ap.add_argument("--tile-rows", type=int, default=None, help="query rows per influence tile")
    ap.add_argument("--sparq-rows", type=int, default=DEFAULT_SPARQ_ROWS)
    ap.add_argument(
        "--compare-torch",
        action="store_true",
        help="also time the PyTorch static loop and SparQ at every row (slow at long N)",
    )
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_cost.py measures GPU time and memory: no CUDA device found")
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for case in args.cases.split(","):
        name, _, length = case.strip().rpartition("@")
        rows.append(
            run_case(
                name,
                int(length),
                args.device,
                args.repeat,
                args.tile_rows,
                args.sparq_rows,
                args.compare_torch,
            )
        )
        keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in rows[0], k))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as handle:  # rewritten per case: partial results
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
