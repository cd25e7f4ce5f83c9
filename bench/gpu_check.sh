#!/usr/bin/env bash
# GPU check of dti_fast on a machine with one CUDA GPU and no network.
#
#   bash bench/gpu_check.sh OUTDIR
#
# Stages (each under `timeout`, all inside one overall budget; a failed stage
# does not stop the later ones, and the script exits non-zero at the end if any
# stage failed or was not run):
#   setup            pick a python with torch; install wheels from wheels/ (or
#                    $DTI_WHEELS) for packages that are missing, offline; install
#                    dti_fast (editable, no deps) so kernels/ imports as
#                    dti_fast.kernels
#   env              nvidia-smi and package versions -> OUTDIR/env.txt
#   tests            tests/test_optim.py, test_kernel.py, test_sphere.py on CUDA
#                    (TRITON_INTERPRET unset) -> OUTDIR/junit_tests.xml
#   bench_optimizer  bench/bench_optimizer.py -> OUTDIR/bench_optimizer.json
#                    (pytest-benchmark) and OUTDIR/optimizer_ratios.json
#   bench_trainer    bench/bench_trainer.py (SD 1.5 at 512 and SDXL at 1024,
#                    random weights at real sizes) -> OUTDIR/bench_trainer.json
#                    (pytest-benchmark) and OUTDIR/trainer_ratios.json (written
#                    after every run, so a timeout keeps what was measured)
#   recipe           opt-in (runs only when DTI_CHECK_STAGES names it; its own
#                    call): bench/bench_trainer.py's recipe and resume runs ->
#                    OUTDIR/recipe_ratios.json: SDXL concepts per hour with the
#                    paper's recipe (a 16-concept job of 6 steps at 768 px,
#                    extrapolated to 400 steps) and the resume difference of SD
#                    1.5 at 512 px with and without --deterministic
#   peer             opt-in (its own call): diffusers' textual_inversion.py run as
#                    is against dti-fast train, SD 1.5's architecture at 512 px,
#                    bf16, batch 4 (bench/compare_diffusers.py) ->
#                    OUTDIR/peer_ratios.json; needs the script under
#                    $DTI_DIFFUSERS_CHECKOUT (default peer/diffusers) and
#                    accelerate; DTI_PEER_ARGS: its flags
#   summary          bench/gpu_summary.py -> OUTDIR/summary.json: every goal, the
#                    measured figure, pass/fail, the device ("measured": false for
#                    a goal no stage measured)
#   world            opt-in (runs only when DTI_CHECK_STAGES names it; its own call,
#                    since the default stages fill the 8-minute budget): the toy
#                    world's base model built from scratch on the GPU and gated,
#                    bench/gpu_world.py -> OUTDIR/world_ratios.json (issue 16);
#                    DTI_WORLD_ARGS: its build-base flags
# The wheels the GPU image lacks (diffusers, bitsandbytes) come from
# bench/fetch_wheels.sh, run where the registry is reachable; carry wheels/.
# Everything printed also goes to OUTDIR/gpu_check.log; OUTDIR/summary.txt lists
# each stage's status, exit code and seconds.
#
# Environment:
#   PYTHON               python to use (default: the first of the repo's .venv,
#                        python3, python, /opt/torch/.venv/bin/python3 that
#                        imports torch, one that sees CUDA first)
#   DTI_WHEELS           folder of wheels to install offline (default: wheels/)
#   DTI_CHECK_BUDGET_S   overall budget in seconds (default 480: 8 minutes)
#   DTI_CHECK_STAGES     stages to run, space-separated (default: all; setup is
#                        always run first), e.g. "env bench_trainer"
#   DTI_BENCH_TARGET_S   timed seconds per benchmark (default here 0.5)
#   DTI_REQUIRE_CUDA=1   fail when no CUDA GPU is usable (default: a machine
#                        without any GPU runs everything on the CPU, with the
#                        CUDA-only cases skipped, and only warns; a GPU that
#                        nvidia-smi sees but torch cannot use always fails)
#
# To add a stage: write a function stage_NAME (it runs in a child bash under
# `timeout`, with REPO, OUTDIR, PY and the setup's exports available; a non-zero
# exit marks it failed) and append `add_stage NAME TIMEOUT_S` below.

set -uo pipefail

if [ $# -ne 1 ]; then
  echo "usage: bash bench/gpu_check.sh OUTDIR" >&2
  exit 2
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1" || exit 2
OUTDIR="$(cd "$1" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/dti_gpu_check.XXXXXX")"
STATE="$WORK/state.sh"   # exports the stages hand on (PY, PYTHONPATH, ...)
LOG="$OUTDIR/gpu_check.log"
BUDGET_S="${DTI_CHECK_BUDGET_S:-480}"
: >"$LOG"
: >"$STATE"
export REPO OUTDIR WORK STATE
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
cd "$REPO" || exit 2

log() { echo "[gpu_check $(date +%T)] $*" | tee -a "$LOG"; }

# -- stages ------------------------------------------------------------------------

STAGES=()
TIMEOUTS=()
OPTIONAL=" "
add_stage() { STAGES+=("$1"); TIMEOUTS+=("$2"); [ "${3:-}" = optional ] && OPTIONAL+="$1 "; }

stage_setup() {
  # 1. python: one that imports torch, preferring one that sees CUDA.
  local candidates=() c py=""
  if [ -n "${PYTHON:-}" ]; then
    candidates=("$PYTHON")   # named explicitly: that one or none
  else
    candidates=("$REPO/.venv/bin/python" python3 python /opt/torch/.venv/bin/python3)
  fi
  for want in cuda torch; do
    for c in "${candidates[@]}"; do
      command -v "$c" >/dev/null 2>&1 || continue
      if [ "$want" = cuda ]; then
        "$c" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1 || continue
      else
        "$c" -c "import torch" >/dev/null 2>&1 || continue
      fi
      py="$(command -v "$c")"
      break 2
    done
  done
  if [ -z "$py" ]; then
    echo "no python that imports torch among: ${candidates[*]}"
    return 1
  fi
  echo "python: $py ($("$py" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)'))"
  echo "export PY='$py'" >>"$STATE"

  # 2. offline wheels, only for distributions that are not installed.
  local wheels_dir="${DTI_WHEELS:-$REPO/wheels}" missing=() whl name
  if [ -d "$wheels_dir" ]; then
    for whl in "$wheels_dir"/*.whl; do
      [ -e "$whl" ] || continue
      name="$(basename "$whl" | cut -d- -f1)"
      if "$py" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$name" >/dev/null 2>&1; then
        echo "wheel $(basename "$whl"): $name already installed, skipped"
      else
        missing+=("$whl")
      fi
    done
    if [ ${#missing[@]} -gt 0 ]; then
      echo "installing ${#missing[@]} wheel(s): ${missing[*]##*/}"
      if ! "$py" -m pip install -q --no-index --no-deps "${missing[@]}"; then
        # Read-only environment: install beside it instead.
        echo "pip install into the environment failed; installing into $WORK/site"
        "$py" -m pip install -q --no-index --no-deps --target "$WORK/site" "${missing[@]}" || return 1
        echo "export PYTHONPATH='$WORK/site'\${PYTHONPATH:+:\$PYTHONPATH}" >>"$STATE"
        export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
      fi
    fi
  else
    echo "no wheels folder ($wheels_dir)"
  fi

  # 3. dti_fast from this checkout, with kernels/ as dti_fast.kernels.
  local check='import os, sys, dti_fast, dti_fast.kernels
root = os.path.realpath(sys.argv[1])
for m in (dti_fast, dti_fast.kernels):
    where = os.path.dirname(os.path.realpath(m.__file__))
    if not where.startswith(root + os.sep):
        sys.exit(f"{m.__name__} imports from {where}, not from {root}")
print("dti_fast", dti_fast.__version__, "from", os.path.dirname(dti_fast.__file__),
      "| kernels from", os.path.dirname(dti_fast.kernels.__file__))'
  if "$py" -c "$check" "$REPO" 2>/dev/null; then
    echo "dti_fast already installed from this checkout"
  elif "$py" -m pip install -q --no-index --no-deps --no-build-isolation -e "$REPO" && "$py" -c "$check" "$REPO"; then
    echo "dti_fast installed (editable)"
  else
    # Fallback without pip: a package folder of links, and no cwd on sys.path
    # (PYTHONSAFEPATH) so the checkout's own dti_fast/ (without kernels/) is not
    # found first.
    echo "editable install failed; using a link tree on PYTHONPATH"
    local shim="$WORK/shim/dti_fast" f
    mkdir -p "$shim"
    for f in "$REPO"/dti_fast/*; do ln -sfn "$f" "$shim/$(basename "$f")"; done
    ln -sfn "$REPO/kernels" "$shim/kernels"
    {
      echo "export PYTHONPATH='$WORK/shim'\${PYTHONPATH:+:\$PYTHONPATH}"
      echo "export PYTHONSAFEPATH=1"
    } >>"$STATE"
    export PYTHONSAFEPATH=1 PYTHONPATH="$WORK/shim${PYTHONPATH:+:$PYTHONPATH}"
    "$py" -c "$check" "$REPO" || return 1
  fi
  if "$py" -c "import triton" >/dev/null 2>&1; then
    "$py" -c "import dti_fast.kernels.spherical_sgd" || return 1
    echo "dti_fast.kernels.spherical_sgd imports"
  else
    echo "WARNING: triton does not import; the kernel cannot run"
  fi
}

stage_env() {
  local env_txt="$OUTDIR/env.txt" rc=0 gpu_seen=0
  {
    echo "# gpu_check $(date -u +%FT%TZ) on $(hostname)"
    echo "## nvidia-smi"
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi; then
      nvidia-smi -L >/dev/null 2>&1 && gpu_seen=1
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.limit,temperature.gpu,utilization.gpu --format=csv || true
    else
      echo "(nvidia-smi not available)"
    fi
    echo "## cpu"
    grep -m1 "model name" /proc/cpuinfo 2>/dev/null || true
    echo "cores: $(nproc 2>/dev/null)"
    echo "## checkout"
    if command -v git >/dev/null 2>&1 && git -C "$REPO" rev-parse HEAD >/dev/null 2>&1; then
      echo "commit $(git -C "$REPO" rev-parse HEAD)"
      git -C "$REPO" status --short | head -50
    else
      echo "(no git metadata)"
    fi
    echo "## python"
    "$PY" - <<'EOF'
import importlib.metadata as md, os, platform, sys
print("python", sys.version.replace("\n", " "), "at", sys.executable)
for name in ("torch", "triton", "numpy", "transformers", "pytest", "pytest-benchmark", "safetensors",
             "diffusers", "bitsandbytes", "hypothesis", "geoopt", "dti-fast"):
    try:
        print(f"{name:18s}{md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name:18s}MISSING")
import torch
print("torch.version.cuda", torch.version.cuda, "| cudnn", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available(), "| devices", torch.cuda.device_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device 0:", torch.cuda.get_device_name(0), f"cc {p.major}.{p.minor}", f"{p.total_memory / 2**30:.1f} GiB",
          f"{p.multi_processor_count} SMs")
print("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET"))
EOF
  } >"$env_txt" 2>&1 || rc=1
  cat "$env_txt"
  local cuda
  cuda="$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)"
  if [ "$cuda" != 1 ]; then
    if [ "$gpu_seen" = 1 ]; then
      echo "FAIL: nvidia-smi sees a GPU but torch.cuda.is_available() is False"
      return 1
    elif [ "${DTI_REQUIRE_CUDA:-0}" = 1 ]; then
      echo "FAIL: no CUDA GPU and DTI_REQUIRE_CUDA=1"
      return 1
    fi
    echo "WARNING: no CUDA GPU here: a CPU-only run, the kernel and copy cases are skipped"
  fi
  return $rc
}

stage_tests() {
  local files=(tests/test_optim.py tests/test_kernel.py tests/test_sphere.py) present=() absent=() f rc
  for f in "${files[@]}"; do
    if [ -f "$REPO/$f" ]; then present+=("$f"); else absent+=("$f"); fi
  done
  [ ${#absent[@]} -gt 0 ] && echo "MISSING test files: ${absent[*]}"
  [ ${#present[@]} -eq 0 ] && return 1
  env -u TRITON_INTERPRET "$PY" -m pytest "${present[@]}" -q -p no:cacheprovider \
    --junitxml="$OUTDIR/junit_tests.xml"
  rc=$?
  [ ${#absent[@]} -gt 0 ] && [ $rc -eq 0 ] && rc=1
  return $rc
}

stage_bench_optimizer() {
  env -u TRITON_INTERPRET DTI_BENCH_OUT="$OUTDIR/optimizer_ratios.json" \
    DTI_BENCH_TARGET_S="${DTI_BENCH_TARGET_S:-0.5}" \
    "$PY" -m pytest bench/bench_optimizer.py --benchmark-only -p no:cacheprovider \
    --benchmark-json="$OUTDIR/bench_optimizer.json" --benchmark-columns=min,median,max,rounds
}

stage_bench_trainer() {
  env -u TRITON_INTERPRET DTI_BENCH_OUT="$OUTDIR/trainer_ratios.json" \
    DTI_BENCH_RUNS="mfu baseline dti-1 dti-32 max-concurrent" \
    "$PY" -m pytest bench/bench_trainer.py --benchmark-only -p no:cacheprovider \
    --benchmark-json="$OUTDIR/bench_trainer.json" --benchmark-columns=min,rounds
}

stage_recipe() {
  # cuBLAS reads its workspace setting once per process: set before any CUDA work, so that the
  # deterministic runs are deterministic (harmless for the others).
  env -u TRITON_INTERPRET DTI_BENCH_OUT="$OUTDIR/recipe_ratios.json" DTI_BENCH_RUNS="recipe resume" \
    CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}" \
    "$PY" -m pytest bench/bench_trainer.py --benchmark-only -p no:cacheprovider \
    --benchmark-json="$OUTDIR/bench_recipe.json" --benchmark-columns=min,rounds
}

stage_summary() {
  "$PY" bench/gpu_summary.py "$OUTDIR"
}

stage_peer() {
  # diffusers' own examples/textual_inversion/textual_inversion.py, unchanged, against dti-fast's CLI on
  # the same model and photos (bench/compare_diffusers.py): the trainer goals against the peer itself.
  local checkout="${DTI_DIFFUSERS_CHECKOUT:-$REPO/peer/diffusers}"
  if [ ! -f "$checkout/examples/textual_inversion/textual_inversion.py" ]; then
    echo "no examples/textual_inversion/textual_inversion.py under $checkout: copy diffusers' script there"
    echo "(bench/README.md, 'the peer stage') and carry peer/, or set DTI_DIFFUSERS_CHECKOUT"
    return 1
  fi
  if ! "$PY" -c "import accelerate" >/dev/null 2>&1; then
    echo "accelerate does not import here and the script needs it: bash bench/fetch_wheels.sh puts its wheel"
    echo "(and psutil's and PyYAML's) in wheels/, which the setup stage installs"
    return 1
  fi
  # shellcheck disable=SC2086  # DTI_PEER_ARGS is a list of flags
  env -u TRITON_INTERPRET "$PY" bench/compare_diffusers.py --diffusers-checkout "$checkout" \
    --out "$OUTDIR/peer_ratios.json" --work "$WORK/peer" \
    ${DTI_PEER_ARGS:---model sd15 --resolution 512 --batch 4 --precision bf16 --steps 50 --threads 8 --rounds 2 --job-concepts 32 --job-script-runs 2}
}

stage_world() {
  # Sized for an H100/H200 (issue 16 asks 3 minutes there); the CPU default build is 4200 steps.
  # shellcheck disable=SC2086  # DTI_WORLD_ARGS is a list of flags
  env -u TRITON_INTERPRET "$PY" bench/gpu_world.py "$OUTDIR" ${DTI_WORLD_ARGS:---steps 12000 --threads 8 --unet-threads 8}
}

add_stage setup 120
add_stage env 60
add_stage tests 150
add_stage bench_optimizer 150
add_stage bench_trainer 240
add_stage recipe 300 optional
add_stage peer 420 optional
add_stage world 420 optional
add_stage summary 30

# -- runner --------------------------------------------------------------------------

if [ -n "${DTI_CHECK_STAGES:-}" ]; then
  wanted=" setup $DTI_CHECK_STAGES "
  kept=() kept_t=()
  for i in "${!STAGES[@]}"; do
    if [[ "$wanted" == *" ${STAGES[$i]} "* ]]; then kept+=("${STAGES[$i]}"); kept_t+=("${TIMEOUTS[$i]}"); fi
  done
  STAGES=("${kept[@]}") TIMEOUTS=("${kept_t[@]}")
else  # the default run leaves out the opt-in stages
  kept=() kept_t=()
  for i in "${!STAGES[@]}"; do
    if [[ "$OPTIONAL" != *" ${STAGES[$i]} "* ]]; then kept+=("${STAGES[$i]}"); kept_t+=("${TIMEOUTS[$i]}"); fi
  done
  STAGES=("${kept[@]}") TIMEOUTS=("${kept_t[@]}")
fi
for name in "${STAGES[@]}"; do export -f "stage_$name"; done

start=$SECONDS
failed=0
summary=()
log "repo $REPO -> $OUTDIR (budget ${BUDGET_S}s)"
for i in "${!STAGES[@]}"; do
  name="${STAGES[$i]}"
  limit="${TIMEOUTS[$i]}"
  left=$((BUDGET_S - (SECONDS - start)))
  if [ "$name" = summary ]; then
    left=$(( left < limit ? limit : left ))  # the summary always runs: it reads what the others measured
  fi
  if [ "$left" -lt 15 ]; then
    log "stage $name: NOT RUN (budget spent)"
    summary+=("$(printf '%-18s %-8s rc=%-4s %5ss' "$name" "not-run" "-" 0)")
    failed=1
    continue
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "stage $name (timeout ${limit}s)"
  t0=$SECONDS
  timeout -k 10 "$limit" bash -c "set -uo pipefail; source \"\$STATE\"; cd \"\$REPO\"; stage_$name" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  dt=$((SECONDS - t0))
  if [ "$rc" -eq 0 ]; then
    status=ok
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status=timeout
    failed=1
  else
    status=FAILED
    failed=1
  fi
  log "stage $name: $status (rc $rc, ${dt}s)"
  summary+=("$(printf '%-18s %-8s rc=%-4s %5ss' "$name" "$status" "$rc" "$dt")")
done

{
  echo "gpu_check $(date -u +%FT%TZ): $([ $failed -eq 0 ] && echo PASS || echo FAIL) in $((SECONDS - start))s"
  printf '%s\n' "${summary[@]}"
} | tee "$OUTDIR/summary.txt" | tee -a "$LOG"
rm -rf "$WORK"
exit $failed
