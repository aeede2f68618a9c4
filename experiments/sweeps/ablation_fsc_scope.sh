#!/usr/bin/env bash
# Ablation: where TFMQ-DM's Finite Set Calibration puts per-step activation tables, at W4A8:
#   none  no tables: one range per activation quantizer over all steps
#   all   every activation quantizer (the official code; conf/quantizer/tfmq.yaml default)
#   tib   only the Temporal Information Block's inputs (the paper's text)
source "$(dirname "$0")/common.sh"

multirun runs quantizer=tfmq bits=w4a8 "quantizer.options.fsc_scope=none,all,tib" "seed=$SEEDS"

table --by quantizer.options.fsc_scope
