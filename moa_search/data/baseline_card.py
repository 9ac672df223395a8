"""Dense baseline card: perplexity by length and retrieval accuracy by length and depth.

Why: every sparse profile is judged against the dense model, so the dense numbers
(with their sample counts, device and dtype) are measured once and committed next
to the profiles. Run ``moa-search card --help``. Perplexity uses the same test-token
stream (documents joined by EOS) and NLL as ``moa-search eval`` (``moa_search.nll``).
"""

from __future__ import annotations

import csv
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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
from moa_search.data.texts import CORPORA
from moa_search.files import write_text
from moa_search.models import DEFAULT_MODEL
from moa_search.nll import token_stream, window_nll

FIELDS = ["metric", "source", "length", "depth", "n", "value", "seconds"]


@dataclass(frozen=True)
class CardConfig:
    """What ``moa-search card`` measures (the defaults are its options' defaults)."""

    model: str = DEFAULT_MODEL
    dtype: str = "float32"
    device: str = "cpu"
    ppl_lengths: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)
    ppl_windows: int = 1
    ret_lengths: tuple[int, ...] = (1024, 2048, 4096)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    n: int = 5  # samples per retrieval cell
    passkey_format: str = DEFAULT_PASSKEY_FORMAT
    kv_format: str = DEFAULT_KV_FORMAT


def perplexity_rows(model, tokenizer, lengths, n_windows, corpora=CORPORA, split="test"):
    """Perplexity of non-overlapping windows from the start of each corpus's ``split``
    stream, at each length, averaged in log space."""
    for corpus in corpora:
        stream = token_stream(tokenizer, split, corpus).tolist()
        for length in lengths:
            t = time.time()
            starts = [i * length for i in range(n_windows) if (i + 1) * length <= len(stream)]
            nll = [window_nll(model, stream[a : a + length])[0] for a in starts]
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


def baseline_card(config: CardConfig, out: str | Path) -> Path:
    """Measure the card; writes ``out``/baseline_card.csv and baseline_card.md (the markdown
    after every row, so an interrupted run still leaves a card). Returns the markdown path."""
    from moa_search.models import load_model_and_tokenizer  # noqa: PLC0415 - heavy import

    c = config
    model, tok = load_model_and_tokenizer(c.model, dtype=c.dtype, device=c.device)
    started = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    gens = [
        perplexity_rows(model, tok, c.ppl_lengths, c.ppl_windows),
        retrieval_rows(model, tok, "passkey", c.ret_lengths, c.depths, c.n, c.passkey_format),
        retrieval_rows(model, tok, "kv", c.ret_lengths, c.depths, c.n, c.kv_format),
    ]
    with open(out / "baseline_card.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for gen in gens:
            for row in gen:
                rows.append(row)
                writer.writerow(row)
                f.flush()
                print(row, flush=True)
                write_text(out / "baseline_card.md", render_markdown(rows, _header(c, started)))
    return out / "baseline_card.md"


def _header(c: CardConfig, started: float) -> dict[str, str]:
    if c.device == "cpu":
        device = (
            f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        )
    else:
        device = torch.cuda.get_device_name(torch.device(c.device))
    settings = ", ".join(f"{k}={v}" for k, v in asdict(c).items() if k not in ("model", "dtype"))
    return {
        "model": c.model,
        "device": device,
        "dtype": c.dtype,
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}",
        "settings": f"`{settings}`",
        "runtime": f"{time.time() - started:.0f} s",
        "greedy decoding": "12 new tokens; correct = answer appears as a whole word",
    }
