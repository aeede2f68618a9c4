#!/usr/bin/env bash
# Ablation: where TFMQ-DM's Finite Set Calibration puts per-step activation tables, at W4A8:
#   all   every activation quantizer (the official code; conf/quantizer/tfmq.yaml default)
#   tib   only the Temporal Information Block's inputs (the paper's text)
#   none  no tables: one range per activation quantizer. NEEDS A SWITCH: quantizer.options.fsc_scope
#         accepts only all|tib (tfmq_exp/config.py QUANTIZER_OPTION_RULES, methods/reconstruction.py),
#         so "none" runs only once the code accepts it; until then this sweep has all and tib.
source "$(dirname "$0")/common.sh"

SCOPES=all,tib
if grep -Eq '"fsc_scope": \(choice\([^)]*"none"' tfmq_exp/config.py; then
    SCOPES=none,all,tib
else
    echo "note: quantizer.options.fsc_scope=none has no switch in the code yet; sweeping all,tib only" >&2
fi

multirun runs quantizer=tfmq bits=w4a8 "quantizer.options.fsc_scope=$SCOPES" "seed=$SEEDS"

table --by quantizer.options.fsc_scope
