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
OUTPAINT_ALIGN_ALIASES = {
    "topmiddle": "top",
    "middleleft": "left",
    "middleright": "right",
    "bottommiddle": "bottom",
    "center": "middle",
}
