"""Dense baseline card: perplexity by length and retrieval accuracy by length and depth.

Why: every sparse profile is judged against the dense model, so the dense numbers
(with their sample counts, device and dtype) are measured once and committed next
to the profiles. Run ``python -m moa_search.data.baseline_card --help``.
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from moa_search.data.retrieval import (
    DEFAULT_KV_FORMAT,
    DEFAULT_PASSKEY_FORMAT,
    greedy_generate,
    make_kv_sample,
    make_passkey_sample,
    score_answer,
)
from moa_search.data.texts import CORPORA, load_texts
from moa_search.models import DEFAULT_MODEL, load_model_and_tokenizer

FIELDS = ["metric", "source", "length", "depth", "n", "value", "seconds"]


def test_token_stream(tokenizer: Any, corpus: str, n_tokens: int, split: str = "test") -> list[int]:
    """The first ``n_tokens`` of a corpus's split, documents joined by blank lines."""
    ids: list[int] = []
    for doc in load_texts(split, corpus):
        ids.extend(tokenizer(doc.text + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= n_tokens:
            break
    return ids[:n_tokens]


@torch.no_grad()
def window_nll(model: Any, ids: list[int]) -> float:
    """Mean next-token negative log-likelihood over one window (no BOS added)."""
    x = torch.tensor([ids], device=model.device)
    logits = model(input_ids=x).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, x[0, 1:]).item()


def perplexity_rows(model, tokenizer, lengths, n_windows, corpora=CORPORA, split="test"):
    """Perplexity of non-overlapping windows at each length, averaged in log space."""
    for corpus in corpora:
        stream = test_token_stream(tokenizer, corpus, max(lengths) * n_windows, split)
        for length in lengths:
            t = time.time()
            starts = [i * length for i in range(n_windows) if (i + 1) * length <= len(stream)]
            nll = [window_nll(model, stream[a : a + length]) for a in starts]
            ppl = math.exp(sum(nll) / len(nll)) if nll else float("nan")
            yield {
                "metric": "perplexity",
                "source": f"{corpus}/{split}",
                "length": length,
                "depth": "",
                "n": len(nll),
                "value": round(ppl, 3),
                "seconds": round(time.time() - t, 1),
            }


def retrieval_rows(model, tokenizer, task, lengths, depths, n, fmt, split="test"):
    """Accuracy of greedy answers to passkey / key-value prompts, one row per (length, depth)."""
    for length in lengths:
        for depth in depths:
            t, ok = time.time(), 0
            for seed in range(n):
                if task == "passkey":
                    s = make_passkey_sample(
                        tokenizer, length, depth, seed, split=split, prompt_format=fmt
                    )
                else:
                    s = make_kv_sample(tokenizer, length, depth, seed, prompt_format=fmt)
                ok += score_answer(greedy_generate(model, tokenizer, s.prompt_ids, 12), s.answer)
            yield {
                "metric": f"{task}_accuracy",
                "source": f"{task}:{fmt}",
                "length": length,
                "depth": depth,
                "n": n,
                "value": round(ok / n, 3),
                "seconds": round(time.time() - t, 1),
            }


def render_markdown(rows: list[dict], header: dict[str, str]) -> str:
    """A human-readable card: header facts, a perplexity table and accuracy tables."""
    out = [f"# Dense baseline card: {header['model']}", ""]
    out += [f"- **{k}**: {v}" for k, v in header.items()]
    ppl = [r for r in rows if r["metric"] == "perplexity"]
    if ppl:
        lengths = sorted({r["length"] for r in ppl})
        out += ["", "## Perplexity (non-overlapping windows from the start of each test text)", ""]
        out += [
            "| text | " + " | ".join(str(x) for x in lengths) + " |",
            "|---" * (len(lengths) + 1) + "|",
        ]
        for src in dict.fromkeys(r["source"] for r in ppl):
            cells = {
                r["length"]: f"{r['value']:.2f} (n={r['n']})" for r in ppl if r["source"] == src
            }
            out.append(f"| {src} | " + " | ".join(cells.get(x, "-") for x in lengths) + " |")
    for task in ("passkey", "kv"):
        acc = [r for r in rows if r["metric"] == f"{task}_accuracy"]
        if not acc:
            continue
        depths = sorted({r["depth"] for r in acc})
        out += [
            "",
            f"## {task} retrieval accuracy (`{acc[0]['source']}`), correct/n by length x depth",
            "",
        ]
        out += [
            "| length | " + " | ".join(f"depth {d}" for d in depths) + " | all |",
            "|---" * (len(depths) + 2) + "|",
        ]
        for length in sorted({r["length"] for r in acc}):
            cells = {r["depth"]: r for r in acc if r["length"] == length}
            hit = sum(round(r["value"] * r["n"]) for r in cells.values())
            tot = sum(r["n"] for r in cells.values())
            row = [
                f"{round(cells[d]['value'] * cells[d]['n'])}/{cells[d]['n']}" if d in cells else "-"
                for d in depths
            ]
            out.append(f"| {length} | " + " | ".join(row) + f" | {hit}/{tot} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Measure the dense baseline card of a model.")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ppl-lengths", default="512,1024,2048,4096,8192")
    ap.add_argument("--ppl-windows", type=int, default=1)
    ap.add_argument("--ret-lengths", default="1024,2048,4096")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--n", type=int, default=5, help="samples per retrieval cell")
    ap.add_argument("--passkey-format", default=DEFAULT_PASSKEY_FORMAT)
    ap.add_argument("--kv-format", default=DEFAULT_KV_FORMAT)
    ap.add_argument("--out", type=Path, default=Path("profiles") / DEFAULT_MODEL)
    args = ap.parse_args(argv)

    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    model, tok = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device)
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    csv_path = args.out / "baseline_card.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        depths = [float(x) for x in args.depths.split(",")]
        gens = [
            perplexity_rows(model, tok, ints(args.ppl_lengths), args.ppl_windows),
            retrieval_rows(
                model, tok, "passkey", ints(args.ret_lengths), depths, args.n, args.passkey_format
            ),
            retrieval_rows(
                model, tok, "kv", ints(args.ret_lengths), depths, args.n, args.kv_format
            ),
        ]
        for gen in gens:
            for row in gen:
                rows.append(row)
                writer.writerow(row)
                f.flush()
                print(row, flush=True)
                _write_card(args, argv, rows, started)
    return 0


def _write_card(
    args: argparse.Namespace, argv: list[str] | None, rows: list[dict], started: float
) -> None:
    """Rewrite the markdown after every row, so an interrupted run still leaves a card."""
    device = args.device if args.device == "cpu" else torch.cuda.get_device_name()
    if args.device == "cpu":
        device = (
            f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        )
    cmd = "python -m moa_search.data.baseline_card " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    header = {
        "model": args.model,
        "device": device,
        "dtype": args.dtype,
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}",
        "command": f"`{cmd.strip()}`",
        "runtime": f"{time.time() - started:.0f} s",
        "greedy decoding": "12 new tokens; correct = answer appears as a whole word",
    }
    (args.out / "baseline_card.md").write_text(render_markdown(rows, header))


if __name__ == "__main__":
    raise SystemExit(main())
