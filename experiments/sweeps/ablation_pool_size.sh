#!/usr/bin/env bash
# Ablation: size of the weight-reconstruction pool (recon.pool_size; default 1024) for TFMQ-DM at W4A8.
# The pool takes pool_size // calib_steps samples of each pool step, and the calibration record holds
# calib.n_trajectories (256) per step: 4096 / 16 = 256 is the largest that fits the default record.
# A recipe's quantizer.options.pool_size_factor scales recon.pool_size (only the SD recipes set one); the
# pool a run really used is results.json method_info.pool_size (build_table.py --by method_info.pool_size).
source "$(dirname "$0")/common.sh"

multirun runs quantizer=tfmq bits=w4a8 recon.pool_size=256,512,1024,2048,4096 "seed=$SEEDS"

table --by recon.pool_size
