"""fastusp: Unified Sequence Parallelism (Ulysses + Ring) for diffusers' FLUX and Qwen-Image transformers."""
from .config import ParallelConfig
from .parallelize import parallelize
from .processors.flux import FastUSPFluxAttnProcessor
from .processors.qwen_image import FastUSPQwenImageAttnProcessor

__all__ = ["ParallelConfig", "parallelize", "FastUSPFluxAttnProcessor", "FastUSPQwenImageAttnProcessor"]
__version__ = "0.1.0"
