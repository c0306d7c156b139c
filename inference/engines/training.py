"""``train_lora`` on its own queue, ``gpu.train``: a client's images become a LoRA of that client.

The loop is ``inference.training`` (diffusers + peft). Around it, this engine: checks the base
model (a diffusers model the client sees) and every image against the training resolution, frees
the inference caches its process holds, trains within the memory free for this process (refused up
front when the estimate does not fit), checkpoints into ``<var>/training/<job id>`` so a run that
died (a SIGKILLed worker) resumes there on its next attempt, and registers the result in the model
store as the client's own model (``lora-<job id>``; only that client sees it or may name it). The
same file goes out as the job's output (``result.files``); deleting the job leaves the model.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from inference import devices, runtime
from inference.base import Cancelled, EngineResult, InvalidInput, OutputFile
from inference.model_store import ModelNotFound
from inference.registry import Engine, EngineCall, LocalTask

LORA_FILE = "pytorch_lora_weights.safetensors"
TRAINED_DIR = "trained"  # under the models dir: the client-owned models, one folder each


def run_train_lora(call: EngineCall) -> EngineResult:
    from inference.training import LoraTrainingConfig, train_lora  # heavy: torch, diffusers, peft

    payload = call.payload
    store = runtime.model_store(call.settings)
    base = _base_model(call)
    examples = _examples(call)
    config = LoraTrainingConfig(
        rank=payload["rank"],
        steps=payload["steps"],
        learning_rate=payload["learning_rate"],
        resolution=payload["resolution"],
        seed=payload["seed"],
        train_text_encoder=payload["train_text_encoder"],
        # Steps between checkpoints (AIORCH_TRAIN_CHECKPOINT_EVERY): a lost run repeats at most this many.
        checkpoint_every=call.settings.train_checkpoint_every,
    )
    device = runtime.torch_device()
    runtime.release_memory()  # the inference models this process cached: training needs the room
    job_id = call.job_id or uuid.uuid4().hex
    model_id = f"lora-{job_id}"
    checkpoints = Path(call.settings.var_dir) / "training" / job_id
    folder = store.models_dir / TRAINED_DIR / model_id
    folder.mkdir(parents=True, exist_ok=True)
    try:
        outcome = train_lora(
            store.resolve_path(base),
            examples,
            config,
            folder / LORA_FILE,
            checkpoints,
            device,
            call.control,
            memory_limit_bytes=devices.budget_bytes(device, fraction=0.9),
        )
    except Cancelled:
        shutil.rmtree(checkpoints, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
        raise
    except InvalidInput as exc:
        shutil.rmtree(folder, ignore_errors=True)
        if exc.field == "model":  # the library's name for what the payload calls base_model
            raise InvalidInput(str(exc), field="base_model") from exc
        raise
    entry = store.add(
        folder,
        id=model_id,
        type="lora",
        name=payload.get("name") or model_id,
        base_model_type=base.base_model_type,
        description=f"LoRA trained on {len(examples)} images over {base.id} (job {job_id})",
        source=f"train_lora:{job_id}",
        replace=True,  # a re-run of the same job registers the same model again
        owner=call.owner or None,
    )
    shutil.rmtree(checkpoints, ignore_errors=True)
    # The job's copy of the file, for result.files (the task layer stores it and deletes this one).
    scratch = Path(tempfile.mkstemp(suffix=".safetensors")[1])
    shutil.copyfile(outcome.lora_file, scratch)
    meta: dict[str, Any] = {
        "model_id": entry.id,
        "base_model": base.id,
        "rank": config.rank,
        "steps": outcome.steps,
        "final_loss": outcome.final_loss,
        "resumed_from": outcome.resumed_from,
        "seconds": round(outcome.seconds, 3),
        "device": outcome.device,
        "dtype": outcome.dtype,
        "optimizer": outcome.optimizer,
        "peak_memory_bytes": outcome.peak_memory_bytes,
        "images": len(examples),
    }
    return EngineResult(
        backend=f"peft-lora:{base.id}",
        files=[OutputFile(scratch, "safetensors", meta)],
        data={"model_id": entry.id},
    )


def _base_model(call: EngineCall) -> Any:
    store = runtime.model_store(call.settings)
    model_id = call.payload["base_model"]
    try:
        base = store.get(model_id, client=call.owner or None)
    except ModelNotFound:
        raise InvalidInput(f"unknown model {model_id!r}", field="base_model") from None
    if base.type != "diffusers":
        raise InvalidInput(f"{model_id!r} is a {base.type} model, not diffusers", field="base_model")
    if "train_lora" not in base.tasks:
        kind = base.base_model_type or "unknown base"
        raise InvalidInput(f"{model_id!r} ({kind}) does not serve train_lora", field="base_model")
    return base


def _examples(call: EngineCall) -> list[Any]:
    from inference.training import TrainingExample

    images = call.images["images"]
    resolution = call.payload["resolution"]
    trigger = call.payload.get("trigger_word")
    captions = call.payload.get("captions") or [f"a photo of {trigger}"] * len(images)
    if trigger:
        # Given both, every caption carries the trigger word, which the LoRA learns to answer.
        captions = [c if trigger in c else f"{trigger}, {c}" for c in captions]
    examples = []
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        if min(image.size) < resolution:
            raise InvalidInput(
                f"images[{i}] is {image.width}x{image.height}; training at {resolution} needs both "
                f"sides at least {resolution} px",
                field=f"images[{i}]",
            )
        examples.append(TrainingExample(image, caption))
    return examples


ENGINE = Engine(
    name="training",
    queue="gpu.train",
    tasks=(
        LocalTask(
            "train_lora",
            "Train a LoRA of the client's images on a diffusers base model",
            model_types=("diffusers",),
            predict_seconds=600.0,
            soft_time_limit=8 * 3600,
            time_limit=8 * 3600 + 300,
        ),
    ),
    run=run_train_lora,
    warmup=("inference.training",),
)
