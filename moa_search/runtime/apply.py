"""apply_plan / remove_plan: run a transformers causal LM with a plan, reversibly."""

from __future__ import annotations

import inspect
import os
from types import ModuleType
from typing import Any, Literal

import torch
from transformers.cache_utils import DynamicCache

from moa_search import families
from moa_search.errors import MoaSearchError
from moa_search.plan import Plan, validate
from moa_search.runtime import attention
from moa_search.runtime.cache import MoACache, MoALayerCache
from moa_search.takeover import attention_policy, padding_mask

SUPPORTED_MODEL_TYPES = families.SUPPORTED_MODEL_TYPES
Backend = Literal["auto", "reference", "triton"]
_ALREADY_APPLIED = (
    "model already runs a plan: call remove_plan(model) (or leave its `with apply_plan(...)` "
    "block) before applying another"
)


class PlanRuntime:
    """State shared by the attention modules of one model while a plan is applied.

    Use as a context manager or call :meth:`remove`. ``backend="auto"`` decodes with the
    Triton kernels on CUDA tensors and with the PyTorch reference elsewhere.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        plan: Plan,
        backend: Backend = "auto",
        max_cache_len: int | None = None,
    ):
        self.model = model
        self.plan = plan
        self.backend = backend
        self.max_cache_len = max_cache_len
        #: the cache of the forward being run, set by the pre-hook. Patterned attention
        #: reads its MoACache from ``update``'s CacheRead; this is read only for a user's
        #: own DynamicCache (how many tokens its sliding layers dropped)
        self.active_cache: Any = None
        _check_layers(model, plan)
        #: per layer, the model's own sliding window (None: full causal attention); every
        #: head's pattern is clamped to it, so a plan never attends further than the model
        self.windows: list[int | None] = list(families.layer_windows(model.config))
        self._signature = inspect.signature(families.decoder(model).forward)
        self._kernels: Any = None
        self._policy = attention_policy(
            model, attention.ATTN_NAME, attention.moa_attention, mask=padding_mask, state=self,
            pre_hook=self._before_forward, generate=self._generate,
        )  # fmt: skip

    # --- lifecycle ----------------------------------------------------------------
    @property
    def installed(self) -> bool:
        """True while this runtime drives the model (between install and remove)."""
        return self._policy.installed

    def install(self) -> PlanRuntime:
        current = self.model.__dict__.get("_moa_runtime")
        if current is self:
            raise MoaSearchError("this plan runtime is already installed on its model")
        if current is not None:
            raise MoaSearchError(_ALREADY_APPLIED)
        self._policy.install()
        self.model._moa_runtime = self
        return self

    def _generate(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        """``model.generate`` with a fresh per-head cache unless the caller passes one.

        ``cache_implementation="dynamic"`` is honoured (a full DynamicCache, each head's
        pattern applied as a mask); any other cache implementation is refused, because the
        plan's heads cannot read a static / quantized / offloaded cache."""
        impl = kwargs.get("cache_implementation")
        if impl is None:
            config = kwargs.get("generation_config") or getattr(
                self.model, "generation_config", None
            )
            impl = getattr(config, "cache_implementation", None)
        if impl is not None and impl != "dynamic":
            raise MoaSearchError(
                f"cache_implementation={impl!r}: a plan runs with its own per-head cache "
                "(MoACache, made automatically) or 'dynamic'; leave cache_implementation "
                "unset or pass 'dynamic'"
            )
        if impl is None and kwargs.get("past_key_values") is None and kwargs.get("use_cache", True):
            kwargs["past_key_values"] = self.new_cache()
        return original(*args, **kwargs)

    def remove(self) -> None:
        """Restore the model's own attention; caches made under the plan stop being valid.

        Idempotent, and a no-op for a runtime that no longer drives the model (for example
        the outer ``with apply_plan(...)`` after ``remove_plan`` inside the block)."""
        if not self._policy.installed:
            return
        self._policy.remove()
        if self.model.__dict__.get("_moa_runtime") is self:
            del self.model.__dict__["_moa_runtime"]
        self.active_cache = None

    def __enter__(self) -> PlanRuntime:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def new_cache(self, max_cache_len: int | None = None) -> MoACache:
        """A fresh per-head cache; pass it as ``past_key_values`` or let generate make one."""
        return MoACache(self.plan, max_cache_len or self.max_cache_len, self.windows)

    # --- forward pre-hook -----------------------------------------------------------
    def _before_forward(self, module, args, kwargs):
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        cache = bound.get("past_key_values")
        use_cache = bound.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.model.config, "use_cache", True) and not self.model.training
        if cache is not None and type(cache) not in (MoACache, DynamicCache):
            # Static / quantized / offloaded caches hold padded or transformed keys that the
            # per-head patterns cannot interpret: refuse instead of attending to empty slots.
            raise MoaSearchError(
                f"past_key_values: a plan runs with MoACache (made automatically) or "
                f"DynamicCache, got {type(cache).__name__}"
            )
        # Only a call with no cache gets a MoACache here; a user's own DynamicCache is kept
        # (full KV, patterns applied as masks) because the caller will pass it again.
        if not (use_cache and cache is None):
            self.active_cache = cache
            return None
        self.active_cache = cache = self.new_cache()
        index = _arg_index(self._signature, "past_key_values")
        if index < len(args):
            args = (*args[:index], cache, *args[index + 1 :])
        else:
            kwargs = {**kwargs, "past_key_values": cache}
        return args, kwargs

    # --- decode dispatch ------------------------------------------------------------
    def use_kernels(
        self,
        query: torch.Tensor,
        q_len: int,
        layer: MoALayerCache | None = None,
        window: int | None = None,
        softcap: float | None = None,
    ) -> bool:
        """Decode this step with the Triton kernels? The mixed kernel knows the model's
        window and logit cap; the SparQ pipeline knows neither, so a layer with SparQ heads
        and a window or cap decodes with the reference."""
        if q_len != 1 or self.backend == "reference" or not query.is_cuda:
            return False
        if layer is not None and layer.sparq_heads and (window is not None or softcap):
            return False
        if self._kernels is None:
            try:
                from moa_search import kernels  # noqa: PLC0415 - optional, needs triton
            except ImportError as exc:
                if self.backend == "triton":
                    raise MoaSearchError(
                        f"backend 'triton' requested but unavailable: {exc}"
                    ) from None
                self._kernels = False
                return False
            self._kernels = kernels
        return bool(self._kernels)

    @property
    def kernels(self) -> ModuleType:
        """The Triton kernels module (after :meth:`use_kernels` said yes)."""
        if not self._kernels:
            raise MoaSearchError("decode kernels are not loaded (use_kernels said no)")
        return self._kernels


def apply_plan(
    model: torch.nn.Module,
    plan_or_path: Plan | str | os.PathLike[str],
    *,
    backend: Backend = "auto",
    max_cache_len: int | None = None,
) -> PlanRuntime:
    """Run ``model`` with ``plan`` until :func:`remove_plan` (or the context manager exits).

    ``model.generate`` and plain forward calls with ``use_cache`` get a :class:`MoACache`
    automatically, so window/elastic heads really store fewer entries. A model runs one plan
    at a time: applying another while one is applied is refused (remove it first).
    """
    families.check_supported(model.config)
    if backend not in ("auto", "reference", "triton"):
        raise MoaSearchError(f"backend must be auto, reference or triton, got {backend!r}")
    if getattr(model, "_moa_runtime", None) is not None:
        raise MoaSearchError(_ALREADY_APPLIED)
    plan = validate(plan_or_path, model)
    return PlanRuntime(model, plan, backend, max_cache_len).install()


def remove_plan(model: torch.nn.Module) -> None:
    """Undo :func:`apply_plan` (no-op when no plan is applied)."""
    runtime = getattr(model, "_moa_runtime", None)
    if runtime is not None:
        runtime.remove()


def _check_layers(model: torch.nn.Module, plan: Plan) -> None:
    found = len(families.attention_modules(model))
    if found != plan.model.num_layers:
        raise MoaSearchError(
            f"found {found} attention modules, plan has {plan.model.num_layers} layers"
        )


def _arg_index(signature: inspect.Signature, name: str) -> int:
    return list(signature.parameters).index(name) if name in signature.parameters else 10**6
