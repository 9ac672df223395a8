"""How well the cheap "scored" fidelity ranks single-head ablations like "exact".

Measures the same window ablations with both fidelities on one text and one passkey sample
of the built-in calibration set, and prints the Spearman correlation, the median ratio of
the KL values and the time of each.

    python benchmarks/ablation_fidelity.py --length 512 --device cpu
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.stats import spearmanr

from moa_search.models import load_model, load_tokenizer
from moa_search.patterns import Window
from moa_search.profile.ablation import Ablation, AblationEngine
from moa_search.profile.calib import load_samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--layers", default="2,7,12,17,18,23,27")
    ap.add_argument("--spans", default="64,192")
    ap.add_argument("--max-scored", type=int, default=16)
    args = ap.parse_args()
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    tok = load_tokenizer(args.model)
    kv = int(model.config.num_key_value_heads)
    layers = [int(x) for x in args.layers.split(",")]
    spans = [int(x) for x in args.spans.split(",")]
    ablations = [
        Ablation(layer, h, Window(sink=32, span=s)) for layer in layers for h in range(kv)
        for s in spans
    ]  # fmt: skip
    for task, mix in (("text", {"text": 1}), ("retrieval", {"passkey": 1})):
        sample = load_samples(None, tok, args.length, 1, 11, "answer", mix, model)[0]
        kl, seconds = {}, {}
        for fidelity in ("exact", "scored"):
            engine = AblationEngine(model, fidelity, row_batch=16, max_scored=args.max_scored)
            start = time.perf_counter()
            run = engine.prepare(sample.input_ids, sample.loss_mask)
            kl[fidelity] = engine.effects(run, ablations).kl.numpy()
            seconds[fidelity] = time.perf_counter() - start
        rho = spearmanr(kl["exact"], kl["scored"]).statistic
        ratio = np.median(kl["scored"] / np.maximum(kl["exact"], 1e-12))
        print(
            f"{task}: {len(ablations)} ablations at {args.length} tokens on {args.device}: "
            f"Spearman(scored, exact) {rho:.3f}, median KL ratio {ratio:.3f}, "
            f"exact {seconds['exact']:.0f} s, scored {seconds['scored']:.0f} s"
        )


if __name__ == "__main__":
    main()
