"""Human-readable summary of a plan: patterns per layer and costs relative to dense.

"Dense" is what the model's own cache holds: on a layer the model itself makes sliding
(Gemma 2/3, Mistral, Qwen sliding layers) that is its window, and the table says so."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moa_search.plan import Plan

if TYPE_CHECKING:
    from moa_search.search.latency import CostTable


def describe_plan(
    plan: Plan, lengths: list[int], costs: CostTable | None = None, batch: int = 1
) -> str:
    """Per-layer table (patterns of each KV head, memory and bytes read vs dense) + totals;
    with a cost table also each layer's predicted attention us per decode step at ``batch``
    and the plan's total against dense."""
    m = plan.model
    if costs is not None:
        costs.check_geometry(m)
    lines = [
        f"plan for {m.name_or_path} ({m.architecture}): {m.num_layers} layers x "
        f"{m.num_key_value_heads} KV heads ({m.num_attention_heads} query heads), "
        f"head_dim {m.head_dim}, fingerprint {m.fingerprint}",
    ]
    sliding = m.sliding_layers
    if sliding:
        lines.append(
            f"native sliding layers ({len(sliding)} of {m.num_layers}, no head attends or "
            f"stores past the window): {_ranges(sliding)}"
        )
    if plan.lengths or plan.budget:
        lines.append(f"made for lengths {plan.lengths} under budget {plan.budget or '-'}")
    for key, value in plan.metrics.items():
        lines.append(f"metric {key}: {value}")
    header = "layer  native       " + "  ".join(f"mem@{n:<6}" for n in lengths) + "  "
    header += "  ".join(f"read@{n:<5}" for n in lengths) + "  "
    if costs is not None:
        header += "  ".join(f"{'us@' + str(n):<10}" for n in lengths) + "  "
    header += "patterns (per KV head)"
    lines.append(header)
    for i, row in enumerate(plan.heads):
        w = m.window(i)
        own = {n: 2 * min(n, w or n) * m.head_dim * 2 * len(row) for n in lengths}
        mem = [sum(p.bytes_stored(n, m.head_dim, 2, w) for p in row) / own[n] for n in lengths]
        read = [sum(p.bytes_read(n, m.head_dim, 2, w) for p in row) / own[n] for n in lengths]
        cells = (
            "  ".join(f"{x:>10.1%}" for x in mem) + "  " + "  ".join(f"{x:>10.1%}" for x in read)
        )
        if costs is not None:
            us = [sum(costs.head_us(p, batch, n, w) for p in row) for n in lengths]
            cells += "  " + "  ".join(f"{x:>10.1f}" for x in us)
        native = f"sliding {w}" if w is not None else "global"
        lines.append(f"{i:>5}  {native:<12} {cells}  {' | '.join(p.spec() for p in row)}")
    totals = "  ".join(f"{plan.memory_density(n):>10.1%}" for n in lengths)
    totals += "  " + "  ".join(f"{plan.read_density(n):>10.1%}" for n in lengths)
    lines.append(f"{'total':>5}  {totals}")
    if costs is not None:
        from moa_search.search.latency import dense_latency, plan_latency  # noqa: PLC0415

        parts = []
        for n in lengths:
            mine, base = plan_latency(costs, plan, batch, n), dense_latency(costs, m, batch, n)
            parts.append(f"{n}: {mine:.1f} us ({mine / base:.1%} of dense {base:.1f} us)")
        lines.append(
            f"predicted attention per decode step at batch {batch} on {costs.device} "
            f"({costs.path.name}): " + "; ".join(parts)
        )
    counts: dict[str, int] = {}
    for row in plan.heads:
        for p in row:
            counts[p.name] = counts.get(p.name, 0) + 1
    lines.append("heads by family: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    parts: list[str] = []
    start = prev = layers[0]
    for i in [*layers[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)
