import numpy as np
import pytest

from moa_search.search.knapsack import Capacity, Infeasible, brute_force, solve


def _instance(rng, heads, cands, two_caps):
    values = rng.random((heads, cands)) * rng.random((heads, 1)) * 2
    values[:, 0] = 0.0  # "dense": free in loss, most expensive in bytes
    values[rng.random((heads, cands)) < 0.1] = np.inf
    values[:, 0] = 0.0
    mem = np.sort(rng.random(cands))[::-1] + 0.05
    caps = [Capacity("memory", mem, rng.uniform(mem.min(), mem.max()) * heads)]
    if two_caps:
        bw = rng.random(cands) + 0.05
        caps.append(Capacity("bandwidth", bw, rng.uniform(bw.min(), bw.max()) * heads))
    return values, caps


@pytest.mark.parametrize("max_distinct", [None, 1, 2])
@pytest.mark.parametrize("two_caps", [False, True])
def test_matches_brute_force(max_distinct, two_caps):
    rng = np.random.default_rng(7 + 10 * (max_distinct or 0) + two_caps)
    checked = 0
    for _ in range(15):
        heads, cands = int(rng.integers(2, 7)), int(rng.integers(2, 6))
        values, caps = _instance(rng, heads, cands, two_caps)
        layer_of = np.arange(heads) // 3
        exact = brute_force(values, caps, layer_of, max_distinct)
        if exact is None:
            with pytest.raises(Infeasible):
                solve(values, caps, layer_of, max_distinct)
            continue
        sol = solve(values, caps, layer_of, max_distinct)
        rows = np.arange(heads)
        for cap in caps:  # the solution really fits
            assert cap.per_head(heads)[rows, sol.choice].sum() <= cap.limit * (1 + 1e-9)
        if max_distinct:
            for lay in np.unique(layer_of):
                assert len(set(sol.choice[layer_of == lay])) <= max_distinct
        assert sol.objective <= exact[1] + 0.01 * max(abs(exact[1]), 1e-9)
        assert sol.bound <= exact[1] + 1e-9  # the certified bound is a true lower bound
        assert sol.gap <= 0.01
        checked += 1
    assert checked >= 6


def test_infeasible_names_the_cap_and_its_minimum():
    values = np.zeros((3, 2))
    cap = Capacity("memory@4096", np.array([4.0, 1.0]), 2.0)
    with pytest.raises(Infeasible) as err:
        solve(values, [cap])
    assert err.value.capacity == "memory@4096" and err.value.smallest == 3.0
