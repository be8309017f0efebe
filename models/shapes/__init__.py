"""The embedded default model: a small Stable Diffusion trained on drawn shapes."""
