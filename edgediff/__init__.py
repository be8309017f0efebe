"""edgediff: Stable Diffusion exported once, run without PyTorch."""

__version__ = "0.1.0"
