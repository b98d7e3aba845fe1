"""offload: run Mixture-of-Experts LLMs with a bounded expert cache."""
