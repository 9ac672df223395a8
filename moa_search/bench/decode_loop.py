"""Decode loops for the benchmark: dense (transformers StaticCache + SDPA, optionally with
transformers' torch.compile recipe), transformers' default DynamicCache, and a plan
(MoACache preallocated to ``max_cache_len``, optionally with the non-attention work
compiled); static-shape loops make each step one CUDA-graph replay.

A step is: forward of one token per sequence (``logits_to_keep=1``), greedy argmax, the
token written to an output buffer, and the input / position buffers advanced -- all on the
device, so a replay needs no host work and no synchronisation. Order of use::

    loop = PlanLoop(model, plan, batch, max_cache_len)   # or DenseLoop(...)
    loop.allocate()          # one dummy token: caches allocate their full buffers
    loop.capture()           # warm-up + CUDA graph (no-op off CUDA); state is reset after
    loop.fill_synthetic(n)   # random K/V, every sequence at length n   -- or --
    first = loop.prefill(input_ids)
    loop.run(steps)          # tokens in loop.out_tokens[:, :steps]
    loop.close()

Caches keep their buffers for the loop's life (reset() zeroes lengths, not storage), so
the captured graph stays valid across prefill / fill / set_length.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from moa_search.bench.compiled import (
    CompiledPieces,
    CompileSettings,
    compile_callable,
    compile_non_attention,
)
from moa_search.errors import MoaSearchError
from moa_search.plan import Plan


def _randomize_layers(layers: list[Any], generator: torch.Generator) -> None:
    """Random K/V in transformers cache layers (decode speed depends on lengths only)."""
    for layer in layers:
        layer.keys.normal_(generator=generator)
        layer.values.normal_(generator=generator)


def _layers_nbytes(layers: list[Any]) -> int:
    """Bytes of K and V held by transformers cache layers."""
    return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))


def check_chunk(chunk: int | None, length: int) -> int:
    """Tokens per prefill forward: ``chunk`` (a positive int), or the whole prompt for None;
    MoaSearchError (one line) for anything else."""
    if chunk is None:
        return max(1, length)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise MoaSearchError(f"prefill chunk must be a positive number of tokens, got {chunk!r}")
    return chunk


def chunk_bounds(length: int, step: int) -> list[tuple[int, int]]:
    """[c0, c1) pieces of a prompt of ``length`` tokens, ``step`` each; a 1-token tail joins
    the piece before it, because one token would run as a decode step (SparQ heads then
    select keys, where a prompt's tokens attend densely)."""
    bounds = [(c0, min(length, c0 + step)) for c0 in range(0, length, step)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], length)]
    return bounds


class DecodeLoop:
    """Shared machinery; subclasses own the cache. ``ids``/``pos``: (B, 1) long,
    ``cache_pos``: (1,) long, ``out_tokens``: (B, capacity) long, ``step_idx``: (1,) long."""

    name = "decode"

    def __init__(
        self,
        model: Any,
        batch: int,
        max_cache_len: int,
        *,
        use_graph: bool | None = None,
        out_capacity: int | None = None,
    ):
        self.model = model
        self.batch = int(batch)
        self.max_cache_len = int(max_cache_len)
        self.device = next(model.parameters()).device
        self.use_graph = (self.device.type == "cuda") if use_graph is None else bool(use_graph)
        if self.use_graph and self.device.type != "cuda":
            raise MoaSearchError("CUDA graphs need a CUDA model")
        dev, long = self.device, torch.long
        self.ids = torch.zeros(self.batch, 1, dtype=long, device=dev)
        self.pos = torch.zeros(self.batch, 1, dtype=long, device=dev)
        self.cache_pos = torch.zeros(1, dtype=long, device=dev)
        self.step_idx = torch.zeros(1, dtype=long, device=dev)
        cap = out_capacity or self.max_cache_len
        self.out_tokens = torch.zeros(self.batch, cap, dtype=long, device=dev)
        self.cache: Any = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.length = 0  # tokens every sequence holds (host copy, set by prefill / fill)
        self.last_logits: torch.Tensor | None = None  # (B, V) after prefill

    # --- cache-specific hooks ----------------------------------------------------------
    def _new_cache(self) -> Any:
        raise NotImplementedError

    def _set_cache_length(self, n: int) -> None:
        raise NotImplementedError

    def _randomize_cache(self, generator: torch.Generator) -> None:
        raise NotImplementedError

    def kv_nbytes(self) -> int:
        raise NotImplementedError

    def predicted_kv_bytes(self) -> int:
        raise NotImplementedError

    # --- lifecycle ---------------------------------------------------------------------
    @torch.no_grad()
    def allocate(self) -> int:
        """Create the cache and its full buffers with one dummy token; returns the bytes the
        allocator gained (cache + small metadata), measured on CUDA, else ``kv_nbytes()``."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
        self.cache = self._new_cache()
        self._forward(self.ids, self.pos, self.cache_pos)
        self.cache.reset()
        if cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device) - before
        return self.kv_nbytes()

    #: False where the cache grows by concatenation (no fixed buffers: no prediction to check)
    preallocates = True

    def _step_kwargs(self, ids: torch.Tensor, pos: torch.Tensor, cache_pos: torch.Tensor):
        return dict(
            input_ids=ids,
            position_ids=pos,
            cache_position=cache_pos,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, cache_pos: torch.Tensor) -> Any:
        return self.model(**self._step_kwargs(ids, pos, cache_pos))

    def _step(self) -> None:
        logits = self._forward(self.ids, self.pos, self.cache_pos).logits
        nxt = logits[:, -1].argmax(-1)
        self.out_tokens.index_copy_(1, self.step_idx, nxt[:, None])
        self.ids.copy_(nxt[:, None])
        self.pos.add_(1)
        self.cache_pos.add_(1)
        self.step_idx.add_(1)

    @torch.no_grad()
    def capture(self, warmup: int = 2) -> None:
        """Warm up (compiles Triton kernels, creates cuBLAS handles) and capture one step in a
        CUDA graph. State (lengths, buffers) is restored, so call before prefill / fill."""
        if self.cache is None:
            self.allocate()
        if not self.use_graph:
            return
        self.set_length(1)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.set_length(1)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self.graph = graph
        self.cache.reset()
        self.set_length(0)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Run the prompt (B, L) through the cache (no padding); returns the first generated
        token (B,) and leaves the loop ready to decode the next. ``last_logits``: (B, V) of
        the prompt's last token.

        ``chunk``: feed the prompt ``chunk`` tokens at a time (None: in one piece). Why: one
        forward of a 128k prompt holds activations, MLP intermediates and attention work
        for all 128k tokens at once; in chunks the peak is set by the chunk, and each chunk
        attends to the cached prefix (``runtime.prefill.cached_prefill`` for a plan)."""
        if input_ids.shape[0] != self.batch:
            raise MoaSearchError(f"prefill: batch {input_ids.shape[0]} != loop batch {self.batch}")
        length = input_ids.shape[1]
        step = check_chunk(chunk, length)
        if self.cache is None:
            self.allocate()
        if length + 1 > self.max_cache_len:
            raise MoaSearchError(f"prompt of {length} tokens needs max_cache_len > {length}")
        self.cache.reset()
        self._set_cache_length(0)
        ids = input_ids.to(self.device)
        # chunks attend as the prompt in one forward would (spans at the prompt's length)
        whole = getattr(self.cache, "prompt", None)
        with whole(length) if whole is not None else contextlib.nullcontext():
            for c0, c1 in chunk_bounds(length, step):
                pos = torch.arange(c0, c1, device=self.device)
                out = self._forward(ids[:, c0:c1], pos[None].expand(self.batch, -1), pos)
        self.last_logits = out.logits[:, -1]
        first = self.last_logits.argmax(-1)
        self.length = length
        self._set_buffers(length, first)
        return first

    @torch.no_grad()
    def fill_synthetic(self, length: int, seed: int = 0) -> None:
        """Every sequence holds ``length`` tokens of random K/V (speed runs: no prefill)."""
        if self.cache is None:
            self.allocate()
        if length + 1 > self.max_cache_len:
            raise MoaSearchError(f"length {length} needs max_cache_len > {length}")
        gen = torch.Generator(device=self.device).manual_seed(seed)
        self._randomize_cache(gen)
        self.set_length(length)
        tokens = torch.randint(0, self._vocab(), (self.batch,), generator=gen, device=self.device)
        self.ids.copy_(tokens[:, None])

    def _vocab(self) -> int:
        return int(self.model.config.get_text_config().vocab_size)

    def set_length(self, n: int) -> None:
        """Make every sequence hold ``n`` tokens (stored entries keep their values)."""
        self._set_cache_length(n)
        self.length = n
        self._set_buffers(n, None)

    def _set_buffers(self, n: int, next_ids: torch.Tensor | None) -> None:
        if next_ids is not None:
            self.ids.copy_(next_ids.view(-1, 1))
        self.pos.fill_(n)
        self.cache_pos.fill_(n)
        self.step_idx.zero_()

    @torch.no_grad()
    def run(self, steps: int, *, graph: bool | None = None) -> float:
        """Decode ``steps`` tokens from the current state; returns seconds (device-timed on
        CUDA). Tokens land in ``out_tokens[:, :steps]``."""
        if self.length + steps > self.max_cache_len:
            raise MoaSearchError(
                f"{steps} steps from length {self.length} exceed max_cache_len {self.max_cache_len}"
            )
        if steps > self.out_tokens.shape[1]:
            raise MoaSearchError(f"{steps} steps exceed the output buffer")
        use_graph = self.graph is not None if graph is None else graph
        if use_graph and self.graph is None:
            raise MoaSearchError("run(graph=True) before capture()")
        self.step_idx.zero_()
        cuda = self.device.type == "cuda"
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(steps):
            if use_graph:
                self.graph.replay()
            else:
                self._step()
        if cuda:
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            seconds = time.perf_counter() - t0
        self._set_cache_host_length(self.length + steps)
        self.length += steps
        return seconds

    def _set_cache_host_length(self, n: int) -> None:
        """Bring host-side counters in line after graph replays (device state advanced)."""

    def step_ms(self, length: int, steps: int, *, warm: int = 4, repeats: int = 1) -> float:
        """ms per decode step from a synthetic cache at ``length``: the step captured (on
        CUDA), ``warm`` untimed steps, then the best of ``repeats`` timed runs of ``steps``,
        each from a fresh fill (what the speed benchmarks time)."""
        self.capture()  # allocates; a no-op graph-wise off CUDA
        self.fill_synthetic(length)
        self.run(warm)
        best = float("inf")
        for _ in range(repeats):
            self.fill_synthetic(length)
            best = min(best, self.run(steps) / steps * 1e3)
        return best

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, new_tokens: int, chunk: int | None = None
    ) -> torch.Tensor:
        """Greedy tokens (B, new_tokens) after the prompt: what model.generate returns
        (``chunk``: as in :meth:`prefill`)."""
        first = self.prefill(input_ids, chunk)
        if new_tokens <= 1:
            return first[:, None][:, :new_tokens]
        self.run(new_tokens - 1)
        return torch.cat([first[:, None], self.out_tokens[:, : new_tokens - 1]], 1)

    def close(self) -> None:
        self.graph = None
        self.cache = None


class DenseLoop(DecodeLoop):
    """transformers ``StaticCache`` with the model's own attention (``attn_implementation``,
    default SDPA): what a user gets from ``generate(cache_implementation="static")``.

    ``compile``: transformers' documented fast path on top, ``model.forward =
    torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)`` (here a compiled
    copy the loop calls; the model itself is left alone). That mode makes its own CUDA
    graphs, so the loop then runs without one of its own."""

    name = "dense"

    def __init__(
        self,
        model: Any,
        batch: int,
        max_cache_len: int,
        *,
        attn_implementation: str = "sdpa",
        compile: CompileSettings | None = None,
        **kwargs: Any,
    ):
        if getattr(model, "_moa_runtime", None) is not None:
            raise MoaSearchError("DenseLoop: remove the plan from the model first")
        if compile is not None and compile.mode == "reduce-overhead":
            kwargs["use_graph"] = False
        super().__init__(model, batch, max_cache_len, **kwargs)
        self._saved_impl = model.config._attn_implementation
        if attn_implementation != self._saved_impl:
            model.set_attn_implementation(attn_implementation)
        self._compile = compile
        self._compiled = compile_callable(model.forward, compile) if compile else None
        self._compiled_once = False
        #: set when fullgraph tracing failed and the loop fell back to graph breaks
        self.compile_note: str | None = None

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, cache_pos: torch.Tensor) -> Any:
        if self._compiled is None or self.cache is None or not self._static_layers():
            return super()._forward(ids, pos, cache_pos)  # the first call sizes the cache
        kwargs = self._step_kwargs(ids, pos, cache_pos)
        if self._compiled_once or not self._compile.fullgraph:
            return self._compiled(**kwargs)
        try:
            out = self._compiled(**kwargs)
        except Exception as exc:  # transformers' own generate compiles with fullgraph=False
            first = (str(exc).splitlines() or [""])[0][:120]
            self.compile_note = f"fullgraph failed ({type(exc).__name__}: {first}); graph breaks"
            torch._dynamo.reset()
            self._compile = replace(self._compile, fullgraph=False)
            self._compiled = compile_callable(self.model.forward, self._compile)
            out = self._compiled(**kwargs)
        self._compiled_once = True
        return out

    def _new_cache(self) -> Any:
        from transformers import StaticCache  # noqa: PLC0415

        return StaticCache(config=self.model.config, max_cache_len=self.max_cache_len)

    def _static_layers(self) -> list[Any]:
        return [layer for layer in self.cache.layers if getattr(layer, "is_initialized", False)]

    def _set_cache_length(self, n: int) -> None:
        for layer in self._static_layers():
            layer.cumulative_length.fill_(n)

    def _randomize_cache(self, generator: torch.Generator) -> None:
        _randomize_layers(self._static_layers(), generator)

    def kv_nbytes(self) -> int:
        return _layers_nbytes(self._static_layers())

    def predicted_kv_bytes(self) -> int:
        from moa_search.plan import dense_plan  # noqa: PLC0415

        dtype_bytes = torch.finfo(self.model.dtype).bits // 8
        return dense_plan(self.model).dense_kv_bytes(self.max_cache_len, self.batch, dtype_bytes)

    def close(self) -> None:
        super().close()
        if self.model.config._attn_implementation != self._saved_impl:
            self.model.set_attn_implementation(self._saved_impl)
        if self._compiled is not None:
            self._compiled = None
            release_compiled()


def release_compiled() -> None:
    """Drop dynamo's compiled code and inductor's CUDA-graph pools, so the memory a compiled
    config held is free for the next one."""
    torch._dynamo.reset()
    try:
        from torch._inductor import cudagraph_trees  # noqa: PLC0415

        cudagraph_trees.reset_cudagraph_trees()
    except (ImportError, AttributeError):
        pass


class DynamicLoop(DecodeLoop):
    """transformers' default: ``DynamicCache`` + SDPA, what plain ``model.generate`` runs.

    No CUDA graph (the cache grows by ``torch.cat`` every step, so shapes change) and no
    mask at decode (no padding: transformers skips it, so SDPA gets ``enable_gqa``); each
    step also grows the attention mask by a column, as generate does."""

    name = "dynamic"
    preallocates = False

    def __init__(self, model: Any, batch: int, max_cache_len: int, **kwargs: Any):
        if getattr(model, "_moa_runtime", None) is not None:
            raise MoaSearchError("DynamicLoop: remove the plan from the model first")
        kwargs["use_graph"] = False
        super().__init__(model, batch, max_cache_len, **kwargs)
        self._saved_impl = model.config._attn_implementation
        if self._saved_impl != "sdpa":
            model.set_attn_implementation("sdpa")
        self.mask = torch.ones(self.batch, 0, dtype=torch.long, device=self.device)

    def _new_cache(self) -> Any:
        from transformers import DynamicCache  # noqa: PLC0415

        return DynamicCache(config=self.model.config)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, cache_pos: torch.Tensor) -> Any:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.batch, ids.shape[1])], 1)
        return self.model(
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=pos,
            cache_position=cache_pos,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )

    def _layers(self) -> list[Any]:
        return [layer for layer in self.cache.layers if getattr(layer, "is_initialized", False)]

    def _set_cache_length(self, n: int) -> None:
        """Every layer keeps its first ``n`` tokens (zero tokens added if it holds fewer)."""
        for layer in self._layers():
            have = layer.keys.shape[2] if layer.keys.dim() == 4 else 0
            if have > n:
                layer.keys, layer.values = layer.keys[:, :, :n], layer.values[:, :, :n]
            elif have < n:
                shape = (self.batch, layer.keys.shape[1], n, layer.keys.shape[3])
                layer.keys = layer.keys.new_zeros(shape)
                layer.values = layer.values.new_zeros(shape)
        self.mask = torch.ones(self.batch, n, dtype=torch.long, device=self.device)

    def _randomize_cache(self, generator: torch.Generator) -> None:
        _randomize_layers(self._layers(), generator)

    @torch.no_grad()
    def fill_synthetic(self, length: int, seed: int = 0) -> None:
        """Every layer holds ``length`` random tokens, as after a prompt of that length."""
        if self.cache is None:
            self.allocate()
        for layer in self._layers():  # fresh tensors, so the same seed gives the same cache
            shape = (self.batch, layer.keys.shape[1], length, layer.keys.shape[3])
            layer.keys, layer.values = layer.keys.new_empty(shape), layer.values.new_empty(shape)
        super().fill_synthetic(length, seed)

    def kv_nbytes(self) -> int:
        return _layers_nbytes(self._layers())

    def predicted_kv_bytes(self) -> int:
        from moa_search.plan import dense_plan  # noqa: PLC0415

        dtype_bytes = torch.finfo(self.model.dtype).bits // 8
        layers = self._layers()
        held = layers[0].keys.shape[2] if layers and layers[0].keys.dim() == 4 else 0
        return dense_plan(self.model).dense_kv_bytes(held, self.batch, dtype_bytes)

    def close(self) -> None:
        super().close()
        if self.model.config._attn_implementation != self._saved_impl:
            self.model.set_attn_implementation(self._saved_impl)


class PlanLoop(DecodeLoop):
    """The plan through :func:`moa_search.runtime.apply_plan` with a :class:`MoACache`
    preallocated to ``max_cache_len`` (decode on CUDA: the Triton kernels)."""

    name = "plan"

    def __init__(
        self,
        model: Any,
        plan: Plan,
        batch: int,
        max_cache_len: int,
        *,
        backend: str = "auto",
        compile_settings: CompileSettings | None = None,
        **kwargs: Any,
    ):
        from moa_search.runtime import apply_plan  # noqa: PLC0415

        super().__init__(model, batch, max_cache_len, **kwargs)
        self.plan = plan
        self.runtime = apply_plan(model, plan, backend=backend, max_cache_len=max_cache_len)
        self.compiled: CompiledPieces | None = None
        if compile_settings is not None:
            try:
                self.compiled = compile_non_attention(model, compile_settings)
            except BaseException:
                self.runtime.remove()
                raise

    def _new_cache(self) -> Any:
        return self.runtime.new_cache(self.max_cache_len)

    def _set_cache_length(self, n: int) -> None:
        for layer in self.cache.layers:
            if layer.lengths is not None:
                layer.lengths.fill_(n)
            layer.processed = n
            layer.contiguous = True

    def _set_cache_host_length(self, n: int) -> None:
        for layer in self.cache.layers:
            layer.processed = n

    def _randomize_cache(self, generator: torch.Generator) -> None:
        for layer in self.cache.layers:
            layer.keys.normal_(generator=generator)
            layer.values.normal_(generator=generator)
            if layer.v_sum is not None:
                layer.v_sum.normal_(generator=generator)
                layer.sync_side()  # SparQ scores the side buffer: it must hold these keys

    def kv_nbytes(self) -> int:
        return self.cache.nbytes()

    def predicted_kv_bytes(self) -> int:
        dtype_bytes = torch.finfo(self.model.dtype).bits // 8
        return self.plan.kv_bytes(self.max_cache_len, self.batch, dtype_bytes)

    def close(self) -> None:
        super().close()
        if self.compiled is not None:
            self.compiled.remove()
            self.compiled = None
            release_compiled()
        self.runtime.remove()


class _PassLayer(CacheLayerMixin):
    """A cache layer that stores nothing: ``update`` hands the new K/V straight to the
    attention policy, whose peer keeps its own cache."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, owner: PassCache):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.owner.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.owner.length = 0


class PassCache(Cache):
    """transformers Cache of :class:`_PassLayer`; ``length``: tokens held (host copy)."""

    def __init__(self, num_layers: int):
        self.length = 0
        super().__init__(layers=[_PassLayer(self) for _ in range(num_layers)])


def _peer_attention(call: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    return call.state.peer.forward(call.layer, query, key, value)


class PeerLoop(DecodeLoop):
    """Our decode step with another library's attention and KV cache (a *peer*, e.g.
    :mod:`moa_search.bench.flashinfer_peer`): the model's projections, norms, rotary and
    MLPs run exactly as in the other loops, and each layer's attention call goes to
    ``peer.forward(layer, q, k, v)``, which stores the new K/V in the peer's own cache at
    the loop's ``pos`` buffer (advanced on the device, so a step stays one graph replay)
    and attends. ``make_peer(model, batch, max_cache_len, positions)`` builds the peer in
    :meth:`allocate`, so its cache and workspaces count in the measured allocation."""

    name = "peer"

    def __init__(self, model: Any, make_peer: Any, batch: int, max_cache_len: int, **kwargs):
        from moa_search.takeover import attention_policy  # noqa: PLC0415

        if getattr(model, "_moa_runtime", None) is not None:
            raise MoaSearchError("PeerLoop: remove the plan from the model first")
        super().__init__(model, batch, max_cache_len, **kwargs)
        self._make_peer = make_peer
        self.peer: Any = None
        self._capture_note = ""
        self._policy = attention_policy(model, "moa-peer", _peer_attention, state=self)
        self._policy.install()

    @property
    def note(self) -> str:
        """What the bench row says about the peer (library, version, backend, choices)."""
        peer = getattr(self.peer, "note", "") if self.peer is not None else ""
        return "; ".join(n for n in (peer, self._capture_note) if n)

    @torch.no_grad()
    def capture(self, warmup: int = 2) -> None:
        """As :meth:`DecodeLoop.capture`; if the peer's kernels cannot be captured (say a
        library launching on a stream of its own), the loop decodes eagerly and says so."""
        try:
            super().capture(warmup)
        except Exception as exc:
            if not self.use_graph:
                raise
            torch.cuda.synchronize(self.device)
            self.graph, self.use_graph = None, False
            self.cache.reset()
            self.set_length(0)
            first = (str(exc).splitlines() or [""])[0][:120]
            self._capture_note = f"eager: CUDA-graph capture failed ({type(exc).__name__}: {first})"

    def _new_cache(self) -> Any:
        from moa_search import families  # noqa: PLC0415

        if self.peer is None:
            self.peer = self._make_peer(self.model, self.batch, self.max_cache_len, self.pos)
        return PassCache(len(families.attention_modules(self.model)))

    def _set_cache_length(self, n: int) -> None:
        self.peer.set_length(n)
        if self.cache is not None:
            self.cache.length = n

    def _set_cache_host_length(self, n: int) -> None:
        self._set_cache_length(n)

    def _randomize_cache(self, generator: torch.Generator) -> None:
        self.peer.randomize(generator)

    def kv_nbytes(self) -> int:
        return self.peer.nbytes()

    def predicted_kv_bytes(self) -> int:
        return self.peer.predicted_nbytes()

    def close(self) -> None:
        super().close()
        self._policy.remove()
        if self.peer is not None:
            self.peer.close()
            self.peer = None
