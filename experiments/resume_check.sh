#!/usr/bin/env bash
# The issue's reviewer scenario: a 4-job multirun with logger=wandb (offline), killed (SIGKILL) while the
# second job reconstructs, rerun with the same command into the same folder: 4 complete runs (the finished
# job not redone, the killed one resumed from its last unit under the same W&B run id), then the table.
# Made on this machine: the rerun logged "resuming: 9 finished unit(s)", 4 complete runs, 5 offline W&B
# folders of 4 run ids (the resumed job has two folders of one id, one run after `wandb sync`).
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 TFMQ_CACHE=${CACHE:-multirun/resume_check_cache} WANDB_MODE=offline WANDB_SILENT=true
mkdir -p "$(dirname "${OUT:-multirun/resume_check}")"
CMD="python -m tfmq_exp -m quantizer=qdiff,tfmq seed=0,1 bits=w4a8 debug=smoke evaluator=none recon.iters=40 logger=wandb resume=true hydra.sweep.dir=${OUT:-multirun/resume_check}"
$CMD > ${OUT:-multirun/resume_check}_first.log 2>&1 &
PID=$!
# kill the sweep once the second job has finished a few units
for i in $(seq 1 2400); do
  n=$(ls ${OUT:-multirun/resume_check} 2>/dev/null | grep -c '^[0-9]')
  if [ "$n" -ge 2 ] && ls ${CACHE:-multirun/resume_check_cache}/resume/*/units.safetensors >/dev/null 2>&1 && [ -f ${OUT:-multirun/resume_check}/0/results.json ]; then
    sleep 3; kill -9 $PID; break
  fi
  sleep 0.1
done
wait $PID; echo "first sweep exit $?"
ls ${OUT:-multirun/resume_check}; for d in ${OUT:-multirun/resume_check}/[0-9]*; do echo "$d: $(ls $d | tr '\n' ' ')"; done
$CMD > ${OUT:-multirun/resume_check}_second.log 2>&1; echo "second sweep exit $?"
for d in ${OUT:-multirun/resume_check}/[0-9]*; do echo "$d: $(ls $d | tr '\n' ' ')"; grep -h "resuming\|already finished" $d/*.log 2>/dev/null | head -2; done
ls -d ${OUT:-multirun/resume_check}/*/wandb/offline-run-* | wc -l
python experiments/build_table.py ${OUT:-multirun/resume_check}
