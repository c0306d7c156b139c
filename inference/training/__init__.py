"""LoRA training for Stable Diffusion 1.x/2.x models: a pure engine library.

``train_lora`` trains a LoRA on a diffusers folder from captioned images and writes it in the
diffusers LoRA layout, with checkpoints to resume from and a memory estimate to refuse a run
that cannot fit before anything is loaded. Like every engine it touches no database, broker or
web framework: the ``train_lora`` task's adapter calls it with decoded inputs and a
``RunControl``.

- ``params``: the config, the outcome, precision and the memory estimate;
- ``data``: the examples, image preparation and the seeded batch order;
- ``loading``: loading the folder's models, encoding the examples, adding the adapters;
- ``checkpoints``: atomic checkpoints identified by a fingerprint of the run;
- ``lora``: the loop and the final save.
"""

from inference.training.data import TrainingExample
from inference.training.lora import train_lora
from inference.training.params import LoraTrainingConfig, TrainingOutcome, estimate_training_bytes

__all__ = [
    "LoraTrainingConfig",
    "TrainingExample",
    "TrainingOutcome",
    "estimate_training_bytes",
    "train_lora",
]
