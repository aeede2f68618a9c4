#!/usr/bin/env bash
# Ablation: bit widths, Q-Diffusion against TFMQ-DM, from W8A32 down to W4A4. Bits are swept first
# (slowest), so W4A4, the setting most likely to fail (NaN samples), runs last: a failing job stops
# the multirun, and the table then has every other setting (the failed job is skipped as INCOMPLETE).
source "$(dirname "$0")/common.sh"

multirun runs bits=w8a32,w4a32,w8a8,w4a8,w4a4 quantizer=qdiff,tfmq "seed=$SEEDS"

table
