"""Real small models for CPU work without the hub (SmolLM2-135M-Instruct from a PyPI wheel)."""
