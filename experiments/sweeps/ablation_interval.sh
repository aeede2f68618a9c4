#!/usr/bin/env bash
# Ablation: interval length of the weight pool for TFMQ-DM at W4A8. The pool steps are
# range(0, N, N // calib_steps) (TFMQ-DM's --interval_length is N // calib_steps): with the
# default N = 50 sampler steps, calib_steps 50, 25, 16, 8, 4 give intervals 1, 2, 3, 6, 12.
# The pool keeps recon.pool_size (1024) entries in all of them, spread over fewer steps.
source "$(dirname "$0")/common.sh"

multirun runs quantizer=tfmq bits=w4a8 quantizer.options.calib_steps=50,25,16,8,4 "seed=$SEEDS"

table --by quantizer.options.calib_steps
