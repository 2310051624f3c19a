"""Training SAFN: local epochs (shared by every engine) and centralised cross-validation."""
