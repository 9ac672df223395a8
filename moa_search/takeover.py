"""Install a per-head attention policy on a transformers model, and take it off again.

The one place that takes over a model's attention (the runtime's plan, the gradient
profiler, the validation and the measured profiler all go through it). Every supported
family's attention module calls ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
after its own projections, norms and RoPE, and builds its mask through
``ALL_MASK_ATTENTION_FUNCTIONS`` under the same name. A policy is a function of
``(call, query, key, value)`` returning ``(B, Hq, L, D)``; :class:`AttentionPolicy`
registers it under ``name``, points every config of the model at that name, hands each
attention module the policy's ``state`` and, optionally, adds a forward pre-hook on the
decoder and wraps ``model.generate``. Everything it changes is recorded as an undo step
before it is changed, so :meth:`AttentionPolicy.remove` (also after a failure half-way,
and on leaving the ``with`` block through an exception) puts back exactly what was there.
Policies nest: an inner one is undone to the outer one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from moa_search import families
from moa_search.errors import MoaSearchError

_ATTR = "_moa_policy"  # on each attention module: the AttentionPolicy driving it
_MISSING = object()


@dataclass(frozen=True)
class Call:
    """One attention call as the model made it: ``layer`` (its ``layer_idx``), ``mask``
    (what the policy's mask function built), ``scale``, the model layer's own
    ``window`` (sliding) and logit ``softcap``, the policy's ``state`` and the remaining
    keyword arguments the module passed (``extra``)."""

    module: torch.nn.Module
    layer: int
    mask: Any
    scale: float
    window: int | None
    softcap: float | None
    state: Any
    extra: dict[str, Any] = field(default_factory=dict)


#: (call, query (B, Hq, L, D), key (B, Hkv, Lk, D), value) -> output (B, Hq, L, D)
PolicyFn = Callable[[Call, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def no_mask(*args: Any, **kwargs: Any) -> None:
    """Mask function for policies that build their own masks: skip transformers' 4D mask."""
    return None


def padding_mask(*args: Any, attention_mask: Any = None, **kwargs: Any) -> torch.Tensor | None:
    """Mask function that hands the policy the (B, Lk) bool padding mask as it is."""
    return attention_mask if torch.is_tensor(attention_mask) else None


def _dispatch(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The function registered for every policy name: runs the module's policy."""
    policy: AttentionPolicy | None = module.__dict__.get(_ATTR)
    if policy is None:
        raise MoaSearchError(
            f"{type(module).__name__}: attention is switched to a moa-search policy but none "
            "is installed on this module (was it removed while the model ran?)"
        )
    call = Call(
        module=module,
        layer=int(module.layer_idx),
        mask=attention_mask,
        scale=scaling if scaling is not None else query.shape[-1] ** -0.5,
        window=kwargs.get("sliding_window"),
        softcap=kwargs.get("softcap"),
        state=policy.state,
        extra=kwargs,
    )
    out = policy.fn(call, query, key, value)
    return out.transpose(1, 2).contiguous(), None


# name -> [count of installed policies using it, mask fn, previous attention fn, previous mask
# fn]: a name stays registered while any model uses it, then what was there comes back.
_names: dict[str, list[Any]] = {}


def _register(name: str, mask: Callable[..., Any]) -> None:
    entry = _names.get(name)
    if entry is not None:
        if entry[1] is not mask:
            raise MoaSearchError(
                f"attention policy {name!r} is in use with another mask function; give this "
                "policy its own name"
            )
        entry[0] += 1
        return
    attn_map, mask_map = AttentionInterface._global_mapping, AttentionMaskInterface._global_mapping
    _names[name] = [1, mask, attn_map.get(name, _MISSING), mask_map.get(name, _MISSING)]
    AttentionInterface.register(name, _dispatch)
    AttentionMaskInterface.register(name, mask)


def _unregister(name: str) -> None:
    entry = _names[name]
    entry[0] -= 1
    if entry[0]:
        return
    del _names[name]
    for mapping, previous in (
        (AttentionInterface._global_mapping, entry[2]),
        (AttentionMaskInterface._global_mapping, entry[3]),
    ):
        if previous is _MISSING:
            mapping.pop(name, None)
        else:
            mapping[name] = previous


def configs(model: torch.nn.Module) -> list[Any]:
    """Every distinct config object held by the model's modules (sub-configs included)."""
    found: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            found.setdefault(id(config), config)
    return list(found.values())


class AttentionPolicy:
    """``fn`` as the attention of every decoder layer of ``model`` until :meth:`remove`.

    ``mask``: the mask function transformers calls under ``name`` (default: no mask);
    ``state``: handed to ``fn`` as ``call.state``; ``pre_hook``: a forward pre-hook (with
    kwargs) on the decoder stack; ``generate``: ``generate(original, *args, **kwargs)``
    replaces ``model.generate`` (``original``: the one it replaces). Use as a context
    manager (``with attention_policy(...) as policy``) or call :meth:`install` /
    :meth:`remove`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        name: str,
        fn: PolicyFn,
        *,
        mask: Callable[..., Any] = no_mask,
        state: Any = None,
        pre_hook: Callable[..., Any] | None = None,
        generate: Callable[..., Any] | None = None,
    ):
        self.model, self.name, self.fn, self.mask = model, name, fn, mask
        self.state = state
        self.pre_hook, self.generate = pre_hook, generate
        self.modules = families.attention_modules(model)
        self._undo: list[Callable[[], None]] = []
        self._installed = False

    @property
    def installed(self) -> bool:
        return self._installed

    def install(self) -> AttentionPolicy:
        if self._installed:
            raise MoaSearchError(f"attention policy {self.name!r} is already installed")
        self._installed = True
        try:
            _register(self.name, self.mask)
            self._undo.append(lambda: _unregister(self.name))
            for module in self.modules:
                self._set(module.__dict__, _ATTR, self)
            for config in configs(self.model):
                self._set(config.__dict__, "_attn_implementation_internal", self.name)
            if self.pre_hook is not None:
                handle = families.decoder(self.model).register_forward_pre_hook(
                    self.pre_hook, with_kwargs=True
                )
                self._undo.append(handle.remove)
            if self.generate is not None:
                original, wrapper = self.model.generate, self.generate

                def generate(*args: Any, **kwargs: Any) -> Any:
                    return wrapper(original, *args, **kwargs)

                self._set(self.model.__dict__, "generate", generate)
        except BaseException:
            self.remove()
            raise
        return self

    def _set(self, where: dict[str, Any], key: str, value: Any) -> None:
        """``where[key] = value``, with the undo step recorded first."""
        previous = where.get(key, _MISSING)

        def undo() -> None:
            if previous is _MISSING:
                where.pop(key, None)
            else:
                where[key] = previous

        self._undo.append(undo)
        where[key] = value

    def remove(self) -> None:
        """Undo :meth:`install` step by step, last first (idempotent)."""
        while self._undo:
            self._undo.pop()()
        self._installed = False

    def __enter__(self) -> AttentionPolicy:
        return self if self._installed else self.install()

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def attention_policy(model: torch.nn.Module, name: str, fn: PolicyFn, **options: Any):
    """An :class:`AttentionPolicy` (not yet installed: ``with`` installs and removes it)."""
    return AttentionPolicy(model, name, fn, **options)
