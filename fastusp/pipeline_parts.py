"""The parts of a pipeline around its transformer: the VAE (decoded and encoded in row bands over the ranks) and the
text encoders (on one rank, embeddings broadcast)."""
from __future__ import annotations

import torch

from .agreement import Fingerprint, check_same_on_every_rank
from .text_encoder import apply_text_encoder_rank
from .vae import apply_parallel_vae


def apply_pipeline_parts(pipe, device: torch.device, *, parallel_vae: bool, text_encoder_rank: int | None) -> None:
    """parallel_vae: split the VAE's decode and encode over all ranks (vae/parallel_vae.py). text_encoder_rank:
    None (every rank encodes its prompts), or the rank that runs the text encoders (text_encoder.py). Both must be
    the same on every rank (checked: a rank decoding alone would wait for the others forever)."""
    if not isinstance(parallel_vae, bool):
        raise ValueError(f"parallel_vae must be True or False, got {parallel_vae!r}")
    fingerprint = Fingerprint()
    fingerprint.add("parallel_vae", parallel_vae)
    fingerprint.add("text_encoder_rank", text_encoder_rank)
    check_same_on_every_rank(fingerprint, "the pipeline options of fastusp.parallelize",
                             "every rank must pass the same parallel_vae and text_encoder_rank", device)
    if parallel_vae and getattr(pipe, "vae", None) is not None:
        apply_parallel_vae(pipe.vae)
    if text_encoder_rank is not None:
        apply_text_encoder_rank(pipe, text_encoder_rank)
