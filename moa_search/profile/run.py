"""``profile(...)``: the one library call behind ``moa-search profile``.

Why this shape: each (length, sample) is one forward + backward whose result is
checkpointed on its own, so the work splits over devices (one worker process per
device, results merged from the checkpoint files) and a killed run resumes where it
stopped. Merging, validation and plots run once every checkpoint exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from moa_search.errors import MoaSearchError
from moa_search.patterns import Pattern
from moa_search.plan import ModelIdentity
from moa_search.profile import calib as calib_mod
from moa_search.profile import measured as measured_mod
from moa_search.profile import store
from moa_search.profile.ablation import AblationEngine
from moa_search.profile.candidates import keep_families, resolve_candidates, split_static
from moa_search.profile.capture import InfluenceRecorder, profile_sample
from moa_search.profile.table import PRIMARY, build_table, count_against_windows, mean_blocks

METHOD_VERSION = "moa-influence-2"  # 2: SparQ priced on sampled rows (sparq_rows)
METHODS = ("measured", "gradient")
DEFAULT_LENGTHS = (2048, 4096, 8192)
#: SparQ candidates are priced at this many evenly spaced query rows per sample. On the
#: default model at 1024 tokens, 64 rows already rank heads like all rows (Spearman 0.988,
#: 256 rows: 0.996); SparQ pricing costs O(rows * N) instead of O(N^2).
DEFAULT_SPARQ_ROWS = 256


@dataclass(frozen=True)
class ProfileConfig:
    """What ``profile`` measures and where it runs: built by the CLI, stored in meta.json
    (``config``); a rerun resumes only when the fields that shape results are unchanged.

    ``method="measured"`` (default) applies every candidate to one KV head at a time and
    measures the model's divergence from dense per task family (``measure`` sets its
    fidelity and batch); ``"gradient"`` is MoA's first-order influence from one
    forward + backward per sample (cheaper, blind where the model is confident).
    ``devices="cuda:0,cuda:1"`` splits samples over devices; ``device="auto"`` shards one
    model over all GPUs; ``storage`` (an RDB URL such as the plan study's): every worker
    running the same profile against it claims (length, sample) units. ``validate=M``
    (gradient) measures M single-head ablations and stores the Spearman correlation with
    the prediction. SparQ candidates are priced at ``sparq_rows`` evenly spaced query rows
    (0: every row; see ``influence.py``). ``families`` keeps only those pattern families of
    the default grid (dense always), e.g. ``("window", "elastic")`` for a memory budget.
    """

    method: str = "measured"
    lengths: Sequence[int] | str = DEFAULT_LENGTHS
    samples: int = 8
    candidates: Sequence[str | Pattern] | str | None = None
    families: Sequence[str] | None = None
    seed: int = 0
    loss: str = "all"
    dtype: str | torch.dtype | None = None
    device: str | None = None
    devices: str | Sequence[str] | None = None
    storage: str | None = None
    block_size: int = 64
    sparq_rows: int = DEFAULT_SPARQ_ROWS
    tile_rows: int | None = None
    gradient_checkpointing: bool = True
    validate: int = 0
    measure: measured_mod.MeasureConfig = field(default_factory=measured_mod.MeasureConfig)
    plots: bool = True

    def result_fields(self) -> dict[str, Any]:
        """The fields that shape the profile's numbers (compared on resume, in meta.json);
        call on a resolved config (lengths, dtype and candidates normalised)."""
        out = {
            "method": self.method,
            "lengths": list(self.lengths),
            "block_size": self.block_size,
            "seed": self.seed,
            "loss": self.loss,
            "dtype": self.dtype,
            "candidates": list(self.candidates),
            "sparq_rows": self.sparq_rows,
        }
        if self.method == "measured":
            out["measure"] = self.measure.as_dict()
        return out


@dataclass
class ProfileResult:
    """Where the profile went, its tidy table and its metadata."""

    out: Path
    table: pd.DataFrame
    meta: dict[str, Any]


# --- small helpers ------------------------------------------------------------------
def _device_list(device: str | None, devices: str | Sequence[str] | None) -> list[str]:
    """The devices to use, checked once here (the CLI's parser, for library callers too)."""
    from moa_search.devices import parse_device, parse_devices  # noqa: PLC0415

    if devices:
        return parse_devices(devices) or []
    if device:
        return [parse_device(device, allow_auto=True)]
    return ["cuda" if torch.cuda.is_available() else "cpu"]


def _dtype_name(dtype: str | torch.dtype | None, device: str) -> str:
    if dtype is None:
        return "bfloat16" if device.startswith(("cuda", "auto")) else "float32"
    from moa_search.devices import dtype_name  # noqa: PLC0415

    return dtype_name(dtype)


def _check_lengths(lengths: Sequence[int] | str, block_size: int) -> list[int]:
    if isinstance(lengths, str):
        try:
            lengths = [int(x) for x in lengths.split(",") if x.strip()]
        except ValueError:
            raise MoaSearchError(
                f"lengths: expected integers like 2048,4096, got {lengths!r}"
            ) from None
    if isinstance(lengths, int):
        lengths = [lengths]
    if block_size <= 0:
        raise MoaSearchError(f"block_size: expected a positive integer, got {block_size}")
    found = sorted({int(n) for n in lengths})
    if not found:
        raise MoaSearchError("lengths: expected at least one length")
    for n in found:
        if n <= 0 or n % block_size:
            raise MoaSearchError(
                f"lengths: {n} is not a positive multiple of the block size "
                f"{block_size} (use e.g. {max(1, n // block_size) * block_size})"
            )
    return found


def _config(model: Any) -> Any:
    if isinstance(model, torch.nn.Module):
        return model.config
    from moa_search.models import load_config  # noqa: PLC0415

    return load_config(model)


def load_for_profile(model: Any, dtype: str, device: str) -> torch.nn.Module:
    """A model on ``device``; ``device="auto"`` shards it over all GPUs (accelerate)."""
    if isinstance(model, torch.nn.Module):
        return model
    from moa_search.models import load_model, resolve_model_path  # noqa: PLC0415

    if device != "auto":
        return load_model(model, dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    return AutoModelForCausalLM.from_pretrained(
        resolve_model_path(model), dtype=getattr(torch, dtype), device_map="auto"
    ).eval()


def _tokenizer(model: Any) -> Any:
    from moa_search.models import load_tokenizer  # noqa: PLC0415

    name = model if isinstance(model, (str, os.PathLike)) else getattr(model, "name_or_path", "")
    if not name:
        return None
    try:
        return load_tokenizer(name)
    except MoaSearchError:
        return None


def _used_devices(model: torch.nn.Module | None, devices: list[str]) -> list[str]:
    """The devices that held the model: its accelerate device map when it was sharded."""
    placed = getattr(model, "hf_device_map", None)
    if not placed:
        return devices
    return sorted({f"cuda:{d}" if isinstance(d, int) else str(d) for d in placed.values()})


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _oom_message(device: Any, length: int) -> str:
    return (
        f"out of memory on {device} at length {length}: try smaller --lengths, fewer "
        f"--samples, keep gradient checkpointing on, or shard with --device auto"
    )


# --- one job ------------------------------------------------------------------------
def run_job(
    model: torch.nn.Module,
    sample: calib_mod.Sample,
    length: int,
    index: int,
    recorder: InfluenceRecorder,
    out: Path,
    gradient_checkpointing: bool,
) -> None:
    """Profile one (length, sample) and checkpoint it atomically."""
    device = model.get_input_embeddings().weight.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        loss, res = profile_sample(
            model, sample.input_ids, sample.loss_mask, recorder, gradient_checkpointing
        )
    except torch.OutOfMemoryError:
        raise MoaSearchError(_oom_message(device, length)) from None
    seconds = time.perf_counter() - start
    res["loss"] = torch.tensor([loss], dtype=torch.float64)
    meta = {
        "seconds": f"{seconds:.3f}",
        "peak_bytes": str(_peak_bytes(device)),
        "device": str(device),
    }
    store.write_tensors(store.checkpoint_path(out, length, index), res, meta)


def _recorder(
    cands: Sequence[Pattern], block_size: int, tile_rows: int | None, sparq_rows: int
) -> InfluenceRecorder:
    static, sparq = split_static(cands)
    return InfluenceRecorder(static, sparq, block_size, tile_rows, sparq_rows)


def _worker(
    spec: tuple[str, ProfileConfig, int],
    device: str,
    jobs: list[tuple[int, int]],
    out: str,
    rank: int,
    threads: int,
) -> None:
    """Process entry for data-parallel profiling: load, run its jobs, report errors.
    ``spec``: (model name, resolved config, head_dim)."""
    out_p = Path(out)
    model_name, cfg, head_dim = spec
    try:
        torch.set_num_threads(max(1, threads))
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        from moa_search.patterns import parse  # noqa: PLC0415

        model = load_for_profile(model_name, cfg.dtype, device)
        cands = [parse(c, head_dim) for c in cfg.candidates]
        samples = calib_mod.from_tensors(store.read_tensors(out_p / store.CALIB))
        if cfg.method == "measured":
            engine = AblationEngine(model, **cfg.measure.as_dict())
            for length, i in jobs:
                measured_mod.run_job(engine, samples[length][i], cands, length, i, out_p)
            return
        recorder = _recorder(cands, cfg.block_size, cfg.tile_rows, cfg.sparq_rows)
        for length, i in jobs:
            run_job(
                model, samples[length][i], length, i, recorder, out_p, cfg.gradient_checkpointing
            )
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as one line
        text = str(exc).strip().splitlines()
        msg = text[0] if text else type(exc).__name__
        if not isinstance(exc, MoaSearchError):
            msg = f"{type(exc).__name__}: {msg}"
        (out_p / store.CHECKPOINTS / f"worker{rank}.error").write_text(f"{device}: {msg}\n")
        raise SystemExit(1) from None


def _run_parallel(
    spec: tuple[str, ProfileConfig, int],
    devices: list[str],
    todo: list[tuple[int, int]],
    out: Path,
    bar: Any,
) -> None:
    import torch.multiprocessing as mp  # noqa: PLC0415

    ctx = mp.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // len(devices))
    for f in (out / store.CHECKPOINTS).glob("worker*.error"):
        f.unlink()
    procs = []
    for rank, dev in enumerate(devices):
        mine = todo[rank :: len(devices)]
        if mine:
            p = ctx.Process(target=_worker, args=(spec, dev, mine, str(out), rank, threads))
            p.start()
            procs.append(p)
    seen = 0
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(0.5)
            now = len(store.done_jobs(out, todo))
            bar.update(now - seen)
            seen = now
    finally:
        for p in procs:
            p.join()
    bar.update(len(store.done_jobs(out, todo)) - seen)
    errors = sorted((out / store.CHECKPOINTS).glob("worker*.error"))
    if errors:
        raise MoaSearchError(errors[0].read_text().strip())
    bad = [p.exitcode for p in procs if p.exitcode]
    if bad:
        raise MoaSearchError(f"a profiling worker exited with code {bad[0]}")


def _run_shared(url: str, key: str, jobs, out: Path, bar: Any, run_one, poll_s: float = 1.0):
    """Claim units from the shared store until none is left, then wait for the others."""
    from moa_search.profile.units import UnitStore, worker_name  # noqa: PLC0415

    units = UnitStore(url, key)
    units.add(jobs)
    units.pull(out)
    me = worker_name()
    while True:
        while (job := units.claim(me)) is not None:
            if not store.checkpoint_path(out, *job).is_file():
                bar.set_postfix(length=job[0], sample=job[1])
                run_one(*job)
            units.finish(out, *job)
            bar.update(len(store.done_jobs(out, jobs)) - bar.n)
        # Others still run units: count first, then pull, so a unit finished in between
        # is pulled before returning; a unit whose worker died comes back as claimable.
        finished = units.counts().get("done", 0) >= len(jobs)
        units.pull(out)
        bar.update(len(store.done_jobs(out, jobs)) - bar.n)
        if finished:
            return
        time.sleep(poll_s)


# --- entry point --------------------------------------------------------------------
def profile(
    model: str | torch.nn.Module = "smollm2-135m",
    config: ProfileConfig | None = None,
    *,
    calib: Any = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **settings: Any,
) -> ProfileResult:
    """Profile per-head sensitivity of ``model`` to every candidate pattern; resumable.

    ``config`` says what and how (:class:`ProfileConfig`); any of its fields may also be
    given as a keyword (``profile(model, lengths=[1024], samples=4)``), over ``config``.
    ``calib``: a .txt/.jsonl/.parquet file or folder, token tensors or samples (default:
    the built-in calibration set). Writes ``out``/profile.parquet, influence.safetensors,
    meta.json, plots/*.png and checkpoints; a rerun with the same config continues, another
    is refused unless ``overwrite``.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    wall = time.perf_counter()
    cfg = replace(config or ProfileConfig(), **settings)
    if cfg.method not in METHODS:
        raise MoaSearchError(f"method: expected one of {', '.join(METHODS)}, got {cfg.method!r}")
    if cfg.method == "measured" and cfg.validate:
        raise MoaSearchError(
            "validate: checks the gradient method's estimates against real ablations; the "
            "measured method's entries are those ablations (use plan --check for whole plans)"
        )
    device_list = _device_list(cfg.device, cfg.devices)
    # blocks tile N x N in the gradient method only; measured lengths may be any size
    lengths = _check_lengths(cfg.lengths, cfg.block_size if cfg.method == "gradient" else 1)
    if cfg.samples <= 0:
        raise MoaSearchError(f"samples: expected a positive integer, got {cfg.samples}")
    if cfg.sparq_rows < 0:
        raise MoaSearchError(f"sparq_rows: expected 0 (all rows) or more, got {cfg.sparq_rows}")
    if cfg.storage is not None and len(device_list) > 1:
        raise MoaSearchError("storage: run one worker process per device, each with --device")
    if isinstance(model, torch.nn.Module) and len(device_list) > 1:
        raise MoaSearchError(
            "devices: several devices need a model name or path, not a model object"
        )
    config_ = _config(model)
    from moa_search.models import check_supported  # noqa: PLC0415

    check_supported(config_)
    name = model if isinstance(model, (str, os.PathLike)) else None
    identity = ModelIdentity.from_config(config_, str(name) if name else None)
    if cfg.method == "measured" and cfg.candidates is None:
        cands = measured_mod.measured_candidates(lengths, identity.head_dim)
    else:
        cands = resolve_candidates(cfg.candidates, lengths, cfg.block_size, identity.head_dim)
    if cfg.families is not None:
        if cfg.candidates is not None:
            raise MoaSearchError(
                "families (--patterns): give either candidates or families, not both"
            )
        cands = keep_families(cands, cfg.families)
    split_static(cands)
    cfg = replace(
        cfg,
        lengths=tuple(lengths),
        dtype=_dtype_name(cfg.dtype, device_list[0]),
        candidates=tuple(c.spec() for c in cands),
        families=None,  # applied: the candidates say it all from here on
        # text and code samples score every token; answers only their answer
        loss="answer" if cfg.method == "measured" else cfg.loss,
    )
    out = Path(out) if out is not None else Path("profiles") / Path(identity.name_or_path).name

    loaded = model if isinstance(model, torch.nn.Module) else None
    given = isinstance(calib, (torch.Tensor, list, tuple))
    mix = measured_mod.MEASURED_MIX if cfg.method == "measured" and calib is None else None
    needs_model = mix is not None and any(k.startswith("self_") for k in mix)
    own_model = not isinstance(model, torch.nn.Module)
    if loaded is None and (len(device_list) == 1 or needs_model):
        # several devices: the parent loads the model on the first only to write the
        # self-answer samples, and frees it before the workers start
        loaded = load_for_profile(model, cfg.dtype, device_list[0])
    tokenizer = None if given else _tokenizer(model)
    sample_sets = {
        n: calib_mod.load_samples(calib, tokenizer, n, cfg.samples, cfg.seed, cfg.loss, mix, loaded)
        for n in lengths
    }
    if own_model and len(device_list) > 1 and loaded is not None:
        loaded = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    counts = {n: len(s) for n, s in sample_sets.items()}
    calib_hash = calib_mod.calibration_hash(sample_sets)
    version = METHOD_VERSION if cfg.method == "gradient" else measured_mod.METHOD_VERSION
    result_fields = cfg.result_fields()
    args = {
        "method_version": version,
        "model": identity.to_dict(),
        "calibration_hash": calib_hash,
        "samples": {str(n): c for n, c in counts.items()},
        **result_fields,
    }
    resumed = store.prepare_folder(out, args, overwrite)
    if not (out / store.CALIB).is_file():
        store.write_tensors(out / store.CALIB, calib_mod.to_tensors(sample_sets))

    jobs = [(n, i) for n in lengths for i in range(counts[n])]
    done = store.done_jobs(out, jobs)
    todo = [j for j in jobs if j not in done]
    bar = tqdm(
        total=len(jobs), initial=len(done), desc="profile", unit="sample", disable=not progress
    )
    try:
        if todo and len(device_list) > 1:
            _run_parallel((str(model), cfg, identity.head_dim), device_list, todo, out, bar)
        elif todo or cfg.storage is not None:
            if cfg.method == "measured":
                engine = AblationEngine(loaded, **cfg.measure.as_dict())

                def run_one(n: int, i: int) -> None:
                    measured_mod.run_job(engine, sample_sets[n][i], cands, n, i, out)
            else:
                recorder = _recorder(cands, cfg.block_size, cfg.tile_rows, cfg.sparq_rows)

                def run_one(n: int, i: int) -> None:
                    run_job(
                        loaded, sample_sets[n][i], n, i, recorder, out, cfg.gradient_checkpointing
                    )

            if cfg.storage is not None:
                key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:32]
                _run_shared(cfg.storage, key, jobs, out, bar, run_one)
            else:
                for n, i in todo:
                    bar.set_postfix(length=n, sample=i)
                    run_one(n, i)
                    bar.update(1)
    finally:
        bar.close()

    blocks = None
    if cfg.method == "measured":
        table = measured_mod.build_table(out, lengths, counts, cands, identity.head_dim)
    else:
        table = build_table(
            out, lengths, counts, cands, identity.num_key_value_heads, identity.head_dim
        )
    table = count_against_windows(table, identity.native_windows, identity.head_dim)
    store.atomic_write(out / "profile.parquet", lambda tmp: table.to_parquet(tmp, index=False))
    validation = None
    if cfg.method == "gradient":
        blocks = mean_blocks(out, lengths, counts)
        store.write_tensors(
            out / "influence.safetensors",
            blocks,
            {"block_size": str(cfg.block_size), "lengths": ",".join(map(str, lengths))},
        )
        if cfg.validate > 0:
            if loaded is None:
                loaded = load_for_profile(model, cfg.dtype, device_list[0])
            validation = _maybe_validate(loaded, cfg, out, table, sample_sets, progress)
    measured = cfg.method == "measured"
    jobs_meta = [store.read_tensors_metadata(store.checkpoint_path(out, *j)) for j in jobs]
    meta = {
        "method_version": version,
        "model": identity.to_dict(),
        "calibration": {
            "source": "given tokens" if given else "built-in" if calib is None else str(calib),
            "hash": calib_hash,
            "loss": cfg.loss,
            "n_samples": counts,
        },
        **result_fields,
        "primary_estimator": "measured kl, weighted" if measured else PRIMARY,
        "measure": result_fields.get("measure"),
        "weights": measured_mod.DEFAULT_WEIGHTS if measured else None,
        "tasks": measured_mod.task_counts(out, lengths, counts) if measured else None,
        "devices": _used_devices(loaded, device_list),
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "elapsed_s": round(sum(float(m.get("seconds", 0)) for m in jobs_meta), 3),
        "wall_s_last_run": round(time.perf_counter() - wall, 3),
        "resumed": resumed,
        "peak_memory_bytes": max(int(m.get("peak_bytes", 0) or 0) for m in jobs_meta),
        "spearman": validation.get("spearman") if validation else None,
        "validation": {k: v for k, v in validation.items() if k != "records"}
        if validation
        else None,
        "config": _jsonable(cfg),
    }
    store.write_json(out / "meta.json", meta)
    if cfg.plots:
        from moa_search.profile import plots as plots_mod  # noqa: PLC0415

        heatmap = plots_mod.measured_heatmap if measured else plots_mod.sensitivity_heatmap
        heatmap(table, out / "plots" / "sensitivity_heatmap.png")
        if blocks is not None:
            plots_mod.influence_distance(
                blocks[f"distance.{lengths[-1]}"],
                cfg.block_size,
                out / "plots" / "influence_distance.png",
            )
    if validation and progress:
        print(
            f"validation: Spearman(predicted, measured) = {validation['spearman']} over "
            f"{validation['pairs']} single-head ablations at length {validation['length']}",
            file=sys.stderr,
        )
    return ProfileResult(out, table, meta)


def _jsonable(cfg: ProfileConfig) -> dict[str, Any]:
    """The config as meta.json stores it (sequences as lists, the rest as given)."""
    data = asdict(cfg)
    for key, value in data.items():
        if isinstance(value, tuple):
            data[key] = list(value)
    return data


def _maybe_validate(
    model: torch.nn.Module,
    cfg: ProfileConfig,
    out: Path,
    table: pd.DataFrame,
    sample_sets: dict[int, list[calib_mod.Sample]],
    progress: bool,
) -> dict[str, Any]:
    """Run (or reuse from validation.json) the single-head ablation check."""
    m, seed = cfg.validate, cfg.seed
    path = out / "validation.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("m") == m and old.get("seed") == seed:
            return old
    from moa_search.profile.validate import validate_profile  # noqa: PLC0415

    length = cfg.lengths[0]
    try:
        result = validate_profile(model, sample_sets[length], table, length, m, seed, progress)
    except torch.OutOfMemoryError:
        raise MoaSearchError(_oom_message(model.device, length)) from None
    result.update(m=m, seed=seed)
    store.write_json(path, result)
    return result
