# Sourced by the sweep scripts beside it: where the runs go and how the commands are run.
#
#   SEEDS=0,1,2             seeds of every cell (the table's n)
#   EXTRA="recon=smoke"     overrides added to every job (e.g. evaluator=none for a dry pass)
#   SWEEP_ROOT=multirun     parent of the sweep folders (as conf/config.yaml hydra.sweep.dir)
#   OUT=DIR                 this sweep's folder (default: $SWEEP_ROOT/<script name>/<date_time>)
#   PYTHON=python           the interpreter with tfmq_exp installed
#   DRY_RUN=1               print the commands, run nothing
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python}"
SEEDS="${SEEDS:-0,1,2}"
SWEEP_ROOT="${SWEEP_ROOT:-multirun}"
NAME="$(basename "$0" .sh)"
OUT="${OUT:-$SWEEP_ROOT/$NAME/$(date +%Y-%m-%d_%H-%M-%S)}"
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"

FAILED=0

# multirun SUBDIR OVERRIDE...: one Hydra multirun into $OUT/SUBDIR (numbered job folders 0, 1, ...).
# Hydra runs the jobs in the order of the product of the sweeps, the last swept key varying fastest,
# and stops at the first job that fails: its folder keeps the INCOMPLETE marker, build_table skips it.
# The script goes on to the table of what finished, and exits 1 at the end.
multirun() {
    local sub="$1"
    shift
    local cmd=("$PYTHON" -m tfmq_exp -m "$@" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} "hydra.sweep.dir=$OUT/$sub")
    echo "+ ${cmd[*]}"
    if [ -n "${DRY_RUN:-}" ]; then return 0; fi
    if ! "${cmd[@]}"; then
        echo "warning: the sweep into $OUT/$sub stopped at a failed job (see the error line above);" \
             "the table has the jobs that finished" >&2
        FAILED=1
    fi
}

# table BUILD_TABLE_ARGS...: the sweep's table, Markdown (printed) and LaTeX, written into $OUT;
# the last step of every script (exit status 1 if a sweep failed, 2 if no run finished).
table() {
    local md=("$PYTHON" experiments/build_table.py "$OUT" "$@" --out "$OUT/table.md")
    local tex=("$PYTHON" experiments/build_table.py "$OUT" "$@" --latex --out "$OUT/table.tex")
    echo "+ ${md[*]}"
    echo "+ ${tex[*]}"
    if [ -n "${DRY_RUN:-}" ]; then return 0; fi
    "${md[@]}"
    "${tex[@]}" > /dev/null
    exit "$FAILED"
}
