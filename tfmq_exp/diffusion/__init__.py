"""Samplers over the training noise schedule, and one-pass calibration-data collection."""
