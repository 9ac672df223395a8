"""moa-search command line: each command parses options and calls one library function."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moa_search.devices import parse_device, parse_devices
from moa_search.errors import MoaSearchError

app = typer.Typer(
    help="Find and run per-head sparse attention plans (window, elastic span, SparQ) "
    "for transformers LLMs: profile -> plan -> eval / bench.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _lengths(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise typer.BadParameter(f"expected positive lengths, got {text!r}")
    return values


@app.command()
def show(
    plan: Annotated[Path, typer.Argument(help="Plan YAML to summarise.")],
    lengths: Annotated[
        str, typer.Option(help="Comma-separated lengths for the cost columns.")
    ] = "4096,32768",
    costs: Annotated[
        Path | None,
        typer.Option(help="Cost table (bench --calibrate-costs): adds predicted latency."),
    ] = None,
    batch: Annotated[int, typer.Option(help="Batch size of the predicted latency.")] = 1,
) -> None:
    """Per-layer table of a plan's patterns, KV memory and bytes read relative to dense."""
    from moa_search.plan import load_plan
    from moa_search.show import describe_plan

    table = None
    if costs is not None:
        from moa_search.search.latency import load_costs

        table = load_costs(costs)
    typer.echo(describe_plan(load_plan(plan), _lengths(lengths), table, batch))


@app.command()
def profile(
    model: Annotated[
        str, typer.Argument(help="Model alias, HF name or local path.")
    ] = "smollm2-135m",
    calib: Annotated[
        Path | None,
        typer.Option(
            help=".txt/.jsonl/.parquet file or folder (default: built-in calibration set)."
        ),
    ] = None,
    lengths: Annotated[
        str, typer.Option(help="Comma-separated profiled lengths.")
    ] = "2048,4096,8192",
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default profiles/<model>).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or auto (sharded).")] = None,
    devices: Annotated[
        str | None, typer.Option(help="Comma-separated devices; samples split across them.")
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16.")] = None,
    samples: Annotated[int, typer.Option(help="Calibration samples per length.")] = 8,
    block_size: Annotated[int, typer.Option(help="Influence block size (tokens).")] = 64,
    seed: Annotated[int, typer.Option(help="Seed for sampling calibration data.")] = 0,
    loss: Annotated[
        str,
        typer.Option(
            help="gradient: 'all' tokens or the marked 'answer' span (measured "
            "always scores answers only where the data marks them)."
        ),
    ] = "all",
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="Recompute layer activations in backward (saves memory).")
    ] = True,
    validate: Annotated[
        int, typer.Option(help="gradient: measure M single-head ablations, report Spearman.")
    ] = 0,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a profile made with other arguments.")
    ] = False,
    candidates: Annotated[
        str | None, typer.Option(help="';'-separated pattern specs (default: built-in grid).")
    ] = None,
    patterns: Annotated[
        str | None,
        typer.Option(
            help="Families of the default grid to profile (dense always), e.g. "
            "window,elastic for a memory budget: SparQ stores every key."
        ),
    ] = None,
    sparq_rows: Annotated[
        int, typer.Option(help="Query rows per sample that price SparQ candidates (0: all).")
    ] = 256,
    plots: Annotated[bool, typer.Option(help="Write heatmaps and distance curves.")] = True,
    method: Annotated[
        str, typer.Option(help="'measured' single-head ablations or 'gradient' (first order).")
    ] = "measured",
    fidelity: Annotated[
        str, typer.Option(help="measured: 'exact' or 'scored' (later layers at scored tokens).")
    ] = "exact",
    row_batch: Annotated[int, typer.Option(help="measured: ablations per forward batch.")] = 64,
    max_scored: Annotated[
        int, typer.Option(help="measured: scored positions read per sample (0: all).")
    ] = 128,
    storage: Annotated[
        str | None,
        typer.Option(help="RDB URL shared by workers (sqlite:///f.db, postgresql://...)."),
    ] = None,
) -> None:
    """Measure each layer/KV head's sensitivity to each candidate pattern on calibration data.

    Resumable: rerun the same command to continue an interrupted profile."""
    device, devices = parse_device(device, allow_auto=True), parse_devices(devices)
    from moa_search.profile import ProfileConfig
    from moa_search.profile import profile as run_profile
    from moa_search.profile.measured import MeasureConfig

    config = ProfileConfig(
        method=method, lengths=tuple(_lengths(lengths)), samples=samples, candidates=candidates,
        families=tuple(_items(patterns)) if patterns else None, seed=seed, loss=loss,
        dtype=dtype, device=device, devices=devices, storage=storage,
        block_size=block_size, sparq_rows=sparq_rows,
        gradient_checkpointing=gradient_checkpointing, validate=validate,
        measure=MeasureConfig(fidelity, row_batch, max_scored), plots=plots,
    )  # fmt: skip
    result = run_profile(model, config, calib=calib, out=out, overwrite=overwrite)
    typer.echo(f"wrote profile to {result.out}")


@app.command(name="eval")
def evaluate(
    model: Annotated[str, typer.Argument(help="Model alias, HF name or path.")] = "smollm2-135m",
    plan: Annotated[Path, typer.Option(help="Plan YAML to evaluate.")] = ...,
    baselines: Annotated[
        str, typer.Option(help="Comma-separated: dense,window,elastic,sparq (or empty).")
    ] = "dense,window,elastic,sparq",
    tasks: Annotated[
        str,
        typer.Option(
            help="Comma-separated: ppl, passkey, kv-retrieval, RULER tasks (niah-number, "
            "niah-word, niah-uuid, niah-multikey, niah-multivalue, niah-multiquery, vt, cwe, "
            "fwe), or the groups ruler / niah; empty with --lm-eval for harness tasks only."
        ),
    ] = "ppl,passkey,kv-retrieval",
    lengths: Annotated[str, typer.Option(help="Comma-separated eval lengths.")] = "2048,4096,8192",
    depths: Annotated[str, typer.Option(help="Needle depths in [0, 1].")] = "0.1,0.3,0.5,0.7,0.9",
    samples: Annotated[int, typer.Option(help="Samples per cell (ppl windows, prompts).")] = 10,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("eval"),
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    seed: Annotated[int, typer.Option(help="Seed of every sample.")] = 0,
    budgets: Annotated[
        str, typer.Option(help="KV memory fractions for the sweep, e.g. 0.125,0.25,0.5.")
    ] = "",
    sweep_plans: Annotated[
        str, typer.Option(help="Comma-separated plan YAMLs (e.g. Pareto plans) for the sweep.")
    ] = "",
    sweep_length: Annotated[
        int | None, typer.Option(help="Sweep length (default: longest --lengths).")
    ] = None,
    backend: Annotated[str, typer.Option(help="Decode backend: auto, reference, triton.")] = "auto",
    sink: Annotated[int, typer.Option(help="Sink tokens of window/elastic baselines.")] = 64,
    elastic_beta: Annotated[
        float | None, typer.Option(help="Fixed beta of the elastic baseline.")
    ] = None,
    ppl_corpus: Annotated[str, typer.Option(help="Test corpus for perplexity.")] = "austen",
    ruler_corpus: Annotated[str, typer.Option(help="Test corpus of RULER filler.")] = "austen",
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Answer tokens of every generation task (default: per task).")
    ] = None,
    batch: Annotated[
        int, typer.Option(help="Prompts generated together (GPU: 8-16; 1 on a CPU).")
    ] = 1,
    lm_eval: Annotated[
        str,
        typer.Option(
            "--lm-eval",
            help="Comma-separated lm-evaluation-harness tasks to run with the plan and the "
            "baselines (needs moa-search[lm-eval]).",
        ),
    ] = "",
    lm_eval_include: Annotated[
        Path | None, typer.Option(help="Folder of extra harness task YAMLs.")
    ] = None,
    lm_eval_limit: Annotated[
        float | None, typer.Option(help="Documents per harness task (<1: a fraction).")
    ] = None,
    lm_eval_fewshot: Annotated[int | None, typer.Option(help="Few-shot examples.")] = None,
    lm_eval_length: Annotated[
        int | None,
        typer.Option(
            help="Harness context cap; baselines match memory there (default: longest --lengths)."
        ),
    ] = None,
    lm_eval_batch_size: Annotated[int, typer.Option(help="Harness batch size.")] = 1,
    lm_eval_chat_template: Annotated[
        bool, typer.Option(help="Apply the model's chat template to harness prompts.")
    ] = False,
) -> None:
    """Compare a plan's quality (perplexity, retrieval, RULER, lm-eval tasks) with dense and
    uniform baselines at equal KV memory."""
    device = parse_device(device)
    from moa_search.evaluate import EvalConfig
    from moa_search.evaluate import evaluate as run_eval

    def items(text: str) -> list[str]:
        return [x.strip() for x in text.split(",") if x.strip()]

    def floats(text: str, what: str) -> list[float]:
        try:
            return [float(x) for x in items(text)]
        except ValueError:
            raise typer.BadParameter(
                f"{what}: expected comma-separated numbers, got {text!r}"
            ) from None

    harness = None
    if items(lm_eval):
        from moa_search.evaluate.harness import HarnessConfig

        limit = int(lm_eval_limit) if lm_eval_limit and lm_eval_limit >= 1 else lm_eval_limit
        harness = HarnessConfig(
            tasks=tuple(items(lm_eval)), include=lm_eval_include, limit=limit,
            num_fewshot=lm_eval_fewshot, length=lm_eval_length, batch_size=lm_eval_batch_size,
            chat_template=lm_eval_chat_template,
        )  # fmt: skip
    config = EvalConfig(
        baselines=tuple(items(baselines)), tasks=tuple(items(tasks)),
        lengths=tuple(_lengths(lengths)), depths=tuple(floats(depths, "--depths")),
        samples=samples, seed=seed, device=device, dtype=dtype, backend=backend,
        budgets=tuple(floats(budgets, "--budgets")) or None,
        sweep_plans=tuple(items(sweep_plans)) or None, sweep_length=sweep_length, sink=sink,
        elastic_beta=elastic_beta, ppl_corpus=ppl_corpus, ruler_corpus=ruler_corpus,
        max_new_tokens=max_new_tokens, lm_eval=harness, batch=batch,
    )  # fmt: skip
    result = run_eval(model, plan, config, out=out)
    typer.echo(f"wrote {result.out / 'results.md'} ({result.seconds:.0f} s)")


def _items(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


@app.command()
def plan(
    profile: Annotated[
        Path, typer.Argument(help="Profile folder written by 'moa-search profile'.")
    ],
    budget: Annotated[
        list[str] | None,
        typer.Option(
            help="Repeatable: memory=0.25, bandwidth=0.2, memory=8GiB@32k,batch=8, "
            "latency=0.5, latency=300us@32k,batch=8 (latency needs --costs)."
        ),
    ] = None,
    costs: Annotated[
        Path | None,
        typer.Option(help="Cost table from 'bench --calibrate-costs' pricing latency budgets."),
    ] = None,
    lengths: Annotated[
        str | None, typer.Option(help="Planned lengths (default: all profiled).")
    ] = None,
    trials: Annotated[int, typer.Option(help="Total trials the study should reach.")] = 200,
    out: Annotated[Path | None, typer.Option(help="Output folder (default PROFILE/plans).")] = None,
    storage: Annotated[
        str | None, typer.Option(help="Optuna storage URL (default sqlite in --out).")
    ] = None,
    study: Annotated[str | None, typer.Option(help="Study name (join an existing one).")] = None,
    patterns: Annotated[str, typer.Option(help="Allowed families.")] = "dense,window,elastic,sparq",
    objective: Annotated[
        str, typer.Option(help="'predicted' (profile only) or 'measured' (runs the plans).")
    ] = "predicted",
    model: Annotated[
        str | None, typer.Option(help="Model for measured loss / fingerprint check.")
    ] = None,
    val_samples: Annotated[int, typer.Option(help="Held-out samples per measured trial.")] = 4,
    val_length: Annotated[int | None, typer.Option(help="Validation length (measured).")] = None,
    seed: Annotated[int, typer.Option(help="Sampler seed.")] = 0,
    sampler: Annotated[str, typer.Option(help="nsga2 or tpe.")] = "nsga2",
    synthetic: Annotated[
        str | None,
        typer.Option(
            help="Skip the search: write a synthetic plan 'density=0.25,length=32768' for "
            "PROFILE read as a model name or shape (e.g. llama3-8b-shape) to --out (a .yaml)."
        ),
    ] = None,
    weights: Annotated[
        str | None, typer.Option(help="Task weights of a measured profile: text=1,retrieval=1.")
    ] = None,
    check: Annotated[
        bool, typer.Option(help="Measure, refine and check the plans on held-out samples.")
    ] = False,
    check_samples: Annotated[int, typer.Option(help="check: held-out samples per length.")] = 8,
    check_rounds: Annotated[int, typer.Option(help="check: refinement rounds.")] = 3,
    check_balance: Annotated[
        int, typer.Option(help="check: re-weighting steps against the uniform window (0: off).")
    ] = 4,
    check_fidelity: Annotated[
        str,
        typer.Option(help="check: re-measure fidelity, scored (fast) or exact; plans run exactly."),
    ] = "scored",
    check_time: Annotated[
        float | None,
        typer.Option(
            help="check: seconds after which refine/balance/fidelity keep what they have."
        ),
    ] = None,
    check_plans: Annotated[
        int, typer.Option(help="check: random plans for the predicted-vs-measured Spearman.")
    ] = 20,
    device: Annotated[str, typer.Option(help="check: device of the model.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="check: float32 or bfloat16.")] = "float32",
) -> None:
    """Search per-head patterns under KV memory / bandwidth / latency budgets (Optuna + exact
    knapsack)."""
    if synthetic is not None:
        from moa_search.bench.synthetic import make_synthetic_plan_file

        written = make_synthetic_plan_file(str(profile), synthetic, out)
        typer.echo(f"wrote {written}")
        return
    from moa_search.search import SearchConfig, plan_search
    from moa_search.search.check import CheckConfig

    checked = (
        CheckConfig(  # device is parsed only when the check runs
            samples=check_samples,
            rounds=check_rounds,
            balance=check_balance,
            time_limit=check_time,
            fidelity=check_fidelity,
            random_plans=check_plans,
            device=device,
            dtype=dtype,
        )  # fmt: skip
        if check
        else None
    )
    config = SearchConfig(
        budgets=tuple(budget or ["memory=0.25"]),
        lengths=_lengths(lengths) if lengths else None, trials=trials, storage=storage,
        study_name=study, patterns=_items(patterns), objective=objective,
        val_samples=val_samples, val_length=val_length, seed=seed, sampler=sampler,
        weights=weights, check=checked, costs=str(costs) if costs is not None else None,
    )  # fmt: skip
    result = plan_search(profile, config, out=out, model=model)
    typer.echo(
        f"{len(result.pareto_plans)} Pareto plans; best: {result.best} (all in {result.out})"
    )
    if checked is not None:
        import json

        for v in json.loads((result.out / "check.json").read_text())["verdict"]:
            plan_obj, base_obj = v["objective"]
            lower = "plan" if v["plan_lower_divergence"] else "baseline"
            worse = sorted(set(v["tasks"]) - set(v["plan_no_worse_on"]))
            typer.echo(
                f"checked on held-out samples: plan divergence {plan_obj:.4g} vs uniform "
                f"{v['baseline']} {base_obj:.4g} ({lower} lower); plan worse on: "
                f"{', '.join(worse) or 'no task'}"
            )


@app.command(name="import")
def import_(
    fmt: Annotated[str, typer.Argument(help="'moa' (alphas/betas JSON) or 'duo' (gates TSV).")],
    path: Annotated[Path, typer.Argument(help="The peer's plan file.")],
    model: Annotated[str, typer.Option(help="Model the plan is for.")] = "smollm2-135m",
    out: Annotated[Path, typer.Option(help="Plan YAML to write.")] = Path("plan.yaml"),
    sink: Annotated[int | None, typer.Option(help="Sink tokens (moa: 64; duo: config).")] = None,
    recent: Annotated[
        int | None, typer.Option(help="duo: recent window of non-full heads.")
    ] = None,
    threshold: Annotated[float, typer.Option(help="duo: gate >= threshold stays dense.")] = 0.5,
) -> None:
    """Turn MoA's alphas/betas JSON or DuoAttention's full_attention_heads.tsv into a plan."""
    from moa_search.search import import_plan

    options = {"sink": sink} if sink is not None else {}
    if fmt == "duo":
        options.update(threshold=threshold, **({"recent": recent} if recent is not None else {}))
    typer.echo(f"wrote {import_plan(fmt, path, model, out, **options)}")


@app.command()
def bench(
    model: Annotated[
        str, typer.Argument(help="Model name/path, or a config-only shape: llama3-8b-shape.")
    ] = "llama3-8b-shape",
    plan: Annotated[Path | None, typer.Option(help="Plan YAML (or use --synthetic).")] = None,
    synthetic: Annotated[
        str | None, typer.Option(help="Synthetic plan, e.g. 'density=0.25'.")
    ] = None,
    batch: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,32",
    context: Annotated[str, typer.Option(help="Comma-separated context lengths.")] = "4096,32768",
    new_tokens: Annotated[int, typer.Option(help="Decode steps timed per config.")] = 128,
    memory_budget: Annotated[
        str, typer.Option(help="GPU memory for the equal-memory mode ('none' to skip).")
    ] = "60GiB",
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("bench_out"),
    configs: Annotated[str, typer.Option(help="Configs to run.")] = "dense-sdpa,dense-moa,plan",
    device: Annotated[str, typer.Option(help="CUDA device.")] = "cuda",
    dtype: Annotated[str, typer.Option(help="bfloat16 or float16.")] = "bfloat16",
    prefill_batch: Annotated[
        int, typer.Option(help="Sequences per timed prefill (0: no prefill timing).")
    ] = 1,
    overhead_at: Annotated[
        str, typer.Option(help="BATCH,CONTEXT where the step-time breakdown is measured ('').")
    ] = "8,32768",
    calibrate_costs: Annotated[
        Path | None,
        typer.Option(
            help="Instead: time one decode-attention step per KV head by pattern over "
            "--batch x --context and write this cost table (CSV) for plan --budget latency=."
        ),
    ] = None,
    stored: Annotated[
        str, typer.Option(help="calibrate-costs: entries kept by the timed window heads.")
    ] = "256,1024,4096",
    sparq: Annotated[
        str | None,
        typer.Option(help="calibrate-costs: ';'-separated SparQ settings (default: both grids)."),
    ] = None,
) -> None:
    """Measure generation speed and memory of a plan against dense, side by side (or, with
    --calibrate-costs, the per-head decode cost table a latency budget is priced with)."""
    device = parse_device(device)
    if calibrate_costs is not None:
        from moa_search.bench.calibrate import CalibrateConfig
        from moa_search.bench.calibrate import calibrate_costs as run_calibration
        from moa_search.bench.models import SHAPES, shape_config
        from moa_search.models import load_config
        from moa_search.plan import ModelIdentity

        config = shape_config(model) if model in SHAPES else load_config(model)
        calibration = CalibrateConfig(
            batches=tuple(_lengths(batch)), contexts=tuple(_lengths(context)),
            stored=tuple(_lengths(stored)),
            sparq=[x.strip() for x in sparq.split(";") if x.strip()] if sparq else None,
            device=device, dtype=dtype,
        )  # fmt: skip
        identity = ModelIdentity.from_config(config, model)
        typer.echo(f"wrote {run_calibration(identity, calibrate_costs, calibration)}")
        return
    from moa_search.bench.run import BenchConfig
    from moa_search.bench.run import bench as run_bench

    at = tuple(_lengths(overhead_at)) if overhead_at else None
    if at is not None and len(at) != 2:
        raise typer.BadParameter(f"--overhead-at: expected BATCH,CONTEXT, got {overhead_at!r}")
    config = BenchConfig(
        synthetic=synthetic, batch=batch, context=context, new_tokens=new_tokens,
        memory_budget=None if memory_budget == "none" else memory_budget,
        configs=tuple(_items(configs)), prefill_batch=prefill_batch or None, overhead_at=at,
        dtype=dtype, device=device,
    )  # fmt: skip
    run_bench(model, plan, config, out=out)
    typer.echo(f"wrote results to {out}")


@app.command()
def card(
    model: Annotated[str, typer.Argument(help="Model alias, HF name or path.")] = "smollm2-135m",
    out: Annotated[Path, typer.Option(help="Folder for baseline_card.csv / .md.")] = Path(
        "profiles/smollm2-135m"
    ),
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    ppl_lengths: Annotated[
        str, typer.Option(help="Perplexity lengths.")
    ] = "512,1024,2048,4096,8192",
    ppl_windows: Annotated[int, typer.Option(help="Perplexity windows per length.")] = 1,
    ret_lengths: Annotated[str, typer.Option(help="Retrieval lengths.")] = "1024,2048,4096",
    depths: Annotated[str, typer.Option(help="Needle depths in [0, 1].")] = "0.1,0.5,0.9",
    n: Annotated[int, typer.Option(help="Prompts per retrieval cell.")] = 5,
) -> None:
    """Measure the dense model's baseline card: perplexity by length, retrieval by depth."""
    from moa_search.data.baseline_card import CardConfig, baseline_card

    config = CardConfig(
        model, dtype=dtype, device=parse_device(device), ppl_lengths=tuple(_lengths(ppl_lengths)),
        ppl_windows=ppl_windows, ret_lengths=tuple(_lengths(ret_lengths)),
        depths=tuple(float(x) for x in _items(depths)), n=n,
    )  # fmt: skip
    typer.echo(f"wrote {baseline_card(config, out)}")


@app.command()
def quickstart(
    model: Annotated[str, typer.Argument(help="Model alias, HF name or path.")] = "smollm2-135m",
    out: Annotated[Path, typer.Option(help="Folder for profile/, plans/ and eval/.")] = Path(
        "runs/quickstart"
    ),
    budget: Annotated[str, typer.Option(help="KV budget of the searched plan.")] = "memory=0.25",
    profile_lengths: Annotated[str, typer.Option(help="Profiled lengths.")] = "1024",
    profile_samples: Annotated[int, typer.Option(help="Calibration samples per length.")] = 8,
    trials: Annotated[int, typer.Option(help="Optuna trials.")] = 60,
    eval_lengths: Annotated[str, typer.Option(help="Eval lengths.")] = "1024",
    eval_samples: Annotated[int, typer.Option(help="Samples per eval cell and depth.")] = 2,
    depths: Annotated[
        str, typer.Option(help="Needle depths of retrieval tasks.")
    ] = "0.1,0.3,0.5,0.7,0.9",
    tasks: Annotated[str, typer.Option(help="Eval tasks.")] = "ppl,passkey",
    baselines: Annotated[str, typer.Option(help="Eval baselines.")] = "dense,window",
    validate: Annotated[int, typer.Option(help="Ablations checking the profile.")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16.")] = "float32",
    fidelity: Annotated[
        str, typer.Option(help="Profile fidelity: 'scored' (CPU-sized) or 'exact'.")
    ] = "scored",
    full_grid: Annotated[
        bool, typer.Option(help="Profile the full candidate grid (GPU) instead of the CPU one.")
    ] = False,
) -> None:
    """The main job end to end: profile -> plan (checked) -> eval, sized for a CPU."""
    device = parse_device(device)
    from dataclasses import replace

    from moa_search.pipeline import QUICK_EVAL, QUICK_PROFILE
    from moa_search.pipeline import quickstart as run_quickstart
    from moa_search.profile.measured import MeasureConfig

    exact = fidelity == "exact"
    profile_config = replace(
        QUICK_PROFILE, lengths=tuple(_lengths(profile_lengths)), samples=profile_samples,
        validate=validate, device=device, dtype=dtype,
        measure=MeasureConfig(fidelity, 64 if exact else 32, 128 if exact else 16),
        candidates=None if full_grid else QUICK_PROFILE.candidates,
    )  # fmt: skip
    eval_config = replace(
        QUICK_EVAL, lengths=tuple(_lengths(eval_lengths)), samples=eval_samples,
        depths=tuple(float(x) for x in _items(depths)), tasks=tuple(_items(tasks)),
        baselines=tuple(_items(baselines)), device=device, dtype=dtype,
    )  # fmt: skip
    run_quickstart(model, out, profile_config, eval_config, budget, trials)


def main() -> None:
    """Console entry point: one-line errors instead of tracebacks for user mistakes."""
    try:
        app()
    except MoaSearchError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
