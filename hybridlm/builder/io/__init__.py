"""Model folders (save, load, check) and the import of mamba_ssm checkpoints."""
