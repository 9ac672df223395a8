import json

import pytest

from moa_search import load_plan
from moa_search.errors import MoaSearchError
from moa_search.patterns import Dense, Elastic, Window
from moa_search.search.importers import import_duo, import_moa, import_plan
from moa_search.search.synthetic import synthetic_identity

IDENT = synthetic_identity(num_layers=2, num_kv_heads=2, group=2, head_dim=64)  # 4 query heads


def test_moa_per_query_head_takes_group_max(tmp_path):
    src = tmp_path / "moa_alpha_beta.json"
    src.write_text(
        json.dumps(
            {
                "alphas": [[1024, 0, -1024, 2048], [0, 0, 0, 0]],
                "betas": [[0.125, 0.5, 0.875, 0.25], [0.25, 0.25, 0.0, 0.5]],
            }
        )
    )
    plan = import_moa(src, IDENT)
    assert plan.heads[0][0] == Elastic(sink=64, alpha=1024.0, beta=0.5)
    assert plan.heads[0][1] == Elastic(sink=64, alpha=2048.0, beta=0.875)
    assert plan.heads[1][1] == Elastic(sink=64, alpha=0.0, beta=0.5)
    assert "max alpha and max beta" in plan.notes
    out = import_plan("moa", src, IDENT, tmp_path / "moa.yaml")
    assert load_plan(out).heads == plan.heads


def test_moa_negative_alpha_is_raised_to_zero_per_kv_file(tmp_path):
    src = tmp_path / "kv.json"
    src.write_text(
        json.dumps({"alphas": [[-1024, 0], [0, 512]], "betas": [[0.875, 0.5], [0.5, 0.5]]})
    )
    plan = import_moa(src, IDENT, sink=4)
    assert plan.heads[0][0] == Elastic(sink=4, alpha=0.0, beta=0.875)
    assert "raised to 0" in plan.notes


@pytest.mark.parametrize(
    "doc, match",
    [
        ({"alphas": [[0, 0]] * 2}, "betas: missing"),
        ({"alphas": [[0, 0, 0]] * 2, "betas": [[0.5] * 3] * 2}, "heads per layer"),
        ({"alphas": [[0, 0]] * 2, "betas": [[1.5, 0]] * 2}, "fractions"),
    ],
)
def test_moa_bad_files(tmp_path, doc, match):
    src = tmp_path / "bad.json"
    src.write_text(json.dumps(doc))
    with pytest.raises(MoaSearchError, match=match):
        import_moa(src, IDENT)


def test_duo_threshold_and_defaults(tmp_path):
    src = tmp_path / "full_attention_heads.tsv"
    src.write_text("1.0\t-0.0001\n0.49\t0.5\n")
    plan = import_duo(src, IDENT)
    assert plan.heads == [
        [Dense(), Window(sink=64, span=256)],
        [Window(sink=64, span=256), Dense()],
    ]
    assert "DuoAttention defaults" in plan.notes
    strict = import_duo(src, IDENT, threshold=0.9, sink=4, recent=128)
    assert strict.heads[1][1] == Window(sink=4, span=128)


def test_duo_reads_config_beside_the_tsv(tmp_path):
    (tmp_path / "full_attention_heads.tsv").write_text("0\t1\n1\t0\n")
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "sink_size": 128,
                "recent_size": 256,
                "deploy_sink_size": None,
                "deploy_recent_size": 1024,
            }
        )
    )
    plan = import_duo(tmp_path / "full_attention_heads.tsv", IDENT)
    assert plan.heads[0][0] == Window(sink=128, span=1024)
    path = import_plan("duo", tmp_path / "full_attention_heads.tsv", IDENT, tmp_path / "d.yaml")
    assert load_plan(path).heads == plan.heads


def test_duo_wrong_shape_and_format(tmp_path):
    src = tmp_path / "f.tsv"
    src.write_text("1\t0\t1\n")
    with pytest.raises(MoaSearchError, match="expected 2 rows"):
        import_duo(src, IDENT)
    with pytest.raises(MoaSearchError, match="unknown plan format"):
        import_plan("quest", src, IDENT, tmp_path / "x.yaml")
