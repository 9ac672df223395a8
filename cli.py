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


def _not_yet(name: str) -> None:
    raise MoaSearchError(f"'moa-search {name}' is not available in this version yet")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def profile() -> None:
    """Measure each layer/head's loss sensitivity to each candidate pattern on calibration text."""
    _not_yet("profile")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def plan() -> None:
    """Search per-head patterns under KV memory / bandwidth budgets (Optuna + exact knapsack)."""
    _not_yet("plan")


@app.command(
    name="eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def evaluate() -> None:
    """Compare a plan's quality (perplexity, retrieval) with dense and uniform baselines."""
    _not_yet("eval")


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
