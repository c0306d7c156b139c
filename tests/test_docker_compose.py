"""docker/ stays deployable although no Docker engine runs here.

Three layers, cheapest first:

* ``compose.yaml`` validates against the Compose Specification JSON schema. The schema is vendored in
  ``tests/data/compose-spec.json`` (copied from the check-jsonschema 0.39.0 wheel on PyPI,
  ``check_jsonschema/builtin_schemas/vendor/compose-spec.json``, sha256 d549057e…0e64, Apache-2.0,
  licence beside it), so this layer never needs the network or a compose binary.
* A real Compose implementation renders the file (``docker compose config`` or Debian's
  ``docker-compose`` 1.29, whichever is installed; neither needs an engine for ``config``), with
  ``.env.example`` and without the secrets. Skipped only where no compose binary is installed.
* The invariants the platform relies on, checked on the file after interpolation with
  ``.env.example``: dependencies, health checks, queues, ports, volumes, networking, and every
  ``aiorch`` command in the Dockerfiles and the compose file parsed by the real CLI.
"""

from __future__ import annotations

import ast
import configparser
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
import yaml

from app.cli import main as aiorch_cli
from config import QUEUES

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
SCHEMA_FILE = Path(__file__).with_name("data") / "compose-spec.json"

GPU_QUEUES = sorted(q for q in QUEUES if q.startswith("gpu.") and q != "gpu.train")
# Services that run until stopped; `migrate` is the only one-shot.
LONG_RUNNING = {"rabbitmq", "postgres", "api", "worker-cpu", "worker-gpu", "worker-train", "beat", "flower"}
ONE_SHOT = {"migrate"}
# Which Dockerfile builds which aiorch service, and what its process must be.
SERVICE_DOCKERFILE = {
    "migrate": "Dockerfile.api",
    "api": "Dockerfile.api",
    "worker-cpu": "Dockerfile.worker-cpu",
    "beat": "Dockerfile.worker-cpu",
    "flower": "Dockerfile.worker-cpu",
    "worker-gpu": "Dockerfile.worker-gpu",
    "worker-train": "Dockerfile.worker-gpu",
}
SECRETS = {"POSTGRES_PASSWORD", "RABBITMQ_PASSWORD", "AIORCH_FLOWER_PASSWORD"}
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


# -- helpers: .env files, interpolation, short syntaxes ------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as Compose reads them (comments and blank lines skipped, no quoting used)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        values[key.strip()] = value.strip()
    return values


class MissingVariable(LookupError):
    pass


# $$, ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, $NAME: the forms
# the Compose specification defines (nested defaults are not used in compose.yaml: v1 lacks them).
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<bare>\w+))"
)


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """The compose file with ``${...}`` filled from ``env``, as Compose would before using it."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["bare"]
        op, arg, current = match["op"], match["arg"], env.get(name)
        if op == ":-":
            return current or arg
        if op == "-":
            return arg if current is None else current
        if (op == ":?" and not current) or (op == "?" and current is None):
            raise MissingVariable(f"{name}: {arg}")
        return current or ""

    return _VARIABLE.sub(substitute, value)


def required_variables(value: Any) -> set[str]:
    """Names used as ``${NAME:?...}`` or ``${NAME?...}`` in the values of the loaded compose file."""
    if isinstance(value, dict):
        return set().union(*(required_variables(item) for item in value.values()))
    if isinstance(value, list):
        return set().union(*(required_variables(item) for item in value))
    if isinstance(value, str):
        return {m["braced"] for m in _VARIABLE.finditer(value) if m["op"] in (":?", "?")}
    return set()


def parse_port(spec: Any) -> tuple[str | None, str, str]:
    """(host_ip, published, target) from the short ``[ip:]published:target[/proto]`` or long syntax."""
    if isinstance(spec, dict):
        return spec.get("host_ip"), str(spec.get("published", "")), str(spec["target"])
    text = str(spec).split("/", 1)[0]
    if text.startswith("["):  # [::1]:5555:5555
        ip, _, rest = text[1:].partition("]:")
        published, _, target = rest.partition(":")
        return ip, published, target
    parts = text.split(":")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2:
        return None, parts[0], parts[1]
    return None, "", parts[0]


def parse_volume(spec: Any) -> tuple[str, str, bool]:
    """(source, target, read_only) from the short ``source:target[:mode]`` or long syntax."""
    if isinstance(spec, dict):
        return spec.get("source", ""), spec["target"], bool(spec.get("read_only"))
    parts = str(spec).split(":")
    mode = parts[2] if len(parts) > 2 else "rw"
    return parts[0], parts[1], "ro" in mode.split(",")


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def healthcheck_command(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return test
    kind, *argv = test
    return argv[0] if kind == "CMD-SHELL" else shlex.join(argv)


# -- helpers: Dockerfiles ------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or not line:
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, f"{path.name} ends inside a continued line"
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def exec_form(instruction: str, value: str) -> list[str]:
    # The shell form would make /bin/sh PID 1, which does not pass SIGTERM on to celery/gunicorn.
    try:
        argv = json.loads(value)
    except json.JSONDecodeError:
        pytest.fail(f"{instruction} {value} is not the exec (JSON) form")
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), value
    return argv


def image_argv(dockerfile: str) -> list[str]:
    """ENTRYPOINT + CMD of the final stage: what a container of that image runs by default."""
    stage = final_stage(dockerfile_instructions(DOCKER / dockerfile))
    entrypoint: list[str] = []
    cmd: list[str] = []
    for keyword, value in stage:
        if keyword == "ENTRYPOINT":
            entrypoint = exec_form(keyword, value)
        elif keyword == "CMD":
            cmd = exec_form(keyword, value)
    return entrypoint + cmd


def parse_aiorch(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Parse ``aiorch ...`` with the real click CLI: (subcommand path, its parameters).

    Only parsing happens (``make_context``); nothing is run. An unknown command or option fails here
    exactly as it would fail at container start.
    """
    assert argv and argv[0] == "aiorch", f"not an aiorch command: {argv}"
    command: click.Command = aiorch_cli
    parent = click.Context(aiorch_cli, info_name="aiorch")
    names: list[str] = []
    args = list(argv[1:])
    # aiorch's groups (`aiorch`, `aiorch keys`) take no options of their own: walk down to the leaf.
    while isinstance(command, click.Group):
        assert args, f"{shlex.join(argv)}: no subcommand"
        sub = command.get_command(parent, args[0])
        assert sub is not None, f"{shlex.join(argv)}: no command {args[0]!r}"
        names.append(args.pop(0))
        command = sub
        if isinstance(sub, click.Group):
            parent = click.Context(sub, info_name=names[-1], parent=parent)
    ctx = command.make_context(names[-1], args, parent=parent)
    return names, ctx.params


def effective_argv(name: str, service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    if command is None:
        return image_argv(SERVICE_DOCKERFILE[name])
    return shlex.split(command) if isinstance(command, str) else list(command)


def queues_of(argv: list[str]) -> list[str]:
    names, params = parse_aiorch(argv)
    assert names == ["worker"], f"{shlex.join(argv)} is not `aiorch worker`"
    # `aiorch worker` passes unknown options through to celery; here that would hide a typo.
    assert params["extra"] == (), f"options aiorch does not know: {params['extra']}"
    return [q for q in params["queues"].split(",") if q]


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    # safe_load resolves the x-* anchors and `<<` merges exactly as Compose does.
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def project(raw: dict[str, Any], example_env: dict[str, str]) -> dict[str, Any]:
    return interpolate(raw, example_env)


@pytest.fixture(scope="module")
def services(project: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return project["services"]


def _compose_command() -> list[str] | None:
    """The Compose v2 plugin if the docker CLI has it, else the standalone docker-compose."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=15)
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


COMPOSE = _compose_command()
needs_compose = pytest.mark.skipif(
    COMPOSE is None,
    reason="no compose binary (`docker compose` or `docker-compose`): apt-get install -y docker-compose",
)


def run_compose_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    assert COMPOSE is not None
    # A bare environment: an AIORCH_* or password variable in the caller's shell would take
    # precedence over the env file and hide a missing entry in .env.example.
    clean_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(ROOT)}
    return subprocess.run(
        [*COMPOSE, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env,
        cwd=ROOT,
    )


# -- the schema ----------------------------------------------------------------------------------


def test_compose_file_validates_against_the_compose_spec_schema(raw: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(raw), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_the_schema_check_rejects_what_compose_rejects(raw: dict[str, Any]) -> None:
    # Guards the guard: a schema that accepted anything would make the test above meaningless.
    schema = json.loads(SCHEMA_FILE.read_text())
    broken = json.loads(json.dumps(raw))
    broken["services"]["api"]["healthcheck"]["intervall"] = "15s"
    broken["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"] = "gpu"
    assert len(list(jsonschema.Draft202012Validator(schema).iter_errors(broken))) >= 2


# -- a real Compose implementation ---------------------------------------------------------------


@needs_compose
def test_compose_renders_the_file_with_the_example_env(services: dict[str, Any]) -> None:
    result = run_compose_config(ENV_EXAMPLE)
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    assert set(rendered["services"]) == set(services)
    schema = json.loads(SCHEMA_FILE.read_text())
    assert not list(jsonschema.Draft202012Validator(schema).iter_errors(rendered))
    # Compose's own interpolation agrees with the one the invariant tests below rely on.
    for name, service in rendered["services"].items():
        assert environment(service) == environment(services[name]), name


@needs_compose
def test_compose_refuses_to_start_without_the_secrets(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = run_compose_config(empty)
    assert result.returncode != 0
    assert any(name in result.stderr for name in SECRETS), result.stderr


# -- the env file --------------------------------------------------------------------------------


def test_env_example_defines_every_variable_the_compose_file_requires(
    raw: dict[str, Any], example_env: dict[str, str]
) -> None:
    required = required_variables(raw)
    assert required >= SECRETS, "secrets must be ${VAR:?...}, never defaulted to a known password"
    assert required <= set(example_env), f"missing from .env.example: {required - set(example_env)}"
    with pytest.raises(MissingVariable):
        interpolate(raw, {})


def test_env_example_holds_placeholders_not_secrets(example_env: dict[str, str]) -> None:
    for key, value in example_env.items():
        if re.search(r"PASSWORD|SECRET|API_KEYS", key):
            assert value in ("", "change-me"), f"{key} in .env.example must be a placeholder"


# -- the invariants ------------------------------------------------------------------------------


def test_all_expected_services_exist(services: dict[str, Any]) -> None:
    assert set(services) == LONG_RUNNING | ONE_SHOT


def test_every_dependency_names_a_service_and_waits_for_its_health(services: dict[str, Any]) -> None:
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions, not a bare list"
        for dependency, spec in depends.items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            expected = "service_completed_successfully" if dependency in ONE_SHOT else "service_healthy"
            assert spec.get("condition") == expected, f"{name} -> {dependency}"
    for name in ("api", "worker-cpu", "worker-gpu", "beat"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert "rabbitmq" in services[name]["depends_on"], name
    assert "postgres" in services["migrate"]["depends_on"]


def test_every_long_running_service_has_a_health_check(services: dict[str, Any]) -> None:
    for name in LONG_RUNNING:
        check = services[name].get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no health check"
        assert check["test"] and check["test"][0] in ("CMD", "CMD-SHELL"), name
    assert "healthcheck" not in services["migrate"]
    assert services["migrate"].get("restart") == "no"
    assert "rabbitmq-diagnostics" in healthcheck_command(services["rabbitmq"])
    assert "ping" in healthcheck_command(services["rabbitmq"])
    assert "pg_isready" in healthcheck_command(services["postgres"])


def test_api_publishes_its_port_and_checks_readyz(
    services: dict[str, Any], example_env: dict[str, str]
) -> None:
    api = services["api"]
    port = example_env["AIORCH_PORT"]
    assert environment(api)["AIORCH_PORT"] == port
    # Bound to all interfaces inside the container, or the published port reaches nothing.
    assert environment(api)["AIORCH_HOST"] == "0.0.0.0"
    assert any(parse_port(p)[1:] == (port, port) for p in api["ports"]), api["ports"]
    check = healthcheck_command(api)
    assert re.search(r"curl -f\S* .*http://127\.0\.0\.1:\$\{?AIORCH_PORT\}?/readyz", check), check
    names, params = parse_aiorch(effective_argv("api", api))
    assert names == ["serve"]


def test_changing_aiorch_port_moves_the_listener_and_the_published_port_together(
    raw: dict[str, Any], example_env: dict[str, str]
) -> None:
    api = interpolate(raw, {**example_env, "AIORCH_PORT": "9123"})["services"]["api"]
    assert environment(api)["AIORCH_PORT"] == "9123"
    assert [parse_port(p)[1:] for p in api["ports"]] == [("9123", "9123")]


def test_cpu_worker_listens_to_the_cpu_queue_only(services: dict[str, Any]) -> None:
    assert queues_of(effective_argv("worker-cpu", services["worker-cpu"])) == ["cpu"]


def test_gpu_worker_listens_to_the_four_gpu_queues_with_one_process(services: dict[str, Any]) -> None:
    argv = effective_argv("worker-gpu", services["worker-gpu"])
    assert sorted(queues_of(argv)) == GPU_QUEUES
    _names, params = parse_aiorch(argv)
    assert params["concurrency"] == 1, "one process per GPU"


def test_training_has_a_gpu_worker_of_its_own_that_writes_the_model_store(services: dict[str, Any]) -> None:
    argv = effective_argv("worker-train", services["worker-train"])
    assert queues_of(argv) == ["gpu.train"]
    assert parse_aiorch(argv)[1]["concurrency"] == 1
    devices = services["worker-train"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    for name in ("worker-train", "api"):  # registers a trained LoRA; DELETE /v1/models removes one
        mounts = {parse_volume(v)[0]: parse_volume(v) for v in services[name]["volumes"]}
        assert mounts["models"][1] == environment(services[name])["AIORCH_MODELS_DIR"]
        assert not mounts["models"][2], f"{name} must write the models volume"


def test_worker_health_checks_ping_the_node_the_worker_runs_as(services: dict[str, Any]) -> None:
    # `-n cpu@%h` names the node after the container's hostname; a ping addressed to any other
    # name gets no reply, and the worker would be marked unhealthy forever.
    for name in ("worker-cpu", "worker-gpu", "worker-train"):
        _names, params = parse_aiorch(effective_argv(name, services[name]))
        prefix, _, host = params["name"].partition("@")
        assert host == "%h", f"{name}: node name must end in @%h, got {params['name']}"
        check = healthcheck_command(services[name])
        assert "inspect ping" in check and "tasks.worker:celery" in check, check
        assert re.search(rf"-d {re.escape(prefix)}@\$\{{?HOSTNAME\}}?(\s|$)", check), check


def test_storage_is_shared_at_the_storage_dir_and_models_at_the_models_dir(
    project: dict[str, Any], services: dict[str, Any]
) -> None:
    named_volumes = set(project.get("volumes") or {})
    assert {"storage", "models", "postgres-data", "rabbitmq-data"} <= named_volumes
    for name in ("api", "worker-cpu", "worker-gpu"):
        env = environment(services[name])
        mounts = {parse_volume(v)[0]: parse_volume(v) for v in services[name]["volumes"]}
        assert "storage" in mounts, f"{name} does not mount the storage volume"
        _source, target, read_only = mounts["storage"]
        assert target == env["AIORCH_STORAGE_DIR"] == "/srv/aiorch/storage", name
        assert not read_only, f"{name} writes inputs or outputs to storage"
    for name in ("api", "worker-gpu"):
        mounts = {parse_volume(v)[0]: parse_volume(v) for v in services[name]["volumes"]}
        assert mounts["models"][1] == environment(services[name])["AIORCH_MODELS_DIR"], name
    assert parse_volume(next(v for v in services["postgres"]["volumes"]))[0] == "postgres-data"
    assert parse_volume(next(v for v in services["rabbitmq"]["volumes"]))[0] == "rabbitmq-data"


def test_no_service_uses_host_networking_or_privileges(services: dict[str, Any]) -> None:
    for name, service in services.items():
        assert service.get("network_mode") != "host", name
        assert not service.get("privileged"), name
        assert service.get("pid") != "host", name


def test_only_the_api_may_be_published_beyond_loopback(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if name == "api":
            continue
        for spec in service.get("ports") or []:
            host_ip, _published, _target = parse_port(spec)
            # No host_ip means 0.0.0.0 on the host: Flower and the management UI would be open.
            assert host_ip in LOOPBACK, f"{name} publishes {spec} beyond the host's loopback"


def test_flower_is_on_loopback_with_basic_auth_from_the_aiorch_variables(
    raw: dict[str, Any], services: dict[str, Any], example_env: dict[str, str]
) -> None:
    flower = services["flower"]
    assert [parse_port(p)[0] for p in flower["ports"]] == ["127.0.0.1"]
    raw_auth = environment(raw["services"]["flower"]).get("FLOWER_BASIC_AUTH", "")
    assert "AIORCH_FLOWER_USER" in raw_auth and "AIORCH_FLOWER_PASSWORD" in raw_auth
    expected = f"{example_env['AIORCH_FLOWER_USER']}:{example_env['AIORCH_FLOWER_PASSWORD']}"
    assert environment(flower)["FLOWER_BASIC_AUTH"] == expected
    argv = effective_argv("flower", flower)
    assert argv[:4] == ["celery", "-A", "tasks.worker:celery", "flower"], argv
    assert "--port=5555" in argv and parse_port(flower["ports"][0])[2] == "5555"


def test_gpu_worker_reserves_an_nvidia_gpu(services: dict[str, Any]) -> None:
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices), devices
    for name, service in services.items():
        if name not in ("worker-gpu", "worker-train"):
            assert "devices" not in str(service.get("deploy", {})), f"{name} should not hold a GPU"


def test_secrets_reach_only_the_services_that_use_them(raw: dict[str, Any]) -> None:
    def holders(variable: str) -> set[str]:
        return {n for n, s in raw["services"].items() if variable in json.dumps(environment(s))}

    assert holders("AIORCH_WEBHOOK_SECRET") == {"worker-cpu"}
    assert holders("AIORCH_API_KEYS") == {"api"}
    assert holders("POSTGRES_PASSWORD") == {
        "postgres",
        "migrate",
        "api",
        "worker-cpu",
        "worker-gpu",
        "worker-train",
    }
    assert holders("AIORCH_FLOWER_PASSWORD") == {"flower"}


def test_compose_builds_each_service_from_its_dockerfile_in_the_repo_root(services: dict[str, Any]) -> None:
    for name, dockerfile in SERVICE_DOCKERFILE.items():
        build = services[name]["build"]
        assert (COMPOSE_FILE.parent / build["context"]).resolve() == ROOT, name
        assert build["dockerfile"] == f"docker/{dockerfile}", name
    for name in ("migrate", "beat"):
        parse_aiorch(effective_argv(name, services[name]))
    assert parse_aiorch(effective_argv("migrate", services["migrate"]))[0] == ["migrate"]
    assert parse_aiorch(effective_argv("beat", services["beat"]))[0] == ["beat"]


def test_celery_commands_name_the_app_tasks_worker_defines() -> None:
    # The health checks and Flower run `celery -A tasks.worker:celery`: the attribute must exist
    # at module level (read from the source, so importing it does not configure logging here).
    tree = ast.parse((ROOT / "tasks" / "worker.py").read_text())
    assigned = {
        t.id
        for node in tree.body
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name)
    }
    assert "celery" in assigned


# -- the Dockerfiles -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dockerfile", "command", "queues"),
    [
        ("Dockerfile.api", ["serve"], None),
        ("Dockerfile.worker-cpu", ["worker"], ["cpu"]),
        ("Dockerfile.worker-gpu", ["worker"], GPU_QUEUES),
    ],
)
def test_dockerfile_runs_a_real_aiorch_command_as_a_non_root_user(
    dockerfile: str, command: list[str], queues: list[str] | None
) -> None:
    argv = image_argv(dockerfile)
    names, params = parse_aiorch(argv)
    assert names == command, argv
    if queues is not None:
        assert sorted(params["queues"].split(",")) == sorted(queues)
    users = [
        value
        for keyword, value in final_stage(dockerfile_instructions(DOCKER / dockerfile))
        if keyword == "USER"
    ]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{dockerfile} runs as root"


@pytest.mark.parametrize("dockerfile", ["Dockerfile.api", "Dockerfile.worker-cpu", "Dockerfile.worker-gpu"])
def test_dockerfile_copies_only_paths_that_exist_in_the_build_context(dockerfile: str) -> None:
    for keyword, value in dockerfile_instructions(DOCKER / dockerfile):
        if keyword not in ("COPY", "ADD") or "--from=" in value:
            continue
        *sources, _destination = [part for part in shlex.split(value) if not part.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile}: COPY {source} is not in the repository root"


def _arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    defaults = {}
    for keyword, value in instructions:
        if keyword == "ARG" and "=" in value:
            key, _, default = value.partition("=")
            defaults[key] = default
    return defaults


def test_gpu_image_is_cuda_and_pins_the_torch_pair_setup_cfg_pins() -> None:
    instructions = dockerfile_instructions(DOCKER / "Dockerfile.worker-gpu")
    args = _arg_defaults(instructions)
    base = interpolate(next(value for keyword, value in instructions if keyword == "FROM").split()[0], args)
    assert base.startswith("nvidia/cuda:") and "runtime" in base, base
    assert args["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/cu"), args["TORCH_INDEX_URL"]
    # The wheel index's CUDA line and the base image's CUDA major version must agree.
    cuda_tag = args["TORCH_INDEX_URL"].rsplit("/cu", 1)[1]
    assert base.split(":")[1].startswith(f"{cuda_tag[:-1]}.{cuda_tag[-1]}"), (base, cuda_tag)
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    gpu_extra = {line.strip() for line in setup["options.extras_require"]["gpu"].splitlines() if line.strip()}
    assert f"torch=={args['TORCH_VERSION']}" in gpu_extra, gpu_extra
    assert f"torchvision=={args['TORCHVISION_VERSION']}" in gpu_extra, gpu_extra
    installs = " ".join(value for keyword, value in instructions if keyword == "RUN")
    assert "'.[gpu]'" in installs or '".[gpu]"' in installs


def test_cpu_images_leave_out_the_gpu_extra() -> None:
    # The API must never import torch; shipping it would also add gigabytes to both images.
    for dockerfile in ("Dockerfile.api", "Dockerfile.worker-cpu"):
        runs = " ".join(v for k, v in dockerfile_instructions(DOCKER / dockerfile) if k == "RUN")
        assert "[gpu]" not in runs and "torch" not in runs, dockerfile
        # The cpu worker checks video inputs (PyAV) before a GPU worker sees them.
        video = dockerfile == "Dockerfile.worker-cpu"
        wanted = r"pip install '\.\[video\]'" if video else r"pip install \.(\s|$)"
        assert re.search(wanted, runs), dockerfile


def test_gpu_image_runs_onnx_on_cuda_of_torchs_major_and_sets_expandable_segments() -> None:
    instructions = dockerfile_instructions(DOCKER / "Dockerfile.worker-gpu")
    args = _arg_defaults(instructions)
    installs = " ".join(value for keyword, value in instructions if keyword == "RUN")
    # onnxruntime-gpu replaces the CPU build, and the build fails unless its CUDA major is torch's.
    assert args["ONNXRUNTIME_GPU_VERSION"] and "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" in installs
    assert "pip uninstall -y onnxruntime" in installs
    assert "b.cuda_version.split('.')[0] == torch.version.cuda.split('.')[0]" in installs
    env = " ".join(value for keyword, value in instructions if keyword == "ENV")
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in env
    # `make install` on a GPU host installs the same onnxruntime-gpu.
    makefile = (ROOT / "Makefile").read_text()
    assert f"ONNXRUNTIME_GPU_VERSION := {args['ONNXRUNTIME_GPU_VERSION']}\n" in makefile
