"""Data with a closed-form denoiser, to test samplers without training noise (see ``gaussian_vp.py``)."""
