#!/usr/bin/env bash
# Ablation: TFMQ-DM with and without Temporal Information Aware Reconstruction, at W4A8.
# quantizer.options.tiar=false reconstructs the temporal layers as the baselines do (the time MLP as
# single layers first, each time_emb_proj inside its block).
source "$(dirname "$0")/common.sh"

multirun runs quantizer=tfmq bits=w4a8 quantizer.options.tiar=true,false "seed=$SEEDS"

table --by quantizer.options.tiar
