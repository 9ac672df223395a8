"""runtime.prefill.fresh_prefill equals the per-head reference on a fresh prompt."""

from __future__ import annotations

import pytest
import torch

from moa_search.patterns import parse
from moa_search.runtime.prefill import covers_all, fresh_prefill
from moa_search.runtime.reference import attend_head
from moa_search.runtime.scores import Logits

SPECS = [
    [
        "dense",
        "window:sink=4,span=16",
        "elastic:sink=2,alpha=3.0,beta=0.25",
        "window:sink=4,span=16",
    ],
    ["window:sink=0,span=7", "elastic:sink=0,alpha=0.0,beta=0.5", "sparq:r=4,k=8,local=4", "dense"],
    ["window:sink=8,span=200"] * 4,  # covers every key at this length: the causal path
]


@pytest.mark.parametrize("specs", SPECS)
@pytest.mark.parametrize("chunk", [16, 33, 1024])
def test_fresh_prefill_matches_reference(specs, chunk):
    torch.manual_seed(0)
    batch, kv, group, length, dim = 2, 4, 2, 90, 16
    q = torch.randn(batch, kv * group, length, dim, dtype=torch.float64)
    k = torch.randn(batch, kv, length, dim, dtype=torch.float64)
    v = torch.randn(batch, kv, length, dim, dtype=torch.float64)
    patterns = [parse(s) for s in specs]
    pos = torch.arange(length)[None].expand(batch, -1)
    want = torch.empty_like(q)
    for h, p in enumerate(patterns):
        sl = slice(h * group, (h + 1) * group)
        want[:, sl] = attend_head(q[:, sl], k[:, h], v[:, h], pos, pos, p, Logits(dim**-0.5))
    got = fresh_prefill(q, k, v, patterns, Logits(dim**-0.5), chunk=chunk)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_covers_all():
    assert covers_all(parse("dense"), 10)
    assert covers_all(parse("window:sink=2,span=8"), 10)
    assert not covers_all(parse("window:sink=2,span=7"), 10)
    assert not covers_all(parse("elastic:sink=0,alpha=0.0,beta=0.5"), 10)


def test_prefill_sweep_smoke(tmp_path):
    """benchmarks/prefill.py --sweep on the CPU (eager flex): a row per variant and length."""
    import csv  # noqa: PLC0415
    import runpy  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "prefill.py"
    main = runpy.run_path(str(script))["main"]
    main(["--smoke", "--sweep", "--sweep-count", "2", "--lengths", "160", "--layers", "1",
          "--reps", "1", "--out", str(tmp_path)])  # fmt: skip
    with open(tmp_path / "prefill.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == ["dense", "b128", "b128-m128n64-w8s3"]
    assert all(r["status"] == "ok" and float(r["x_dense"]) > 0 for r in rows)
    assert all(float(r["err_vs_banded"]) == 0 for r in rows[1:])


def test_prefill_model_scope_smoke(tmp_path):
    """The model scope on the CPU (tiny model, eager): every method timed in each
    interleaved round, the rounds' spread reported, the paths each method took."""
    import csv  # noqa: PLC0415
    import runpy  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "prefill.py"
    main = runpy.run_path(str(script))["main"]
    main(["--smoke", "--lengths", "", "--model-lengths", "96", "--model-shape", "tiny-llama",
          "--model-reps", "1", "--model-rounds", "2", "--out", str(tmp_path)])  # fmt: skip
    with open(tmp_path / "prefill.csv") as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert list(rows) == ["dense", "dense-plan", "banded", "flex", "flex-split"]
    for method, row in rows.items():
        assert row["status"] == "ok", (method, row["status"])
        assert row["rounds"] == "2"
        low, high = (float(x) for x in row["ms_range"].split("-"))
        assert low <= float(row["ms"]) <= high
    assert rows["dense-plan"]["paths"].startswith("sdpa:")
    assert rows["banded"]["paths"].startswith("banded:")
    assert 0 < float(rows["flex"]["attended"]) < 1


def test_attended_fraction_counts_each_heads_pairs():
    """Dense heads attend every causal pair; a sink + window head min(q + 1, sink + span)
    pairs at query q; the fraction averages heads."""
    import runpy  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415
    from types import SimpleNamespace  # noqa: PLC0415

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "prefill.py"
    fraction = runpy.run_path(str(script))["attended_fraction"]
    n, sink, span = 50, 3, 10
    plan = SimpleNamespace(heads=[[parse("dense"), parse(f"window:sink={sink},span={span}")]])
    window_pairs = sum(min(q + 1, sink + span) for q in range(n))
    want = (n * (n + 1) / 2 + window_pairs) / (2 * n * (n + 1) / 2)
    assert fraction(plan, n) == pytest.approx(want)
