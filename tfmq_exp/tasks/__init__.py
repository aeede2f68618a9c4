"""The app's tasks: quantize, train, sample, evaluate."""
