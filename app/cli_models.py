"""``aiorch models``: the model store in AIORCH_MODELS_DIR, for operators (list, add, pull, remove).

Each command imports the store's code when it runs: ``aiorch`` starts without it.
"""

from __future__ import annotations

import click

from config import Settings, limits


@click.group()
def models() -> None:
    """The model store in AIORCH_MODELS_DIR (nothing is downloaded unless you pull)."""


@models.command("list")
@click.option("--type", "model_type", default=None, help="only this type (diffusers, lora, realesrgan, onnx)")
def models_list(model_type: str | None) -> None:
    """List installed models and built-in engines."""
    from tasks.model_registry import list_models

    for entry in list_models(Settings.from_env(), model_type):
        click.echo(
            f"{entry['id']}\t{entry['type']}\t{','.join(entry['tasks'])}\t{entry['base_model_type'] or ''}"
        )


@models.command("add")
@click.argument("path", type=click.Path(exists=True))
@click.option("--id", "model_id", default=None, help="model id (default: from the file or folder name)")
@click.option("--type", "model_type", default=None, help="detected from the files when not given")
@click.option(
    "--role",
    type=click.Choice(["face_detector", "face_recognizer", "face_swapper"]),
    default=None,
    help="the part an ONNX file plays in the InsightFace engine, when its name does not say",
)
@click.option(
    "--family",
    type=click.Choice(["u2net", "birefnet", "rmbg"]),
    default=None,
    help="the pre-processing an ONNX background-removal model needs, when its file does not tell",
)
@click.option(
    "--control-type",
    type=click.Choice(limits.CONTROLNET_TYPES),
    default=None,
    help="what a ControlNet folder conditions on, when its name does not say (sd-controlnet-canny does)",
)
def models_add(
    path: str,
    model_id: str | None,
    model_type: str | None,
    role: str | None,
    family: str | None,
    control_type: str | None,
) -> None:
    """Register a diffusers pipeline or ControlNet folder, depth or OpenPose annotator, Real-ESRGAN .pth,
    LoRA or ONNX."""
    from tasks.model_registry import add_model

    try:
        entry = add_model(Settings.from_env(), path, model_id, model_type, role, family, control_type)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"added {entry['id']} ({entry['type']}; tasks: {', '.join(entry['tasks']) or 'none'})")


@models.command("pull")
@click.argument("repo")
@click.option("--id", "model_id", default=None)
@click.option("--revision", default=None)
@click.option("--offline", is_flag=True, help="only use what the local Hugging Face cache already holds")
def models_pull(repo: str, model_id: str | None, revision: str | None, offline: bool) -> None:
    """Download a Hugging Face repository into the store (needs the network unless --offline)."""
    from tasks.model_registry import pull_model

    try:
        entry = pull_model(Settings.from_env(), repo, model_id, revision, offline)
    except Exception as exc:  # network and hub errors alike: say what failed, no traceback
        raise click.ClickException(f"pull failed: {exc}") from None
    click.echo(f"pulled {entry['id']} ({entry['type']})")


@models.command("remove")
@click.argument("model_id")
def models_remove(model_id: str) -> None:
    """Forget a model (its files stay on disk)."""
    from tasks.model_registry import remove_model

    try:
        remove_model(Settings.from_env(), model_id)
    except (LookupError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"removed {model_id}")
