#!/usr/bin/env bash
# Ablation: TFMQ-DM with and without Temporal Information Aware Reconstruction, at W4A8.
# NEEDS A SWITCH: the code has none. tfmq_exp/methods/reconstruction.py tfmq() always runs
# tiar_stage, and conf/quantizer/tfmq.yaml has no option for it. Once an option exists
# (`options.tiar: true` in conf/quantizer/tfmq.yaml, read by tfmq(); what the Temporal Information
# Block gets instead when it is false is that switch's design), this script runs the sweep; until
# then it stops here with exit status 1.
source "$(dirname "$0")/common.sh"

if ! grep -Eq '^\s*tiar:' conf/quantizer/tfmq.yaml; then
    echo "error: TIAR on/off needs a switch the code does not have (quantizer.options.tiar). Fix: add it to" \
         "conf/quantizer/tfmq.yaml and tfmq_exp/methods/reconstruction.py, then rerun this script." >&2
    exit 1
fi

multirun runs quantizer=tfmq bits=w4a8 quantizer.options.tiar=true,false "seed=$SEEDS"

table --by quantizer.options.tiar
