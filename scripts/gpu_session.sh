#!/usr/bin/env bash
# The GPU runs behind the README's numbers, on a machine without internet once
# scripts/gpu_model_transfer.sh has put the default model there (README: "On a GPU machine
# without internet"). Usage: scripts/gpu_session.sh STAGE OUTDIR, with STAGE one of
#   card        dense baseline card of smollm2-135m (512-8k ppl, 1k-8k retrieval)
#   quickstart  profile (2k, 4k) -> plan search -> eval (2k/4k/8k) in bf16 on the GPU
#   gputest     the profiler's kernel tests on the GPU (fused influence vs float64 brute force)
#   kernelbench benchmarks/influence_kernel.py (fused kernel vs SDPA fwd+bwd, launch tuning)
#   profcost    benchmarks/profile_cost.py, default model at 2k/4k/8k incl. the PyTorch path
#   profcost8b  benchmarks/profile_cost.py, Llama-3-8B-shaped random weights at 8k and 32k
#   multigpu    (2+ GPUs) one-GPU vs --devices cuda:0,cuda:1 vs --device auto profiles
# Wheels copied into .whl/ (what the machine lacks, e.g. optuna) and moa-search itself are
# installed without an index; the editable install maps moa_search.kernels to kernels/.
set -euo pipefail
stage=$1
out=$2
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps .whl/*.whl
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
case "$stage" in
    card)
        python3 cli.py card --dtype bfloat16 --device cuda \
            --ppl-lengths 512,1024,2048,4096,8192 --ppl-windows 3 \
            --ret-lengths 1024,2048,4096,8192 --depths 0.1,0.5,0.9 --n 10 --out "$out/card"
        ;;
    quickstart)
        # kv-retrieval is left out: the dense 135M model itself fails it (baseline card)
        python3 cli.py quickstart --out "$out/qs" --device cuda --dtype bfloat16 \
            --profile-lengths 2048,4096 --profile-samples 8 --full-grid --fidelity exact \
            --trials 200 --eval-lengths 2048,4096,8192 --eval-samples 6 --depths 0.1,0.5,0.9 \
            --tasks ppl,passkey --baselines dense,window,elastic
        rm -rf "$out/qs/profile/checkpoints"
        ;;
    gputest)
        python3 -m pytest -q -p no:cacheprovider tests/kernels/test_influence_kernel.py \
            tests/profile/test_influence.py tests/profile/test_sparq_estimate.py 2>&1 | tail -15
        ;;
    kernelbench)
        python3 benchmarks/influence_kernel.py --tune --out "$out/influence_kernel.csv" \
            --shapes 9x3x64@2048,9x3x64@8192,32x8x128@8192
        python3 benchmarks/influence_kernel.py --no-torch --out "$out/influence_kernel_32k.csv" \
            --shapes 32x8x128@32768
        ;;
    profcost)
        python3 benchmarks/profile_cost.py --out "$out/profile_cost_small.csv" --compare-torch \
            --cases smollm2-135m@2048,smollm2-135m@4096,smollm2-135m@8192
        ;;
    multigpu)
        # the same profile on one GPU, data-parallel on two, and sharded (device_map=auto)
        common="--lengths 2048 --samples 4 --dtype bfloat16 --no-plots"
        python3 cli.py profile $common --device cuda:0 --out /tmp/mg/one
        python3 cli.py profile $common --devices cuda:0,cuda:1 --out /tmp/mg/dp
        python3 cli.py profile $common --device auto --out /tmp/mg/auto
        python3 - <<'PY' | tee "$out/multigpu.txt"
import json
import pandas as pd
base = pd.read_parquet("/tmp/mg/one/profile.parquet")["delta_loss_mean"]
for name in ("dp", "auto"):
    other = pd.read_parquet(f"/tmp/mg/{name}/profile.parquet")["delta_loss_mean"]
    rel = ((other - base).abs() / base.abs().clip(lower=1e-9)).max()
    meta = json.load(open(f"/tmp/mg/{name}/meta.json"))
    print(name, "devices", meta["devices"], "max rel diff vs one GPU", f"{rel:.2e}")
PY
        ;;
    profcost8b)
        python3 benchmarks/profile_cost.py --out "$out/profile_cost_8b.csv" \
            --cases llama3-8b-shape@8192,llama3-8b-shape@32768
        ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
