"""diffaccel: faster training and sampling for diffusion models."""

__version__ = "0.1.0"
