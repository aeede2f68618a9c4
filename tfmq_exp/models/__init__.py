"""Model loading (diffusers as the zoo), architecture adapters and the embedded model."""
