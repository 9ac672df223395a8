"""Plans: which pattern every (layer, KV head) of one model runs, as a versioned YAML file.

A plan names the model it was made for (shape + config fingerprint), the budget and
lengths it was searched at, optional predicted/measured metrics, and per layer one pattern
per KV head. Patterns live per KV head because a GQA group shares its cache; SparQ's index
set is shared by the group too (as in the SparQ paper's GQA rule), so per-query-head
patterns are not allowed.

YAML layout (compact: a default plus per-layer overrides)::

    moa_search_plan: 1
    model: {name_or_path: smollm2-135m, architecture: LlamaForCausalLM, num_layers: 30,
            num_attention_heads: 9, num_key_value_heads: 3, head_dim: 64, fingerprint: ...}
    made_for: {lengths: [2048, 4096], budget: {memory: 0.25}}
    metrics: {}
    default: dense
    layers:
      0: "window:sink=64,span=512"          # every KV head of layer 0
      3: [dense, "window:sink=4,span=256", "sparq:r=16,k=128,local=16"]  # one per KV head
"""

from __future__ import annotations

import hashlib
import json
import os
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moa_search.errors import MoaSearchError
from moa_search.families import layer_windows
from moa_search.files import write_text
from moa_search.patterns import MAX_PARAM, Dense, Pattern, parse

PLAN_VERSION = 1
#: What a plan file may hold, so a malformed or hostile file fails fast instead of hanging
#: (a YAML "billion laughs" alias bomb expands to gigabytes from a few hundred bytes).
MAX_PLAN_BYTES = 16 * 2**20
MAX_YAML_NODES = 200_000  # scalars + collections after expanding aliases
MAX_YAML_DEPTH = 32
MAX_YAML_ALIASES = 4096
MAX_MODEL_DIM = 2**16  # layers, heads and head_dim each
MAX_PLAN_HEADS = 2**20  # layers x KV heads
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlist = _short.maxdict = _short.maxtuple = 6
_short.maxlevel = 2
_FINGERPRINT_KEYS = (
    "model_type",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_size",
    "intermediate_size",
    "vocab_size",
    "rope_theta",
)


@dataclass(frozen=True)
class ModelIdentity:
    """What a plan needs to know about its model, and a fingerprint to refuse other models."""

    name_or_path: str
    architecture: str
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    fingerprint: str
    #: per layer, the sliding window the model itself applies (None: full causal); empty
    #: when no layer slides. Costs count against it: a sliding layer's "dense" is its window.
    native_windows: tuple[int | None, ...] = ()

    @classmethod
    def from_config(cls, config: Any, name_or_path: str | None = None) -> ModelIdentity:
        """Build from a transformers config (or a model, whose ``.config`` is used)."""
        config = getattr(config, "config", config)
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        archs = getattr(config, "architectures", None) or [type(config).__name__]
        return cls(
            name_or_path=str(name_or_path or getattr(config, "_name_or_path", "") or "unknown"),
            architecture=str(archs[0]),
            num_layers=int(config.num_hidden_layers),
            num_attention_heads=heads,
            num_key_value_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            fingerprint=config_fingerprint(config),
            native_windows=_windows_of(config),
        )

    @property
    def group_size(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def window(self, layer: int) -> int | None:
        """The model's own sliding window at ``layer`` (None: full causal attention)."""
        return self.native_windows[layer] if self.native_windows else None

    @property
    def sliding_layers(self) -> list[int]:
        """Layers the model itself makes sliding."""
        return [i for i in range(self.num_layers) if self.window(i) is not None]

    def to_dict(self) -> dict[str, Any]:
        """Plain fields for YAML / JSON; ``native_windows`` only when a layer slides."""
        out = {k: v for k, v in self.__dict__.items() if k != "native_windows"}
        if self.native_windows:
            out["native_windows"] = list(self.native_windows)
        return out


def _windows_of(config: Any) -> tuple[int | None, ...]:
    windows = layer_windows(config)
    return windows if any(w is not None for w in windows) else ()


def config_fingerprint(config: Any) -> str:
    """Stable short hash of the config fields that decide attention shapes and weights layout."""
    config = getattr(config, "config", config)
    values = {}
    for key in _FINGERPRINT_KEYS:
        value = getattr(config, key, None)
        if key == "head_dim" and value is None:
            value = config.hidden_size // config.num_attention_heads
        if key == "rope_theta" and value is None:
            rope = getattr(config, "rope_parameters", None) or {}
            value = rope.get("rope_theta") if isinstance(rope, dict) else None
        values[key] = value
    blob = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Plan:
    """Per-layer, per-KV-head patterns for one model. ``heads[layer][kv_head]``."""

    model: ModelIdentity
    heads: list[list[Pattern]]
    lengths: list[int] = field(default_factory=list)
    budget: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    # --- queries --------------------------------------------------------------------
    def pattern(self, layer: int, kv_head: int) -> Pattern:
        return self.heads[layer][kv_head]

    def distinct_patterns(self) -> list[Pattern]:
        seen: dict[str, Pattern] = {}
        for row in self.heads:
            for p in row:
                seen.setdefault(p.spec(), p)
        return list(seen.values())

    def kv_bytes(self, n: int, batch: int = 1, dtype_bytes: int = 2) -> int:
        """Bytes the plan's cache (``MoACache`` with ``max_cache_len=n``) allocates after
        ``n`` tokens: K, V and SparQ's fp32 V sums; no head of a sliding layer holds more
        than the model's own window."""
        d, w = self.model.head_dim, self.model.window
        return batch * sum(
            p.bytes_stored(n, d, dtype_bytes, w(i)) for i, row in enumerate(self.heads) for p in row
        )

    def read_bytes(self, n: int, batch: int = 1, dtype_bytes: int = 2) -> int:
        """Bytes one decode step reads at length ``n`` (see ``Pattern.bytes_read``)."""
        d, w = self.model.head_dim, self.model.window
        return batch * sum(
            p.bytes_read(n, d, dtype_bytes, w(i)) for i, row in enumerate(self.heads) for p in row
        )

    def dense_kv_bytes(self, n: int, batch: int = 1, dtype_bytes: int = 2) -> int:
        """What the model's own cache holds at length ``n``: every token on a full layer,
        the window on a sliding one."""
        m = self.model
        per_layer = [min(n, m.window(i) or n) for i in range(m.num_layers)]
        return batch * sum(per_layer) * m.num_key_value_heads * 2 * m.head_dim * dtype_bytes

    def memory_density(self, n: int, dtype_bytes: int = 2) -> float:
        """Plan KV memory as a fraction of dense at length ``n``."""
        return self.kv_bytes(n, 1, dtype_bytes) / self.dense_kv_bytes(n, 1, dtype_bytes)

    def read_density(self, n: int, dtype_bytes: int = 2) -> float:
        """Plan bytes read per decode step as a fraction of dense at length ``n`` (SparQ's
        share depends on ``dtype_bytes``: its side buffer and selection keys do not)."""
        return self.read_bytes(n, 1, dtype_bytes) / self.dense_kv_bytes(n, 1, dtype_bytes)

    # --- (de)serialisation ----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        specs = [[p.spec() for p in row] for row in self.heads]
        counts: dict[str, int] = {}
        for row in specs:
            for s in row:
                counts[s] = counts.get(s, 0) + 1
        default = max(counts, key=lambda s: counts[s]) if counts else "dense"
        layers: dict[int, Any] = {}
        for i, row in enumerate(specs):
            if all(s == default for s in row):
                continue
            layers[i] = row[0] if len(set(row)) == 1 else list(row)
        return {
            "moa_search_plan": PLAN_VERSION,
            "model": self.model.to_dict(),
            "made_for": {"lengths": list(self.lengths), "budget": dict(self.budget)},
            "metrics": dict(self.metrics),
            "notes": self.notes,
            "default": default,
            "layers": layers,
        }

    def check_model(self, config: Any, source: str = "plan") -> None:
        """Refuse to run this plan on a model of another shape or config."""
        other = ModelIdentity.from_config(config)
        m = self.model
        for key in ("num_layers", "num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(m, key) != getattr(other, key):
                raise MoaSearchError(
                    f"{source}: model.{key}: plan was made for {getattr(m, key)}, "
                    f"model has {getattr(other, key)} (plan targets {m.name_or_path})"
                )
        if m.fingerprint != other.fingerprint:
            raise MoaSearchError(
                f"{source}: model.fingerprint: plan was made for {m.name_or_path} "
                f"(fingerprint {m.fingerprint}), model {other.name_or_path} has {other.fingerprint}"
            )
        if m.native_windows and m.native_windows != other.native_windows:
            raise MoaSearchError(
                f"{source}: model.native_windows: plan was made for sliding windows "
                f"{_short.repr(list(m.native_windows))}, model has "
                f"{_short.repr(list(other.native_windows))} (plan targets {m.name_or_path})"
            )


def uniform_plan(
    model_or_config: Any, spec: str | Pattern, name_or_path: str | None = None
) -> Plan:
    """Give every KV head of every layer the same pattern (``spec`` as the CLI writes it)."""
    identity = ModelIdentity.from_config(model_or_config, name_or_path)
    pattern = parse(spec, identity.head_dim)
    heads = [[pattern] * identity.num_key_value_heads for _ in range(identity.num_layers)]
    return Plan(model=identity, heads=heads)


def plan_from_dict(data: Any, source: str = "plan") -> Plan:
    """Validate a parsed YAML document; every error names ``source`` and the field path."""

    def fail(path: str, message: str) -> MoaSearchError:
        return MoaSearchError(f"{source}: {path}: {message}")

    if not isinstance(data, dict):
        raise fail("<root>", f"expected a mapping, got {type(data).__name__}")
    version = data.get("moa_search_plan")
    if version != PLAN_VERSION:
        raise fail("moa_search_plan", f"expected {PLAN_VERSION}, got {version!r}")
    allowed_top = {"moa_search_plan", "model", "made_for", "metrics", "notes", "default", "layers"}
    for key in data:
        if key not in allowed_top:
            raise fail(str(key), f"unknown field (allowed: {', '.join(sorted(allowed_top))})")

    model = data.get("model")
    if not isinstance(model, dict):
        raise fail("model", "expected a mapping with the model identity")
    ints = ("num_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
    strs = ("name_or_path", "architecture", "fingerprint")
    kwargs: dict[str, Any] = {}
    for key in ints:
        value = model.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise fail(f"model.{key}", f"expected a positive integer, got {_short.repr(value)}")
        if value > MAX_MODEL_DIM:
            raise fail(f"model.{key}", f"expected at most {MAX_MODEL_DIM}, got {value}")
        kwargs[key] = value
    for key in strs:
        value = model.get(key)
        if not isinstance(value, str) or not value:
            raise fail(f"model.{key}", f"expected a non-empty string, got {_short.repr(value)}")
        kwargs[key] = value
    windows = model.get("native_windows", [])
    if not isinstance(windows, list) or (windows and len(windows) != kwargs["num_layers"]):
        raise fail(
            "model.native_windows",
            f"expected a list of {kwargs['num_layers']} entries (null or a positive integer)",
        )
    for i, w in enumerate(windows):
        if w is not None and (
            isinstance(w, bool) or not isinstance(w, int) or not 0 < w <= MAX_PARAM
        ):
            raise fail(
                f"model.native_windows[{i}]",
                f"expected null or a positive integer up to {MAX_PARAM}, got {_short.repr(w)}",
            )
    kwargs["native_windows"] = tuple(windows) if any(w is not None for w in windows) else ()
    extra = set(model) - set(ints) - set(strs) - {"native_windows"}
    if extra:
        raise fail(f"model.{sorted(extra)[0]}", "unknown field")
    if kwargs["num_attention_heads"] % kwargs["num_key_value_heads"]:
        raise fail("model.num_key_value_heads", "must divide num_attention_heads")
    if kwargs["num_layers"] * kwargs["num_key_value_heads"] > MAX_PLAN_HEADS:
        raise fail(
            "model.num_layers",
            f"num_layers x num_key_value_heads must be at most {MAX_PLAN_HEADS}",
        )
    identity = ModelIdentity(**kwargs)
    head_dim = identity.head_dim

    def pattern_at(path: str, spec: Any) -> Pattern:
        if not isinstance(spec, str):
            raise fail(
                path,
                f"expected a pattern string like 'window:sink=4,span=256', got {_short.repr(spec)}",
            )
        try:
            return parse(spec, head_dim)
        except MoaSearchError as exc:
            raise fail(path, str(exc)) from None

    default = pattern_at("default", data.get("default", "dense"))
    heads = [[default] * identity.num_key_value_heads for _ in range(identity.num_layers)]
    layers = data.get("layers") or {}
    if isinstance(layers, list):
        layers = dict(enumerate(layers))
    if not isinstance(layers, dict):
        raise fail("layers", f"expected a mapping layer -> pattern(s), got {type(layers).__name__}")
    for key, value in layers.items():
        if isinstance(key, bool) or not isinstance(key, int):
            raise fail(f"layers.{key}", "layer index must be an integer")
        if not 0 <= key < identity.num_layers:
            raise fail(f"layers.{key}", f"layer index out of range [0, {identity.num_layers})")
        if isinstance(value, list):
            if len(value) != identity.num_key_value_heads:
                raise fail(
                    f"layers.{key}",
                    f"expected {identity.num_key_value_heads} patterns (one per KV head), "
                    f"got {len(value)}",
                )
            heads[key] = [pattern_at(f"layers.{key}[{j}]", s) for j, s in enumerate(value)]
        else:
            heads[key] = [pattern_at(f"layers.{key}", value)] * identity.num_key_value_heads

    made_for = data.get("made_for") or {}
    if not isinstance(made_for, dict):
        raise fail("made_for", "expected a mapping")
    lengths = made_for.get("lengths") or []
    if not isinstance(lengths, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and 0 < n <= MAX_PARAM for n in lengths
    ):
        raise fail(
            "made_for.lengths",
            f"expected a list of positive integers up to {MAX_PARAM}, got {_short.repr(lengths)}",
        )
    budget = made_for.get("budget") or {}
    if not isinstance(budget, dict):
        raise fail("made_for.budget", "expected a mapping")
    metrics = data.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise fail("metrics", "expected a mapping")
    notes = data.get("notes") or ""
    if not isinstance(notes, str):
        raise fail("notes", "expected a string")
    return Plan(identity, heads, list(lengths), dict(budget), dict(metrics), notes)


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read and validate a plan YAML; one-line MoaSearchError on any problem."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_PLAN_BYTES:
            raise MoaSearchError(
                f"{path}: plan file is {size} bytes, more than the {MAX_PLAN_BYTES} allowed"
            )
        text = path.read_text()
    except FileNotFoundError:
        raise MoaSearchError(f"{path}: plan file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MoaSearchError(f"{path}: cannot read plan ({type(exc).__name__})") from None
    return plan_from_dict(load_yaml(text, str(path)), source=str(path))


class _BoundedLoader(yaml.SafeLoader):
    """safe_load with limits on nesting depth and aliases while composing."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.depth = 0
        self.aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                raise _YamlLimit(f"more than {MAX_YAML_ALIASES} aliases", self.peek_event())
            return super().compose_node(parent, index)
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise _YamlLimit(f"nested deeper than {MAX_YAML_DEPTH} levels", self.peek_event())
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _YamlLimit(Exception):
    def __init__(self, message: str, at: Any = None):
        mark = getattr(at, "start_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        super().__init__(f"{message}{where}")


def load_yaml(text: str, source: str = "plan") -> Any:
    """Parse one YAML document with bounded size, depth and aliases and without duplicate
    mapping keys; one-line MoaSearchError naming ``source`` (and the field) otherwise."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_tree(node, loader, source)
        return loader.construct_document(node)
    except _YamlLimit as exc:
        raise MoaSearchError(f"{source}: YAML {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise MoaSearchError(f"{source}: malformed YAML{where}") from None
    finally:
        loader.dispose()


def _check_tree(root: Any, loader: yaml.SafeLoader, source: str) -> None:
    """Refuse recursive aliases, documents that expand past ``MAX_YAML_NODES`` nodes, and
    duplicate keys in a mapping (YAML would keep the last one silently)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise _YamlLimit("has a recursive alias", node)
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        active.discard(key)
        sizes[key] = total
        if total > MAX_YAML_NODES:
            raise _YamlLimit(
                f"expands to more than {MAX_YAML_NODES} nodes (aliases included)", node
            )
        return total

    if isinstance(root, yaml.MappingNode):  # name the top-level field that is too big
        for k, v in root.value:
            try:
                size(v)
            except _YamlLimit as exc:
                field = k.value if isinstance(k, yaml.ScalarNode) else "<key>"
                raise MoaSearchError(f"{source}: {field}: YAML {exc}") from None
    size(root)
    seen: set[int] = set()

    def keys(node: Any, where: str) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, child in enumerate(node.value):
                keys(child, f"{where}[{i}]")
            return
        if not isinstance(node, yaml.MappingNode):
            return
        found: dict[Any, Any] = {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode) or k.tag == "tag:yaml.org,2002:merge":
                keys(v, where)
                continue
            value = loader.construct_object(k, deep=True)
            field = f"{where}.{value}" if where else str(value)
            try:
                first = found.setdefault(value, k)
            except TypeError:  # unhashable key: construction reports it
                first = k
            if first is not k:
                raise MoaSearchError(
                    f"{source}: {field}: duplicate key (lines {first.start_mark.line + 1} "
                    f"and {k.start_mark.line + 1}); each key may appear once"
                )
            keys(v, field)

    keys(root, "")


def save_plan(plan: Plan, path: str | os.PathLike[str]) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves half a plan."""
    text = yaml.safe_dump(plan.to_dict(), sort_keys=False, default_flow_style=None, width=100)
    return write_text(path, text)


def validate(plan_or_path: Plan | str | os.PathLike[str], model_or_config: Any = None) -> Plan:
    """Load (if a path) and check a plan, optionally against a model; returns the plan."""
    plan = plan_or_path if isinstance(plan_or_path, Plan) else load_plan(plan_or_path)
    source = "plan" if isinstance(plan_or_path, Plan) else str(plan_or_path)
    for i, row in enumerate(plan.heads):
        for j, p in enumerate(row):
            try:
                p.check(plan.model.head_dim)
            except ValueError as exc:
                raise MoaSearchError(f"{source}: layers.{i}[{j}]: {exc}") from None
    if model_or_config is not None:
        plan.check_model(model_or_config, source)
    return plan


def dense_plan(model_or_config: Any) -> Plan:
    return uniform_plan(model_or_config, Dense())
