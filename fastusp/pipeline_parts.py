"""The parts of a pipeline around its transformer: the VAE (decoded and encoded in row bands over the ranks) and the
text encoders (on one rank, embeddings broadcast)."""
from __future__ import annotations

from .text_encoder import apply_text_encoder_rank, check_text_encoder_rank
from .vae import apply_parallel_vae


def pipeline_options(obj, transformer, *, parallel_vae: bool, text_encoder_rank: int | None) -> dict:
    """parallelize's options for the parts around the transformer, checked before anything is changed; the ranks
    compare them with the other settings (a rank decoding alone would wait for the others forever)."""
    if not isinstance(parallel_vae, bool):
        raise ValueError(f"parallel_vae must be True or False, got {parallel_vae!r}")
    if text_encoder_rank is not None:
        if obj is transformer:
            raise ValueError("text_encoder_rank places a pipeline's text encoders: pass the pipeline, not the "
                             "transformer")
        check_text_encoder_rank(obj, text_encoder_rank)
    return dict(parallel_vae=parallel_vae, text_encoder_rank=text_encoder_rank)


def apply_pipeline_parts(pipe, *, parallel_vae: bool, text_encoder_rank: int | None) -> None:
    """parallel_vae: split the VAE's decode and encode over all ranks (vae/parallel_vae.py). text_encoder_rank:
    None (every rank encodes its prompts), or the rank that runs the text encoders (text_encoder.py)."""
    if parallel_vae and getattr(pipe, "vae", None) is not None:
        apply_parallel_vae(pipe.vae)
    if text_encoder_rank is not None:
        apply_text_encoder_rank(pipe, text_encoder_rank)
