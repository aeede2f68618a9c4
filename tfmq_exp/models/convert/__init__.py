"""Converters from the original CompVis / ermongroup checkpoints to diffusers modules.

One module per original family, each with ``build(params)`` (the empty diffusers module for the
original config params) and ``convert(state, params)`` (original keys -> that module's keys,
checked for completeness and shapes by :class:`~tfmq_exp.models.convert.keymap.KeyMap`):
``ldm_unet`` (openaimodel UNet, incl. SpatialTransformer), ``ddim_model`` (ddim ``Model``),
``first_stage`` (VQ-f4 / KL-f8), ``class_embedder`` (cin256-v2), ``clip_text`` (SD v1).
"""
