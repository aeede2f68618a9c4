"""Block-wise reconstruction: cached unit inputs/targets, AdaRound weight rounding, LSQ step sizes.

The optimisation loops run under Lightning Fabric, so the same code runs on CPU, one GPU or
several (gradients all-reduced, each rank drawing its own mini-batches).
"""
