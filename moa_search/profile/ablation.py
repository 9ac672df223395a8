"""Measured effect of changing attention heads: run the changed model, compare to dense.

Why measure: a first-order estimate is taken where the dense model is confident (a passkey
answer has NLL ~0.35), so dL/dA is near zero on exactly the heads the answer depends on.
Running the model with the change and comparing its next-token distributions with the
dense model's (KL per scored token) has no such blind spot.

Why it is cheap enough: the hidden states entering layer ``l`` do not depend on changes at
layer ``l`` or later, so every ablation at layer ``l`` starts from the cached state of the
base run at ``l``; all ablations of one layer are rows of one batch; and layer ``l``'s
changed attention is computed once per (KV head, pattern), since its inputs are the same
for every row.

Two fidelities:

- ``"exact"``: later layers are recomputed at every position (the real effect).
- ``"scored"``: later layers are recomputed only at the scored positions; every other
  position keeps the keys / values of the base run. Much cheaper when few tokens are
  scored (retrieval answers), but blind to effects that travel through other positions'
  keys and values; its agreement with ``"exact"`` is measured, not assumed.

A *base* plan may replace dense as the starting point (the refinement step re-measures
heads with the current plan in place); the reference distribution is always the dense
model's. SparQ heads are measured as their decode step would run at every position
(teacher forcing), as the profiler's validation does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from moa_search import families
from moa_search.errors import MoaSearchError
from moa_search.patterns import Dense, Pattern, SparQ
from moa_search.profile.sparq_estimate import sparq_prefill, visible
from moa_search.runtime.prefill import fresh_prefill
from moa_search.runtime.reference import attend_head
from moa_search.runtime.scores import Logits, cap_logits
from moa_search.takeover import Call, attention_policy

ATTN_NAME = "moa_measure"
FIDELITIES = ("exact", "scored")
#: text samples score every token; the divergence is read at this many evenly spaced
#: positions (the lm_head over a 49k vocabulary costs ~8 layers of the default model)
DEFAULT_MAX_SCORED = 128


@dataclass(frozen=True)
class Ablation:
    """One KV head of one layer switched to ``pattern`` (everything else as the base)."""

    layer: int
    kv_head: int
    pattern: Pattern


@dataclass
class Scored:
    """Where a sample is scored. positions: (S,) query positions whose next token is a
    target; targets: (S,) those next tokens."""

    positions: torch.Tensor
    targets: torch.Tensor
    #: (S,) bool: targets an exact answer must reproduce (end-of-turn tokens left out: the
    #: answer is the same whether the model then stops, adds a period or a newline)
    content: torch.Tensor | None = None

    @classmethod
    def from_mask(
        cls,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor,
        limit: int,
        stop_ids: Sequence[int] = (),
    ) -> Scored:
        """loss_mask[i] marks token i as a target (predicted at position i - 1)."""
        tgt = torch.nonzero(loss_mask.bool()[1:], as_tuple=False)[:, 0] + 1
        if tgt.numel() == 0:
            raise MoaSearchError("calibration sample has no scored token (empty loss mask)")
        if limit and tgt.numel() > limit:
            pick = torch.linspace(0, tgt.numel() - 1, limit).round().long()
            tgt = tgt[pick.unique()]
        targets = input_ids[tgt]
        content = ~torch.isin(
            targets, torch.tensor(list(stop_ids), dtype=targets.dtype).to(targets.device)
        )
        if not content.any():
            content = torch.ones_like(content)
        return cls(positions=tgt - 1, targets=targets, content=content)

    def matches(self, logp: torch.Tensor) -> torch.Tensor:
        """(R, S, V) log-probs -> (R,) bool: the argmax reproduces every content target."""
        hit = logp.argmax(-1) == self.targets[None]
        if self.content is not None:
            hit = hit | ~self.content[None]
        return hit.all(-1)


@dataclass
class _LayerState:
    """What the measuring attention needs for one call of one layer."""

    patterns: list[Pattern]
    rows: list[tuple[int, Pattern] | None] | None = None  # per batch row override
    frozen: tuple | None = None  # base k, base v, scored positions, mask cache
    capture: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class _Native:
    """What the model's own attention adds at this layer: its sliding window, logit cap."""

    window: int | None = None
    softcap: float | None = None


def _group(h: int, group: int) -> slice:
    return slice(h * group, (h + 1) * group)


def _full(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    patterns: Sequence[Pattern],
    scale,
    native: _Native = _Native(),
) -> torch.Tensor:
    """(B, Hq, N, D) attention of an unpadded prompt, each KV head under its pattern (inside
    the model's own window, with its logit cap, as the runtime runs it)."""
    w, cap = native.window, native.softcap
    out = fresh_prefill(query, key, value, list(patterns), Logits(scale, cap), window=w)
    group = query.shape[1] // key.shape[1]
    for h, p in enumerate(patterns):
        if isinstance(p, SparQ):  # every batch row at once: one row each is launch-bound
            sl = _group(h, group)
            y = sparq_prefill(query[:, sl], key[:, h], value[:, h], p, scale, window=w, softcap=cap)
            out[:, sl] = y.to(out.dtype)
    return out


def _one_head_full(
    query, key, value, h: int, pattern: Pattern, scale, native: _Native = _Native()
) -> torch.Tensor:
    """(1, G, N, D): one KV group of batch row 0 under ``pattern``."""
    group = query.shape[1] // key.shape[1]
    sl = _group(h, group)
    return _full(query[:1, sl], key[:1, h : h + 1], value[:1, h : h + 1], [pattern], scale, native)


def _scored_sparq(
    q, k, v, positions: torch.Tensor, pattern: SparQ, scale, native: _Native = _Native()
) -> torch.Tensor:
    """q: (R, G, S, D) at ``positions``; k, v: (R, N, D) full. Returns (R, G, S, D)."""
    rows, _, s, _ = q.shape
    n = k.shape[1]
    k_pos = torch.arange(n, device=q.device)
    out = torch.empty_like(q)
    for i in range(s):  # SparQ decodes each scored position over the keys seen so far
        ok = visible(positions[i : i + 1], n, native.window)[0]
        seen = torch.where(ok, k_pos, torch.full_like(k_pos, -1))
        out[:, :, i : i + 1] = attend_head(
            q[:, :, i : i + 1], k, v, positions[i : i + 1][None].expand(rows, 1),
            seen[None].expand(rows, n), pattern, Logits(scale, native.softcap),
        )  # fmt: skip
    return out


def _scored_masks(
    pattern: Pattern, positions: torch.Tensor, n: int, window: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive masks of scored queries over (base keys, the scored positions' own keys):
    a base key at a scored position is replaced by that position's recomputed key."""
    dev = positions.device
    k_pos = torch.arange(n, device=dev)
    base_ok = pattern.allowed(positions, k_pos, n) & visible(positions, n, window)
    base_ok[:, positions] = False
    own_ok = pattern.allowed(positions, positions, n)  # spans at the sample's length
    if window is not None:
        own_ok &= (positions[:, None] - positions[None, :]) < window
    zero = torch.zeros((), device=dev)
    neg = torch.full((), float("-inf"), device=dev)
    return torch.where(base_ok, zero, neg), torch.where(own_ok, zero, neg)


def _scored_static(q, k_base, v_base, k_new, v_new, masks, scale, softcap=None) -> torch.Tensor:
    """q: (R, G, S, D); k_base, v_base: (N, D) shared by every row; k_new, v_new: (R, S, D)
    the rows' own keys at the scored positions. Softmax over both key sets, no copies."""
    base_mask, own_mask = masks
    qf = q.float()
    s_base = cap_logits(torch.einsum("rgsd,nd->rgsn", qf, k_base.float()) * scale, softcap)
    s_own = cap_logits(torch.einsum("rgsd,rtd->rgst", qf, k_new.float()) * scale, softcap)
    s_base, s_own = s_base + base_mask, s_own + own_mask
    top = torch.maximum(s_base.amax(-1, keepdim=True), s_own.amax(-1, keepdim=True))
    p_base, p_own = (s_base - top).exp(), (s_own - top).exp()
    norm = p_base.sum(-1, keepdim=True) + p_own.sum(-1, keepdim=True)
    y = torch.einsum("rgsn,nd->rgsd", p_base, v_base.float())
    y += torch.einsum("rgst,rtd->rgsd", p_own, v_new.float())
    return y / norm


def _measure_attention(
    call: Call, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """query: (R, Hq, L, D); key/value: (R, Hkv, L, D). Returns (R, Hq, L, D).

    ``call.state``: layer index -> the :class:`_LayerState` of the layer being run."""
    st: _LayerState = call.state[call.layer]
    scale = call.scale
    native = _Native(call.window, call.softcap)
    rows, q_heads = query.shape[:2]
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    if st.capture is not None:
        st.capture["k"], st.capture["v"] = key[:1], value[:1]
    if st.frozen is None:
        if st.rows is None:
            out = _full(query, key, value, st.patterns, scale, native)
        else:  # every row has the same inputs here: attend once per distinct change
            base = _full(query[:1], key[:1], value[:1], st.patterns, scale, native)
            out = base.expand(rows, -1, -1, -1).clone()
            done: dict[tuple[int, str], torch.Tensor] = {}
            for r, change in enumerate(st.rows):
                if change is None:
                    continue
                h, p = change
                if (h, p.spec()) not in done:
                    done[(h, p.spec())] = _one_head_full(query, key, value, h, p, scale, native)[0]
                out[r, _group(h, group)] = done[(h, p.spec())]
    else:
        k_base, v_base, positions, masks = st.frozen
        out = torch.empty_like(query)
        for h in range(kv_heads):
            per_row = [
                st.rows[r][1]
                if st.rows is not None and st.rows[r] is not None and st.rows[r][0] == h
                else st.patterns[h]
                for r in range(rows)
            ]
            sl = _group(h, group)
            for spec in dict.fromkeys(p.spec() for p in per_row):
                idx = [r for r, p in enumerate(per_row) if p.spec() == spec]
                pat = next(p for p in per_row if p.spec() == spec)
                sel = torch.tensor(idx, device=query.device) if len(idx) < rows else slice(None)
                q, k_new, v_new = query[sel][:, sl], key[sel][:, h], value[sel][:, h]
                if isinstance(pat, SparQ):
                    k_all = k_base[0, h].expand(q.shape[0], -1, -1).clone()
                    v_all = v_base[0, h].expand(q.shape[0], -1, -1).clone()
                    k_all[:, positions] = k_new.to(k_all.dtype)
                    v_all[:, positions] = v_new.to(v_all.dtype)
                    y = _scored_sparq(q, k_all, v_all, positions, pat, scale, native)
                else:
                    key_ = (spec, native.window)
                    mask = masks.get(key_)
                    if mask is None:
                        mask = masks[key_] = _scored_masks(
                            pat, positions, k_base.shape[2], native.window
                        )
                    y = _scored_static(
                        q, k_base[0, h], v_base[0, h], k_new, v_new, mask, scale, native.softcap
                    )
                out[sel, sl] = y.to(out.dtype)
    return out


def _decoder(model: torch.nn.Module) -> tuple[Any, Any, Any]:
    """(embeddings, decoder layers, final norm) of a supported model; RoPE per layer comes
    from :func:`moa_search.families.rotary` (Gemma 3 has local and global RoPE)."""
    base = families.decoder(model)
    return base.embed_tokens, base.layers, base.norm


@contextmanager
def measuring(model: torch.nn.Module) -> Iterator[dict[int, _LayerState]]:
    """Switch ``model`` to the measuring attention; restore on exit. Yields the states the
    attention reads, by layer: whoever runs a layer puts its :class:`_LayerState` there."""
    states: dict[int, _LayerState] = {}
    with attention_policy(model, ATTN_NAME, _measure_attention, state=states):
        yield states


@dataclass
class BaseRun:
    """One sample under the base plan: the states every ablation starts from."""

    input_ids: torch.Tensor
    scored: Scored
    ref_logp: torch.Tensor  # (S, V) float32, dense model
    ref_nll: torch.Tensor  # (S,)
    ref_match: bool  # dense argmax equals every target
    base_logp: torch.Tensor  # (S, V) float32, under the base plan
    hidden: list[torch.Tensor]  # entering each layer: (1, N, D) exact, (1, S, D) scored
    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # scored only
    base_patterns: list[list[Pattern]] = field(default_factory=list)
    masks: dict[str, Any] = field(default_factory=dict)  # scored masks by pattern spec


@dataclass
class Effect:
    """Per ablation row: mean KL(dense || changed) and NLL change per scored token, and
    whether the changed model's argmax still equals every target."""

    kl: torch.Tensor
    dnll: torch.Tensor
    match: torch.Tensor


class AblationEngine:
    """Measures many head changes of one model against its dense self, sample by sample."""

    def __init__(
        self,
        model: torch.nn.Module,
        fidelity: str = "exact",
        row_batch: int = 32,
        max_scored: int = DEFAULT_MAX_SCORED,
    ):
        if fidelity not in FIDELITIES:
            raise MoaSearchError(
                f"fidelity: expected one of {', '.join(FIDELITIES)}, got {fidelity!r}"
            )
        if row_batch < 1:
            raise MoaSearchError(f"row_batch: expected a positive integer, got {row_batch}")
        self.model = model
        self.fidelity = fidelity
        self.row_batch = row_batch
        self.max_scored = max_scored
        self.embed, self.layers, self.norm = _decoder(model)
        self.head = model.get_output_embeddings()
        cfg = model.config
        self.num_kv = int(cfg.num_key_value_heads)
        self.device = self.embed.weight.device
        eos = getattr(cfg, "eos_token_id", None)
        self.stop_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])
                         if e is not None]  # fmt: skip

    # --- layer stepping -----------------------------------------------------------
    def _layer(self, states, i: int, h: torch.Tensor, positions: torch.Tensor, st: _LayerState):
        states[i] = st
        try:
            return self.layers[i](
                h, attention_mask=None, position_ids=positions[None],
                position_embeddings=families.rotary(self.model, h, positions, i), use_cache=False,
            )  # fmt: skip
        finally:
            del states[i]

    def _logp(self, h: torch.Tensor) -> torch.Tensor:
        """(R, S, D) final hidden at scored positions -> (R, S, V) float32 log-probs."""
        logits = families.final_logits(self.model, self.head(self.norm(h)).float())
        return F.log_softmax(logits, dim=-1)

    # --- base run -----------------------------------------------------------------
    @torch.no_grad()
    def prepare(
        self,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor,
        base: Sequence[Sequence[Pattern]] | None = None,
        reference: BaseRun | None = None,
    ) -> BaseRun:
        """Run the sample under ``base`` (None: dense) at batch 1 and keep what sweeps need.

        ``reference``: an earlier dense run of the same sample, whose log-probs are reused.
        """
        n_layers = len(self.layers)
        dense = [[Dense()] * self.num_kv for _ in range(n_layers)]
        base_p = [list(row) for row in base] if base is not None else dense
        ids = input_ids.to(self.device)
        scored = Scored.from_mask(ids, loss_mask.to(self.device), self.max_scored, self.stop_ids)
        full_pos = torch.arange(ids.shape[0], device=self.device)
        with measuring(self.model) as states:
            hidden, kv = [], []
            h = self.embed(ids[None])
            for i in range(n_layers):
                hidden.append(h if self.fidelity == "exact" else h[:, scored.positions])
                cap: dict[str, torch.Tensor] = {}
                h = self._layer(states, i, h, full_pos, _LayerState(base_p[i], capture=cap))
                if self.fidelity == "scored":
                    kv.append((cap["k"], cap["v"]))
            logp = self._logp(h[:, scored.positions])[0]
        if reference is None:
            if base is not None:
                reference = self.prepare(input_ids, loss_mask, None)
            else:
                ref_logp = logp
        if reference is not None:
            ref_logp = reference.ref_logp
        nll = -ref_logp.gather(-1, scored.targets[:, None])[:, 0]
        match = bool(scored.matches(ref_logp[None])[0])
        return BaseRun(ids, scored, ref_logp, nll, match, logp, hidden, kv, base_p)

    @torch.no_grad()
    def plan_logp(
        self,
        input_ids: Sequence[torch.Tensor],
        scored: Sequence[Scored],
        base: Sequence[Sequence[Pattern]],
    ) -> list[torch.Tensor]:
        """Each sample's (S, V) float32 log-probs at its scored positions under the whole
        plan ``base``, run exactly. Samples of one length run as rows of one batch,
        ``row_batch`` at a time: a whole-plan check at batch 1 is launch-bound on a GPU."""
        base_p = [list(row) for row in base]
        out: list[torch.Tensor | None] = [None] * len(input_ids)
        by_length: dict[int, list[int]] = {}
        for j, ids in enumerate(input_ids):
            by_length.setdefault(int(ids.shape[0]), []).append(j)
        for length, idx in by_length.items():
            pos = torch.arange(length, device=self.device)
            for c0 in range(0, len(idx), self.row_batch):
                chunk = idx[c0 : c0 + self.row_batch]
                h = self.embed(torch.stack([input_ids[j].to(self.device) for j in chunk]))
                with measuring(self.model) as states:
                    for i, patterns in enumerate(base_p):
                        h = self._layer(states, i, h, pos, _LayerState(patterns))
                for r, j in enumerate(chunk):
                    out[j] = self._logp(h[r : r + 1, scored[j].positions])[0]
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def references(
        self, input_ids: Sequence[torch.Tensor], loss_masks: Sequence[torch.Tensor]
    ) -> list[BaseRun]:
        """Dense runs of many samples, batched, keeping only what comparisons need (the
        reference log-probs): what a whole-plan check compares against."""
        dense = [[Dense()] * self.num_kv for _ in range(len(self.layers))]
        ids = [x.to(self.device) for x in input_ids]
        scored = [
            Scored.from_mask(x, m.to(self.device), self.max_scored, self.stop_ids)
            for x, m in zip(ids, loss_masks, strict=True)
        ]
        runs = []
        for x, sc, logp in zip(ids, scored, self.plan_logp(ids, scored, dense), strict=True):
            nll = -logp.gather(-1, sc.targets[:, None])[:, 0]
            match = bool(sc.matches(logp[None])[0])
            runs.append(BaseRun(x, sc, logp, nll, match, logp, [], [], dense))
        return runs

    # --- sweeps -------------------------------------------------------------------
    @torch.no_grad()
    def effects(self, run: BaseRun, ablations: Sequence[Ablation | None]) -> Effect:
        """Measure each ablation (None: the base itself) on one prepared sample."""
        kl, dnll, match = [], [], []
        by_layer: dict[int, list[int]] = {}
        for j, a in enumerate(ablations):
            by_layer.setdefault(a.layer if a is not None else len(self.layers), []).append(j)
        results: dict[int, tuple[float, float, bool]] = {}
        with measuring(self.model) as states:
            if self.fidelity == "scored":  # few tokens per row: one pass over the layers
                order = [j for _, idx in sorted(by_layer.items()) for j in idx]
                h = self._wavefront(states, run, [ablations[j] for j in order])
                for c0 in range(0, len(order), self.row_batch):
                    chunk = order[c0 : c0 + self.row_batch]
                    part = h[c0 : c0 + self.row_batch]
                    base = [c0 + i for i, j in enumerate(chunk) if ablations[j] is None]
                    logp = self._logp(part)
                    if base:
                        logp[[b - c0 for b in base]] = run.base_logp
                    for j, kj, dj, mj in zip(chunk, *self.compare(run, logp), strict=True):
                        results[j] = (kj, dj, mj)
                by_layer = {}
            for layer, idx in sorted(by_layer.items()):
                for c0 in range(0, len(idx), self.row_batch):
                    chunk = idx[c0 : c0 + self.row_batch]
                    rows = [ablations[j] for j in chunk]
                    logp = self._rows(states, run, layer, rows)
                    k, d, m = self.compare(run, logp)
                    for j, kj, dj, mj in zip(chunk, k, d, m, strict=True):
                        results[j] = (kj, dj, mj)
        for j in range(len(ablations)):
            kl.append(results[j][0])
            dnll.append(results[j][1])
            match.append(results[j][2])
        return Effect(torch.tensor(kl), torch.tensor(dnll), torch.tensor(match))

    def _wavefront(self, states, run: BaseRun, rows: list[Ablation | None]) -> torch.Tensor:
        """Scored fidelity: every row (sorted by layer) in one pass over the layers. A row
        joins at its own layer (before it, it equals the base run); the matmuls see all
        rows' scored tokens at once instead of one layer's rows at a time."""
        n_layers = len(self.layers)
        dim = run.hidden[0].shape[-1]
        h = run.hidden[0].new_zeros((0, run.hidden[0].shape[1], dim))
        for i in range(n_layers):
            new = [a for a in rows if a is not None and a.layer == i]
            if new:
                h = torch.cat([h, run.hidden[i].expand(len(new), -1, -1)], 0)
            if not len(h):
                continue
            active = [a for a in rows if a is not None and a.layer <= i]
            changes = [(a.kv_head, a.pattern) if a.layer == i else None for a in active]
            st = _LayerState(run.base_patterns[i], rows=changes if new else None)
            h = self._step(states, run, i, h, st)
        rest = sum(a is None for a in rows)  # the base itself: filled in by the caller
        return torch.cat([h, h.new_zeros((rest, *h.shape[1:]))], 0) if rest else h

    def _rows(self, states, run: BaseRun, layer: int, rows: list[Ablation | None]):
        n_layers = len(self.layers)
        r = len(rows)
        if layer >= n_layers:  # the base itself
            return run.base_logp[None].expand(r, -1, -1)
        h = run.hidden[layer].expand(r, -1, -1)
        changes = [(a.kv_head, a.pattern) if a is not None else None for a in rows]
        for i in range(layer, n_layers):
            st = _LayerState(run.base_patterns[i], rows=changes if i == layer else None)
            h = self._step(states, run, i, h, st)
        return self._logp(self._at_scored(run, h))

    def _step(self, states, run: BaseRun, i: int, h, st: _LayerState):
        if self.fidelity == "exact":
            pos = torch.arange(h.shape[1], device=h.device)
        else:
            pos = run.scored.positions
            st.frozen = (run.kv[i][0], run.kv[i][1], pos, run.masks)
        return self._layer(states, i, h, pos, st)

    def _at_scored(self, run: BaseRun, h: torch.Tensor) -> torch.Tensor:
        return h[:, run.scored.positions] if self.fidelity == "exact" else h

    @staticmethod
    def compare(run: BaseRun, logp: torch.Tensor) -> tuple[list, list, list]:
        """(R, S, V) log-probs of R changed runs -> per row: mean KL(dense || changed) and
        NLL change per scored token, and whether every answer token is reproduced."""
        ref = run.ref_logp[None]
        kl = (ref.exp() * (ref - logp)).sum(-1).clamp_min(0).mean(-1)
        nll = -logp.gather(-1, run.scored.targets[None, :, None].expand(logp.shape[0], -1, 1))
        dnll = (nll[..., 0] - run.ref_nll[None]).mean(-1)
        return kl.tolist(), dnll.tolist(), run.scored.matches(logp).tolist()
