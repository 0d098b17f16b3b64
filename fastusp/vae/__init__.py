"""Parallel VAE decode and encode: each rank computes a band of the image's rows, exactly (parallel_vae.py)."""
from .parallel_vae import SUPPORTED_VAES, apply_parallel_vae, remove_parallel_vae

__all__ = ["SUPPORTED_VAES", "apply_parallel_vae", "remove_parallel_vae"]
