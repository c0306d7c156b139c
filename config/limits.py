"""Input limits shared by the API's payload schemas (``tasks/payloads/``) and the engines
(``inference/``), so the API refuses with a 422 exactly what an engine would refuse later.

Plain constants, stdlib only: the API process imports them without importing any engine.
"""

from __future__ import annotations

# -- scan_objects ---------------------------------------------------------------------------------
# The most objects one image yields: the payload's ``max_objects`` cap, and the detections per
# image the worker builds its detector with.
SCAN_MAX_OBJECTS = 300

# -- diffusion (generate, inpaint, remove_object, outpaint) ---------------------------------------
DIFFUSION_MAX_PROMPT_CHARS = 2000
DIFFUSION_MAX_STEPS = 100
DIFFUSION_MAX_SAMPLES = 8
DIFFUSION_MAX_LORAS = 5
DIFFUSION_MAX_LORA_WEIGHT = 2.0
DIFFUSION_MAX_CFG_SCALE = 30.0
DIFFUSION_MAX_SEED = 2**32 - 1
DIFFUSION_MIN_SIDE = 64
# The largest generated side on any model (an engine may allow less: 3x its training size).
DIFFUSION_MAX_SIDE = 2048
# generate's ``controlnets``: at most three at once (the SenseTime seed's limit too), each of a
# type that has a local preprocessor (inference/diffusion/control_images.py), weighted 0-2.
DIFFUSION_MAX_CONTROLNETS = 3
CONTROLNET_TYPES = ("canny", "depth", "lineart", "openpose", "tile")
# The types whose control image a model of the store makes (an ``annotator``): without one
# installed, such a ControlNet needs ``preprocessed: true`` (a 422 naming its type otherwise).
CONTROLNET_ANNOTATED_TYPES = ("depth", "openpose")
DIFFUSION_MAX_CONTROLNET_SCALE = 2.0

# Where outpaint puts the original. The SenseTime seed (001) spells the edges' middles
# topmiddle / middleleft / middleright / bottommiddle; both spellings are accepted.
OUTPAINT_ALIGNS = (
    "topleft",
    "top",
    "topright",
    "left",
    "middle",
    "right",
    "bottomleft",
    "bottom",
    "bottomright",
)
# outpaint's free extension: pixels added on each side (the canvas stays within the engines'
# largest side, 6000 px, the seeds' largest input).
OUTPAINT_SIDES = ("left", "right", "top", "bottom")
OUTPAINT_MAX_EXTEND = 6000
OUTPAINT_ALIGN_ALIASES = {
    "topmiddle": "top",
    "middleleft": "left",
    "middleright": "right",
    "bottommiddle": "bottom",
    "center": "middle",
}
