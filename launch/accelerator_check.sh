#!/usr/bin/env bash
# The accelerator check on a fresh NVIDIA GPU machine, in one go (docs/benchmarks.md).
#
#   bash launch/accelerator_check.sh [OUT_DIR]          # from a checkout of this repository
#
# Makes a virtual environment (.venv-gpu), installs jax[cuda12] pinned to the project's jax version
# and the project, then:
#   1. the train_step and inference suites in accelerator mode (B0 and B2 at 64x64, B0 at 224x224,
#      bf16: images/s per chip, step time, MFU), the pipeline suite (the host input path against a
#      bare read+decode loop) and the loop suite (the whole training loop against the bare step);
#   2. a 300-step training run of configs/accelerator.py:b0_64 (bf16, batch 1024, augmentation on
#      the device): images/s and MFU of the trainer's own log windows.
# Writes the table to OUT_DIR/accelerator_check.md, plus bench_gpu.{json,md} and a log (OUT_DIR
# defaults to bench_gpu). Sized for under 8 minutes once installed (mostly XLA compilation); not yet
# timed on a GPU. Installing takes a few more.
#
# Environment:
#   WITH_TORCH=1   also install PyTorch (the project's `bench` extra; PyPI's Linux wheel is the CUDA
#                  build, a multi-GB download) and measure the PyTorch eager CUDA baseline.
#   PROFILE=1      trace the timed train steps into OUT_DIR/profile (view: xprof --logdir ...).
#   PYTHON=...     the interpreter for the venv (default python3; needs >= 3.11).
#   VENV=...       the venv directory (default .venv-gpu; reused when present).
set -euo pipefail

cd "$(dirname "$0")/.."
out="${1:-bench_gpu}"
python="${PYTHON:-python3}"
venv="${VENV:-.venv-gpu}"
mkdir -p "$out"
log="$out/bench_gpu.log"

jax_version="$("$python" - <<'EOF'
import tomllib
with open("pyproject.toml", "rb") as f:
  deps = tomllib.load(f)["project"]["dependencies"]
print(next(d.split("==")[1] for d in deps if d.startswith("jax==")))
EOF
)"

if [[ ! -x "$venv/bin/python" ]]; then
  "$python" -m venv "$venv"
fi
extras="."
if [[ "${WITH_TORCH:-0}" == "1" ]]; then
  extras=".[bench]"
fi
echo "Installing jax[cuda12]==$jax_version and $extras into $venv ..."
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet "jax[cuda12]==$jax_version" -e "$extras"

{
  echo "== $(date -u +%FT%TZ) $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
} | tee "$log"
"$venv/bin/python" - <<'EOF' 2>&1 | tee -a "$log"
import jax
print("JAX", jax.__version__, "devices:", jax.devices())
if jax.default_backend() == "cpu":
  raise SystemExit("error: JAX sees no GPU (check the NVIDIA driver and `pip list | grep cuda`)")
EOF

flags=(--suites=train_step,inference,pipeline,loop --bench_mode=accelerator
       --out="$out/bench_gpu.json" --markdown_out="$out/bench_gpu.md")
if [[ "${PROFILE:-0}" == "1" ]]; then
  flags+=(--profile_dir="$out/profile")
fi
if [[ "${WITH_TORCH:-0}" == "1" ]]; then
  # JAX would otherwise take 75% of the GPU memory up front and leave PyTorch little.
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
fi
start=$SECONDS
"$venv/bin/python" -m wikitopics_jax.bench "${flags[@]}" 2>&1 | tee -a "$log"

# A short real training run: the trainer's own images/s and MFU (its metrics.jsonl).
workdir="$out/train_b0_64"
rm -rf "$workdir"
"$venv/bin/wikitopics" train --config configs/accelerator.py:b0_64 --workdir "$workdir" \
    --config.num_train_steps=300 --config.eval_every_steps=300 --config.thresholds.tune=False \
    2>&1 | tee -a "$log"
cp "$out/bench_gpu.md" "$out/accelerator_check.md"
"$venv/bin/python" -m wikitopics_jax.bench.training_run "$workdir" \
    "configs/accelerator.py:b0_64, 300 steps" --append_to="$out/accelerator_check.md" | tee -a "$log"
echo "Done in $((SECONDS - start)) s: $out/accelerator_check.md, $out/bench_gpu.json, $log" | tee -a "$log"
