"""Datasets the models are trained on and evaluated against."""
