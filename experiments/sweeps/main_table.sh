#!/usr/bin/env bash
# Main table: FP and every method at W8A8 and W4A8, three seeds each, on the embedded model
# (model=mnist, the default): 3 FP + 4 x 2 x 3 = 27 runs of a few minutes each on 2 CPU cores.
# The FP runs are their own sweep: bits do not change FP, and one sweep over bits would repeat them.
#
#   bash experiments/sweeps/main_table.sh
#   EXTRA="model=mnist_ldm" bash experiments/sweeps/main_table.sh     # the conditional latent model
source "$(dirname "$0")/common.sh"

multirun fp quantizer=fp "seed=$SEEDS"
multirun quant quantizer=rtn,brecq,qdiff,tfmq bits=w8a8,w4a8 "seed=$SEEDS"

table
