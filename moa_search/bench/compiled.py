"""torch.compile for the decode step's eager work outside attention, reversibly.

A decode step of the plan runtime at B=8 spends its non-GEMM, non-attention kernel time on
many tiny elementwise kernels: each RMSNorm is about seven (cast, square, mean, rsqrt, two
multiplies, cast back), rotary about five per tensor, the MLP's SiLU times gate two.
:func:`compile_non_attention` compiles exactly those pieces -- every decoder layer's norms
and MLP, the final norm, the rotary embedding's cos / sin and the family's
``apply_rotary_pos_emb`` -- so each becomes one or two fused kernels, while the attention
call (the moa policy: Python around Triton launches, a per-head cache) stays eager.
Nothing compiled reads the cache, so dynamo guards on no step counter and never
recompiles per step (one graph per kind of piece serves every layer); the caller captures
the step in its CUDA graph as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moa_search import families


@dataclass(frozen=True)
class CompileSettings:
    """``torch.compile`` arguments for the compiled pieces. ``backend="aot_eager"`` traces
    without generating code (what CPU tests use); ``mode=None`` is inductor's default (no
    CUDA graphs of its own: the bench captures the whole step in one)."""

    backend: str = "inductor"
    mode: str | None = None
    dynamic: bool = False
    fullgraph: bool = True


class CompiledPieces:
    """Compiled norms / MLPs / rotary installed on a model until :meth:`remove`."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self.pieces = 0

    def _set(self, where: dict[str, Any], key: str, value: Any) -> None:
        missing = key not in where
        previous = where.get(key)

        def undo() -> None:
            if missing:
                where.pop(key, None)
            else:
                where[key] = previous

        self._undo.append(undo)
        where[key] = value
        self.pieces += 1

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.pieces = 0


def compile_callable(fn: Callable[..., Any], settings: CompileSettings) -> Callable[..., Any]:
    """``torch.compile(fn)`` with ``settings``; ``mode`` only reaches inductor (the other
    backends take none)."""
    kw: dict[str, Any] = {
        "backend": settings.backend,
        "dynamic": settings.dynamic,
        "fullgraph": settings.fullgraph,
    }
    if settings.mode is not None and settings.backend == "inductor":
        kw["mode"] = settings.mode
    return torch.compile(fn, **kw)


def compile_non_attention(
    model: torch.nn.Module, settings: CompileSettings | None = None
) -> CompiledPieces:
    """Compile the eager pieces of a decode step that do not touch attention or the cache;
    returns what :meth:`CompiledPieces.remove` undoes. Pieces a family lacks are skipped."""
    settings = settings or CompileSettings()
    pieces = CompiledPieces()
    decoder = families.decoder(model)
    try:
        for layer in getattr(decoder, "layers", []):
            for name in ("input_layernorm", "post_attention_layernorm", "mlp"):
                module = getattr(layer, name, None)
                if isinstance(module, torch.nn.Module):
                    compiled = compile_callable(module.forward, settings)
                    pieces._set(module.__dict__, "forward", compiled)
        for name in ("norm", "rotary_emb"):  # the final norm; cos / sin once per step
            module = getattr(decoder, name, None)
            if isinstance(module, torch.nn.Module):
                compiled = compile_callable(module.forward, settings)
                pieces._set(module.__dict__, "forward", compiled)
        attention = families.attention_modules(model)
        if attention:  # the modeling file's rotary helper, looked up by the module's forward
            scope = type(attention[0]).forward.__globals__
            rotary = scope.get("apply_rotary_pos_emb")
            if callable(rotary):
                pieces._set(scope, "apply_rotary_pos_emb", compile_callable(rotary, settings))
    except BaseException:
        pieces.remove()
        raise
    return pieces
