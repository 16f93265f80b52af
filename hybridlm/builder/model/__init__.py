"""The model: block kinds, the HybridLM module, its init, and its accounting."""
