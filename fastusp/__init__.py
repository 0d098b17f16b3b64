"""fastusp: Unified Sequence Parallelism (Ulysses + Ring) for diffusers' FLUX, FLUX.2 and Qwen-Image transformers."""
from .compile import CompileReport, compile_pipeline, compile_report
from .config import ParallelConfig
from .follow import follow, lead
from .parallelize import parallelize, unparallelize
from .models.flux import FastUSPFluxAttnProcessor
from .models.flux2 import FastUSPFlux2AttnProcessor, FastUSPFlux2ParallelSelfAttnProcessor
from .models.qwen_image import FastUSPQwenImageAttnProcessor
from .quantization import quantize

__all__ = ["ParallelConfig", "parallelize", "unparallelize", "lead", "follow", "compile_pipeline", "quantize",
           "compile_report", "CompileReport", "FastUSPFluxAttnProcessor", "FastUSPFlux2AttnProcessor",
           "FastUSPFlux2ParallelSelfAttnProcessor", "FastUSPQwenImageAttnProcessor"]
__version__ = "0.1.0"
