"""blockdiff: block-diffusion LLMs from autoregressive checkpoints (LLaDA2.0 / LLaDA2.1 recipe)."""
__version__ = "0.1.0"
