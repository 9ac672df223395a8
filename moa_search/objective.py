"""What a plan is scored on: per-task divergence from the dense model, and the task weights.

Why one home: the profiler writes one column per task family, the search combines them with
the user's weights, and the plan check reports the same families; all three read the task
names and the weight parser from here.
"""

from __future__ import annotations

from collections.abc import Mapping

from moa_search.errors import MoaSearchError

#: task family of every calibration sample kind
FAMILY_OF_KIND = {
    "text": "text",
    "code": "code",
    "passkey": "retrieval",
    "kv": "retrieval",
    "multivalue": "retrieval",
    "self_text": "self",
    "self_code": "self",
}
TASKS = ("text", "code", "retrieval", "self")
#: equal weight per family: each family's term is its mean KL per scored token, so a
#: retrieval head (KL of nats on the answer when it is lost) is paid for, and text
#: decides among the heads retrieval does not need
DEFAULT_WEIGHTS = {"text": 1.0, "code": 1.0, "retrieval": 1.0, "self": 1.0}


def family_of(kind: str) -> str:
    """Task family of a sample kind; unknown kinds (user data) count as text."""
    return FAMILY_OF_KIND.get(kind, "text")


def parse_weights(text: str | Mapping[str, float] | None) -> dict[str, float]:
    """``"text=1,retrieval=2"`` -> weights for every family (unnamed families get 0 when any
    is named; None gives the defaults)."""
    if text is None or text == "":
        return dict(DEFAULT_WEIGHTS)
    if isinstance(text, Mapping):
        items = list(text.items())
    else:
        items = []
        for part in str(text).split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise MoaSearchError(f"weights: expected task=number, got {part.strip()!r}")
            key, value = part.split("=", 1)
            items.append((key.strip(), value.strip()))
    out = dict.fromkeys(TASKS, 0.0)
    seen = set()
    for key, value in items:
        if key not in TASKS:
            raise MoaSearchError(f"weights: unknown task {key!r} (known: {', '.join(TASKS)})")
        if key in seen:
            raise MoaSearchError(f"weights: task {key!r} given twice")
        seen.add(key)
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            raise MoaSearchError(f"weights: {key}: expected a number, got {value!r}") from None
        if not out[key] >= 0:
            raise MoaSearchError(f"weights: {key}: expected a number >= 0, got {value!r}")
    if not any(out.values()):
        raise MoaSearchError("weights: at least one task needs a positive weight")
    return out


def weights_text(weights: Mapping[str, float]) -> str:
    return ",".join(f"{k}={weights[k]:g}" for k in TASKS if weights.get(k))
