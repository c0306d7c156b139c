"""Diffusion pipelines: ``generate`` (txt2img, img2img), ``inpaint``, ``remove_object``, ``outpaint``.

- ``loader``: the model layer (``DiffusionModels``): resolve a model in the store, load it once
  into the cache, run a diffusers call with progress, cancellation and LoRAs.
- ``params``: ``SamplingParams``, the parameters every pipeline shares, and the input checks.
- ``pipeline``: the base class of the pipelines and the steps that repaint a region.
- ``generate``, ``inpaint`` (inpaint and remove_object), ``outpaint``: one module per task.
- ``controlnet`` (generate's ControlNets: resolving, loading, the pipeline's keywords) and
  ``control_images`` (the control image of each ControlNet type, and its annotators).

Every pipeline validates all of its inputs before the model is loaded or the GPU touched, and
raises ``InvalidInput`` naming the field. Samples use seed, seed+1, ... each from its own
generator, so output ``i`` of a run is the same image as a one-sample run with ``seed + i``: a
caller can reproduce any single output.
"""

from __future__ import annotations

from inference.diffusion.generate import ImageGenerator
from inference.diffusion.inpaint import Inpainter, ObjectRemover
from inference.diffusion.loader import BACKEND, DiffusionModels, LoadedPipeline, ModelInfo
from inference.diffusion.outpaint import Outpainter
from inference.diffusion.params import MAX_LORAS, MAX_SAMPLES, MAX_STEPS, SCHEDULERS, SamplingParams
from inference.diffusion.pipeline import DiffusionPipeline

# task -> its pipeline class (each is built on the process's one ``DiffusionModels``)
PIPELINES: dict[str, type[DiffusionPipeline]] = {
    cls.task: cls for cls in (ImageGenerator, Inpainter, ObjectRemover, Outpainter)
}

__all__ = [
    "BACKEND",
    "MAX_LORAS",
    "MAX_SAMPLES",
    "MAX_STEPS",
    "PIPELINES",
    "SCHEDULERS",
    "DiffusionModels",
    "DiffusionPipeline",
    "ImageGenerator",
    "Inpainter",
    "LoadedPipeline",
    "ModelInfo",
    "ObjectRemover",
    "Outpainter",
    "SamplingParams",
]
