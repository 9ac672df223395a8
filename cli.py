"""moa-search command line: each command parses options and calls one library function."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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
) -> None:
    """Per-layer table of a plan's patterns, KV memory and bytes read relative to dense."""
    from moa_search.plan import load_plan
    from moa_search.show import describe_plan

    typer.echo(describe_plan(load_plan(plan), _lengths(lengths)))


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
        str, typer.Option(help="'all' tokens or only the marked 'answer' span.")
    ] = "all",
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="Recompute layer activations in backward (saves memory).")
    ] = True,
    validate: Annotated[
        int, typer.Option(help="Measure M single-head ablations; report Spearman vs predicted.")
    ] = 0,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a profile made with other arguments.")
    ] = False,
    candidates: Annotated[
        str | None, typer.Option(help="';'-separated pattern specs (default: built-in grid).")
    ] = None,
    plots: Annotated[bool, typer.Option(help="Write heatmaps and distance curves.")] = True,
) -> None:
    """Measure each layer/head's loss sensitivity to each candidate pattern on calibration text.

    Resumable: rerun the same command to continue an interrupted profile."""
    from moa_search.profile import profile as run_profile

    result = run_profile(
        model, calib=calib, lengths=_lengths(lengths), out=out, device=device, devices=devices,
        dtype=dtype, samples=samples, block_size=block_size, seed=seed, loss=loss,
        gradient_checkpointing=gradient_checkpointing, validate=validate, overwrite=overwrite,
        candidates=candidates, plots=plots,
    )  # fmt: skip
    typer.echo(f"wrote profile to {result.out}")


@app.command(name="eval")
def evaluate(
    model: Annotated[str, typer.Argument(help="Model alias, HF name or path.")] = "smollm2-135m",
    plan: Annotated[Path, typer.Option(help="Plan YAML to evaluate.")] = ...,
    baselines: Annotated[
        str, typer.Option(help="Comma-separated: dense,window,elastic,sparq (or empty).")
    ] = "dense,window,elastic,sparq",
    tasks: Annotated[str, typer.Option(help="Comma-separated: ppl,passkey,kv-retrieval.")] = (
        "ppl,passkey,kv-retrieval"
    ),
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
) -> None:
    """Compare a plan's quality (perplexity, retrieval) with dense and uniform baselines."""
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

    result = run_eval(
        model,
        plan,
        items(baselines),
        items(tasks),
        _lengths(lengths),
        floats(depths, "--depths"),
        samples,
        out,
        device,
        dtype,
        seed,
        floats(budgets, "--budgets") or None,
        items(sweep_plans) or None,
        sweep_length,
        backend=backend,
        sink=sink,
        elastic_beta=elastic_beta,
        ppl_corpus=ppl_corpus,
    )
    typer.echo(f"wrote {result.out / 'results.md'} ({result.seconds:.0f} s)")


def _not_yet(name: str) -> None:
    raise MoaSearchError(f"'moa-search {name}' is not available in this version yet")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def plan() -> None:
    """Search per-head patterns under KV memory / bandwidth budgets (Optuna + exact knapsack)."""
    _not_yet("plan")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench() -> None:
    """Measure generation speed and memory of a plan against dense."""
    _not_yet("bench")


def main() -> None:
    """Console entry point: one-line errors instead of tracebacks for user mistakes."""
    try:
        app()
    except MoaSearchError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
