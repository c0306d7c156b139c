"""What a model file is, read without loading it: the store's type detection, safetensors
headers, ONNX graph signatures and the background remover's segmentation family.

Stdlib only (torch is imported for the one format that needs it, a ``.pth`` state dict): the
CLI and the API read model files through here without loading any engine.
"""

from __future__ import annotations

import io
import json
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from config import limits
from inference.spandrel_files import EXTRA_ARCHES, extra_arches_available

# What the platform's tasks can do with each kind of model. A diffusers base model serves all
# four diffusion tasks through one loaded pipeline (see inference/diffusion/).
DIFFUSION_TASKS = ("generate", "inpaint", "remove_object", "outpaint", "stylize")
INPAINT_TASKS = ("inpaint", "remove_object", "outpaint")
MODEL_TYPES = (
    "diffusers",
    "lora",
    "realesrgan",
    "onnx",
    "detector",
    "controlnet",
    "annotator",
    "face_restorer",
    "lama",
    "builtin",
)
# LaMa (inference/lama.py, read by spandrel) erases the masked region in one forward pass.
LAMA_TASKS = ("remove_object",)
# A face restorer (GFPGAN, RestoreFormer, CodeFormer: inference/face_restore.py) restores the faces of an
# upscale's output and a face swap's swapped faces when the payload asks (``face_enhance``).
FACE_RESTORE_TASKS = ("upscale", "faceswap", "faceswap_multi")

# A ControlNet (a diffusers ``ControlNetModel`` folder) conditions ``generate`` on one kind of
# control image; the entry records which in ``extra["control_type"]``, from ``--control-type`` or
# read from the folder's, id's or repository's name (``sd-controlnet-canny``,
# ``control_v11p_sd15_openpose``). The order matters: "lineart" names hold no other type, and
# "pose" alone (``controlnet-pose``) means OpenPose.
CONTROL_TYPES = limits.CONTROLNET_TYPES
_CONTROL_TYPE_HINTS = (
    (re.compile(r"lineart", re.I), "lineart"),
    (re.compile(r"canny", re.I), "canny"),
    (re.compile(r"depth", re.I), "depth"),
    (re.compile(r"(open)?pose", re.I), "openpose"),
    (re.compile(r"tile", re.I), "tile"),
)

# ONNX files carry no declaration of their purpose; these name hints cover the models operators
# install for the platform's tasks. Anything else gets no tasks until the operator names them.
# ONNX super-resolution exports get no task: the upscale engine runs PyTorch weights through
# spandrel (inference/superres.py), so tagging them would list a model no job can run.
_ONNX_TASK_HINTS = ((re.compile(r"u2net|rmbg|birefnet|isnet|modnet|silueta", re.I), ("remove_background",)),)
# Pre- and post-processing presets of the background remover (inference/background.py PRESETS);
# an entry records its family in ``extra["family"]``, from ``--family`` or read from the file.
SEGMENTATION_FAMILIES = ("u2net", "birefnet", "rmbg")

# The InsightFace engine (inference/faceswap/insight.py) is three ONNX models, one per role; the
# entry records its role in ``extra["role"]`` so the worker can assemble the engine. Names are
# those of the insightface packs (buffalo_l's det_10g and w600k_r50, antelopev2's scrfd_10g and
# glintr100) and of inswapper_128. Only files in SCRFD's output layout fit the detector role
# (OpenCV's YuNet does not), and only inswapper fits the swapper role (SimSwap is another model).
FACE_SWAP_TASKS = ("faceswap", "faceswap_multi")
FACE_ROLES = {
    "face_detector": ("face_detect", *FACE_SWAP_TASKS),
    "face_recognizer": FACE_SWAP_TASKS,
    "face_swapper": FACE_SWAP_TASKS,
}
_ONNX_FACE_ROLE_HINTS = (
    (re.compile(r"inswapper", re.I), "face_swapper"),
    (re.compile(r"scrfd|retinaface|det_\d+|face_?det", re.I), "face_detector"),
    (re.compile(r"w600k|glint|arcface|webface|ms1m", re.I), "face_recognizer"),
)

_FAMILY_NAME_HINTS = (
    # RMBG-2.0 is BiRefNet trained by BRIA: BiRefNet's normalisation and logits, not RMBG-1.4's.
    (re.compile(r"birefnet|rmbg[-_.]?v?2", re.I), "birefnet"),
    (re.compile(r"rmbg|isnet", re.I), "rmbg"),
    (re.compile(r"u2net|u2netp|silueta", re.I), "u2net"),
)


class ModelStoreError(ValueError):
    """The operation on the store cannot be done (bad path, unknown type, duplicate id...)."""


@dataclass(frozen=True)
class Detected:
    type: str
    tasks: tuple[str, ...]
    base_model_type: str | None
    extra: dict[str, Any]


def detect_model(path: Path, type: str | None = None) -> Detected:
    """Work out what the files at ``path`` are: a diffusers pipeline folder, a diffusers
    ControlNet folder, a transformers depth-estimation folder (the depth annotator), a LoRA, a
    Real-ESRGAN ``.pth`` state dict, OpenPose's ``body_pose_model.pth`` (the openpose annotator)
    or an ONNX model. ``type`` forces the type (the files must
    still fit)."""
    if path.is_dir():
        if (path / "model_index.json").exists():
            found = _detect_diffusers(path)
        elif (config := _folder_config(path)) is not None and _is_controlnet(config):
            found = _detect_controlnet(path, config)
        elif config is not None and (depth := _depth_architecture(config)) is not None:
            found = Detected("annotator", ("generate",), None, {"annotates": "depth", "architecture": depth})
        else:
            loras = sorted(path.glob("*.safetensors"))
            if len(loras) != 1:
                raise ModelStoreError(
                    f"{path} is a folder without model_index.json (not a diffusers pipeline) and "
                    "without exactly one .safetensors file; pass the weight file itself"
                )
            found = detect_model(loras[0], type)
    elif path.suffix == ".onnx":
        found = detect_onnx(path)
    elif path.suffix in (".pth", ".pt", ".ckpt"):
        found = _detect_torch_state_dict(path)
    elif path.suffix == ".safetensors":
        found = _detect_safetensors(path)
    else:
        raise ModelStoreError(
            f"cannot tell what {path.name} is; supported: a diffusers folder, "
            ".safetensors LoRA, Real-ESRGAN or GFPGAN/RestoreFormer .pth, .onnx"
        )
    if type is not None and type != found.type:
        raise ModelStoreError(f"{path.name} looks like a {found.type!r} model, not {type!r}")
    return found


def _detect_diffusers(folder: Path) -> Detected:
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    cls_name = str(index.get("_class_name", ""))
    unet_config: dict[str, Any] = {}
    if (folder / "unet" / "config.json").exists():
        unet_config = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    in_channels = int(unet_config.get("in_channels", 4))
    cross_dim = unet_config.get("cross_attention_dim")
    if "XL" in cls_name:
        base = "sdxl"
    elif cls_name.startswith("StableDiffusion") and not cls_name.startswith("StableDiffusion3"):
        # SD 2.x shares SD 1.5's pipeline class; only its text width (1024) tells them apart.
        base = "sd2" if cross_dim == 1024 else "sd15"
    else:
        base = re.sub(r"(Inpaint|Img2Img)?Pipeline$", "", cls_name).lower() or "unknown"
    extra = {"pipeline_class": cls_name, "unet_in_channels": in_channels}
    return Detected("diffusers", diffusers_tasks(base, in_channels), base, extra)


def diffusers_tasks(base: str | None, in_channels: int) -> tuple[str, ...]:
    """The tasks a diffusers model serves, from its base and its UNet's input channels. The store
    applies it to entries it reads too, so a model added before a task existed serves it."""
    if base not in ("sd15", "sd2", "sdxl"):
        return ("generate",)
    if in_channels == 9:  # an inpainting model: it cannot denoise from text alone
        return INPAINT_TASKS
    if base == "sdxl":
        return DIFFUSION_TASKS
    return (*DIFFUSION_TASKS, "train_lora")  # one text encoder: what inference/training trains


def _folder_config(folder: Path) -> dict[str, Any] | None:
    """The folder's ``config.json`` (a single diffusers model or a transformers model), if any."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def is_model_folder(folder: Path) -> bool:
    """Whether ``folder`` is one model whose config is part of it (a ControlNet, a depth
    annotator), registered as the folder rather than as its weight file."""
    config = _folder_config(folder)
    return config is not None and (_is_controlnet(config) or _depth_architecture(config) is not None)


def _is_controlnet(config: dict[str, Any]) -> bool:
    return config.get("_class_name") == "ControlNetModel"


def _depth_architecture(config: dict[str, Any]) -> str | None:
    """The transformers depth-estimation class a folder holds (DPT, Depth Anything, GLPN...):
    the ``depth`` ControlNet's annotator, run through ``AutoModelForDepthEstimation``."""
    architectures = config.get("architectures") or []
    return next((a for a in architectures if isinstance(a, str) and a.endswith("ForDepthEstimation")), None)


def _detect_controlnet(folder: Path, config: dict[str, Any]) -> Detected:
    # The base model a ControlNet fits is read like a UNet's: SDXL's carries the size/crop
    # conditioning ("text_time") and a 2048-wide text input, SD 2.x a 1024-wide one.
    cross_dim = config.get("cross_attention_dim")
    if config.get("addition_embed_type") == "text_time" or cross_dim == 2048:
        base = "sdxl"
    else:
        base = "sd2" if cross_dim == 1024 else "sd15"
    extra: dict[str, Any] = {"cross_attention_dim": cross_dim}
    guessed = control_type_from_names([folder.name])
    if guessed is not None:
        extra["control_type"] = guessed
    return Detected("controlnet", ("generate",), base, extra)


def with_control_type(
    found: Detected, control_type: str | None, names: Iterable[str | None], where: str
) -> Detected:
    """``found`` (a ControlNet) with its control type: ``control_type`` as the operator gives it,
    else the one its folder, id or repository names. A ControlNet of no known type is refused:
    a job could neither pick it by type nor be told which control image it needs."""
    if found.type != "controlnet":
        if control_type is not None:
            raise ModelStoreError(f"a control type is for ControlNet models; {where} is {found.type!r}")
        return found
    if control_type is not None and control_type not in CONTROL_TYPES:
        raise ModelStoreError(f"unknown control type {control_type!r}; one of {', '.join(CONTROL_TYPES)}")
    chosen = control_type or found.extra.get("control_type") or control_type_from_names(names)
    if chosen is None:
        raise ModelStoreError(
            f"{where} is a ControlNet but its name says no control type; pass one of "
            f"{', '.join(CONTROL_TYPES)} (aiorch models add --control-type)"
        )
    return Detected(found.type, found.tasks, found.base_model_type, {**found.extra, "control_type": chosen})


def control_type_from_names(names: Iterable[str | None]) -> str | None:
    """The control type the first name that tells one says (``sd-controlnet-canny``: canny)."""
    for name in names:
        for pattern, control_type in _CONTROL_TYPE_HINTS:
            if name and pattern.search(name):
                return control_type
    return None


def detect_onnx(path: Path, role: str | None = None, family: str | None = None) -> Detected:
    if role is None:
        role = next((r for pattern, r in _ONNX_FACE_ROLE_HINTS if pattern.search(path.stem)), None)
    if role is not None:
        if role not in FACE_ROLES:
            raise ModelStoreError(f"unknown role {role!r}; one of {', '.join(FACE_ROLES)}")
        return Detected("onnx", FACE_ROLES[role], None, {"role": role})
    if family is not None:
        if family not in SEGMENTATION_FAMILIES:
            raise ModelStoreError(f"unknown family {family!r}; one of {', '.join(SEGMENTATION_FAMILIES)}")
        return Detected("onnx", ("remove_background",), None, {"family": family})
    for pattern, tasks in _ONNX_TASK_HINTS:
        if pattern.search(path.stem):
            # From the name, else the graph's input size and outputs; None: the engine's default.
            found = segmentation_family(path)
            return Detected("onnx", tasks, None, {"family": found} if found else {})
    return Detected("onnx", (), None, {})


def safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor table of a .safetensors file: name -> {dtype, shape, data_offsets}."""
    # The header is a little-endian u64 length then JSON: reading it needs no torch and no
    # loading of the (possibly gigabytes of) tensor data.
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        if length > 100 * 1024 * 1024:
            raise ModelStoreError(f"{path.name} is not a safetensors file (header too large)")
        header = json.loads(fh.read(length))
    header.pop("__metadata__", None)
    return header


def _detect_safetensors(path: Path) -> Detected:
    try:
        header = safetensors_header(path)
    except (OSError, ValueError, struct.error) as exc:
        raise ModelStoreError(f"cannot read {path.name} as safetensors: {exc}") from exc
    keys = list(header)
    if any("lora" in k for k in keys):
        return Detected("lora", DIFFUSION_TASKS, _lora_base_model(header), {})
    restorer = _face_restorer_arch(path, keys)
    if restorer is not None:
        return Detected("face_restorer", FACE_RESTORE_TASKS, None, {"arch": restorer})
    if _looks_like_lama(keys):
        return Detected("lama", LAMA_TASKS, None, {})
    if _looks_like_esrgan(keys):
        return Detected(
            "realesrgan", ("upscale",), None, _esrgan_facts({k: v["shape"] for k, v in header.items()})
        )
    raise ModelStoreError(
        f"{path.name} is a safetensors file but neither a LoRA, an ESRGAN nor a face restorer state dict; "
        "single-file checkpoints must be converted to a diffusers folder"
    )


def _lora_base_model(header: dict[str, Any]) -> str | None:
    keys = list(header)
    if any("te2" in k or "text_encoder_2" in k for k in keys):
        return "sdxl"
    # The down projection of a cross-attention key reads the text encoder's width.
    for key, info in header.items():
        if "attn2" in key and "to_k" in key and ("lora_down" in key or "lora_A" in key):
            width = info["shape"][-1]
            return {768: "sd15", 1024: "sd2", 2048: "sdxl"}.get(width)
    return None


def _looks_like_detector(keys: Iterable[str]) -> bool:
    keys = set(keys)
    ssd = any(k.startswith("head.classification_head") for k in keys)
    rcnn = any(k.startswith("roi_heads.box_predictor") for k in keys)
    return ssd or rcnn


def _detector_facts(path: Path, keys: Iterable[str]) -> dict[str, Any]:
    """A detector is useless without its label map: ``<stem>.labels.json`` or ``labels.json`` beside it."""
    for candidate in (path.with_name(path.stem + ".labels.json"), path.with_name("labels.json")):
        if candidate.is_file():
            arch = "ssdlite" if any(k.startswith("head.classification_head") for k in keys) else "faster_rcnn"
            return {"arch_family": arch, "labels": candidate.name}
    raise ModelStoreError(
        f"{path.name} is a detector; put its label map (a JSON list or object) beside it as "
        f"{path.stem}.labels.json or labels.json"
    )


def _face_restorer_arch(path: Path, keys: Iterable[str]) -> str | None:
    """``GFPGAN``, ``RestoreFormer`` or ``CodeFormer`` for those face restorers' state dicts
    (spandrel's own key tests), None for anything else. CodeFormer is read by spandrel only with
    ``spandrel_extra_arches`` installed (the ``faces-noncommercial`` extra: CodeFormer's licence
    is non-commercial); without it, a CodeFormer file is refused saying so."""
    keys = set(keys)
    if {"toRGB.0.weight", "stylegan_decoder.style_mlp.1.weight"} <= keys:
        return "GFPGAN"
    if "position_emb" in keys and "quantize.embedding.weight" in keys:
        if extra_arches_available():
            return "CodeFormer"
        raise ModelStoreError(
            f"{path.name} is a CodeFormer model, which spandrel reads only with {EXTRA_ARCHES} "
            "installed (pip install 'aiorch[faces-noncommercial]'; CodeFormer's licence is "
            "non-commercial); install it, or GFPGAN or RestoreFormer weights"
        )
    if {"quantize.embedding.weight", "encoder.conv_in.weight", "quant_conv.weight"} <= keys:
        return "RestoreFormer"
    return None


def _looks_like_lama(keys: Iterable[str]) -> bool:
    """LaMa's generator (spandrel's key test): the original checkpoints name it ``generator.``,
    IOPaint's TorchScript ``big-lama.pt`` holds it as ``model.``."""
    keys = set(keys)
    return bool({"model.model.1.bn_l.running_mean", "generator.model.1.bn_l.running_mean"} & keys)


def _looks_like_openpose_body(keys: Iterable[str]) -> bool:
    """OpenPose's COCO body network (``body_pose_model.pth``, the openpose ControlNets' annotator:
    inference/pose), by its Caffe layer names: the VGG front, stage 1's heatmap branch, stage 6."""
    return {"conv1_1.weight", "conv5_5_CPM_L2.weight", "Mconv7_stage6_L1.weight"} <= set(keys)


def _torchscript_state_dict(path: Path) -> dict[str, Any] | None:
    """The weights of a TorchScript archive (IOPaint ships LaMa as one), which ``torch.load`` with
    ``weights_only`` refuses; None for any other file. Loading an archive runs none of its code."""
    import zipfile

    import torch

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return None
    if not any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in names):
        return None
    try:
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    except Exception:  # a damaged archive: the caller reports the file as unreadable
        return None


def _looks_like_esrgan(keys: Iterable[str]) -> bool:
    keys = set(keys)
    rrdb = "conv_first.weight" in keys and any(k.startswith("body.") for k in keys)
    compact = "body.0.weight" in keys and not any(k.startswith("conv_first") for k in keys)
    return rrdb or compact


def _esrgan_facts(shapes: dict[str, list[int]]) -> dict[str, Any]:
    if "conv_first.weight" in shapes:
        # RRDBNet folds x2/x1 models with pixel-unshuffle: 3 input channels -> x4, 12 -> x2, 48 -> x1.
        in_ch = shapes["conv_first.weight"][1]
        blocks = {int(k.split(".")[1]) for k in shapes if k.startswith("body.") and k.split(".")[1].isdigit()}
        return {"arch": "RRDBNet", "scale": {3: 4, 12: 2, 48: 1}.get(in_ch), "num_block": len(blocks)}
    # SRVGGNetCompact ends with a conv to 3 * scale^2 channels before its pixel shuffle.
    last = max((int(k.split(".")[1]), k) for k in shapes if k.startswith("body.") and k.endswith(".weight"))
    out_ch = shapes[last[1]][0]
    scale = round((out_ch / 3) ** 0.5)
    return {"arch": "SRVGGNetCompact", "scale": scale if 3 * scale * scale == out_ch else None}


def _detect_torch_state_dict(path: Path) -> Detected:
    import torch  # heavy, and only needed for this one format

    try:
        # weights_only refuses pickled code: an operator-supplied file must not run anything.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors alike for a bad file
        state = _torchscript_state_dict(path)
        if state is None:
            raise ModelStoreError(f"cannot read {path.name} as a PyTorch state dict: {exc}") from exc
    if isinstance(state, dict):
        # "model" is how torchvision's reference training scripts wrap a detector's weights.
        for wrapper in ("params_ema", "params", "state_dict", "model"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if isinstance(state, dict) and _looks_like_detector(state):
        return Detected("detector", ("scan_objects",), None, _detector_facts(path, state))
    if isinstance(state, dict) and _looks_like_lama(state):
        return Detected("lama", LAMA_TASKS, None, {})
    if isinstance(state, dict) and _looks_like_openpose_body(state):
        extra = {"annotates": "openpose", "architecture": "OpenPoseBody"}
        return Detected("annotator", ("generate",), None, extra)
    restorer = _face_restorer_arch(path, state) if isinstance(state, dict) else None
    if restorer is not None:
        return Detected("face_restorer", FACE_RESTORE_TASKS, None, {"arch": restorer})
    if not isinstance(state, dict) or not _looks_like_esrgan(state):
        raise ModelStoreError(
            f"{path.name} is not a Real-ESRGAN/ESRGAN, GFPGAN/RestoreFormer/CodeFormer, OpenPose body "
            "or torchvision detector state dict"
        )
    shapes = {k: list(v.shape) for k, v in state.items() if hasattr(v, "shape")}
    return Detected("realesrgan", ("upscale",), None, _esrgan_facts(shapes))


# -- ONNX files --------------------------------------------------------------------------------


@dataclass(frozen=True)
class OnnxSignature:
    """The graph's real inputs (name, dims; a dim is an int or a symbolic name) and its outputs."""

    inputs: tuple[tuple[str, tuple[int | str, ...]], ...]
    outputs: tuple[str, ...]


def segmentation_family(path: str | Path) -> str | None:
    """The preset (``PRESETS``) an ONNX segmentation file needs, or None when nothing tells.

    The file name is the strongest hint (``BiRefNet-general.onnx``, ``RMBG-1.4.onnx``,
    ``u2net.onnx``). Without one, the graph does: U2-Net takes 320 px; at 1024 px BiRefNet
    (and RMBG-2.0) give one logit map, IS-Net and RMBG-1.4 a probability map plus side outputs.
    """
    path = Path(path)
    for pattern, family in _FAMILY_NAME_HINTS:
        if pattern.search(path.stem):
            return family
    try:
        signature = read_onnx_signature(path)
    except (OSError, ValueError):
        return None
    if len(signature.inputs) != 1:
        return None
    dims = signature.inputs[0][1]
    side = dims[2] if len(dims) == 4 and isinstance(dims[2], int) and dims[2] == dims[3] else None
    if side == 320:
        return "u2net"
    if side == 1024:
        return "birefnet" if len(signature.outputs) == 1 else "rmbg"
    return None


def read_onnx_signature(path: str | Path) -> OnnxSignature:
    """Read an ONNX file's inputs and outputs without loading its weights.

    Walks the protobuf wire format and seeks past the initializers, so a 1 GB BiRefNet file is
    inspected in milliseconds and without the ``onnx`` package (which the API image lacks).
    Inputs that are initializers (older exports list weights as graph inputs) are left out.
    """
    with open(path, "rb") as handle:
        end = handle.seek(0, 2)
        handle.seek(0)
        graph = next((value for number, value in _pb_fields(handle, end) if number == 7), None)
        if not isinstance(graph, tuple):
            raise ValueError(f"{Path(path).name} holds no ONNX graph")
        start, length = graph
        handle.seek(start)
        inputs: list[tuple[str, tuple[int | str, ...]]] = []
        outputs: list[str] = []
        weights: set[str] = set()
        for number, value in _pb_fields(handle, start + length):
            if number in (11, 12) and isinstance(value, tuple):
                handle.seek(value[0])
                name, dims = _pb_value_info(handle.read(value[1]))
                if number == 11:
                    inputs.append((name, dims))
                else:
                    outputs.append(name)
            elif number == 5 and isinstance(value, tuple):
                for field_number, field_value in _pb_fields(handle, value[0] + value[1]):
                    if field_number == 8 and isinstance(field_value, tuple):
                        handle.seek(field_value[0])
                        weights.add(handle.read(field_value[1]).decode("utf-8", "replace"))
    return OnnxSignature(tuple(i for i in inputs if i[0] not in weights), tuple(outputs))


def _pb_varint(handle: BinaryIO) -> int:
    result = shift = 0
    while True:
        byte = handle.read(1)
        if not byte:
            raise ValueError("truncated protobuf")
        result |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError("malformed protobuf varint")


def _pb_fields(handle: BinaryIO, end: int) -> Iterator[tuple[int, int | tuple[int, int]]]:
    """(field number, value) of each field up to ``end``: an int for varints, (offset, length)
    for length-delimited fields, which the caller may read; the walk resumes after them."""
    while handle.tell() < end:
        key = _pb_varint(handle)
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, _pb_varint(handle)
        elif wire == 2:
            length = _pb_varint(handle)
            start = handle.tell()
            if start + length > end:
                raise ValueError("protobuf field runs past its message")
            yield number, (start, length)
            handle.seek(start + length)
        elif wire in (1, 5):
            handle.seek(8 if wire == 1 else 4, 1)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _pb_value_info(data: bytes) -> tuple[str, tuple[int | str, ...]]:
    """ValueInfoProto -> (name, dims): name is field 1; type (2) -> tensor_type (1) -> shape (2)
    -> dim (1) -> dim_value (1) or dim_param (2)."""

    def fields(blob: bytes) -> Iterator[tuple[int, int | bytes]]:
        buffer = io.BytesIO(blob)
        for number, value in _pb_fields(buffer, len(blob)):
            yield number, blob[value[0] : value[0] + value[1]] if isinstance(value, tuple) else value

    name = ""
    dims: list[int | str] = []
    for number, value in fields(data):
        if number == 1 and isinstance(value, bytes):
            name = value.decode("utf-8", "replace")
        elif number == 2 and isinstance(value, bytes):
            tensor = next((v for n, v in fields(value) if n == 1 and isinstance(v, bytes)), b"")
            shape = next((v for n, v in fields(tensor) if n == 2 and isinstance(v, bytes)), b"")
            for dim_number, dim in fields(shape):
                if dim_number != 1 or not isinstance(dim, bytes):
                    continue
                parts = dict(fields(dim))
                value_dim = parts.get(1)
                if isinstance(value_dim, int):
                    dims.append(value_dim)
                else:
                    param = parts.get(2)
                    dims.append(param.decode("utf-8", "replace") if isinstance(param, bytes) else "?")
    return name, tuple(dims)
