"""tfmq-exp: post-training quantization experiments for diffusion models (TFMQ-DM, Q-Diffusion, BRECQ)."""

__version__ = "0.1.0"
