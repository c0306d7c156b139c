"""What ``celery -A tasks.worker:celery`` loads (workers, beat, Flower, the Docker health checks)
registers every task of the platform under its unchanged name: messages in flight name them."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from tasks.celery_app import TASK_MODULES

ROOT = Path(__file__).resolve().parents[2]
# The names messages carry; renaming one strands every message already queued under it.
TASK_NAMES = {
    "aiorch.prepare_job",
    "aiorch.run_job",
    "aiorch.submit_remote",
    "aiorch.poll_remote",
    "aiorch.sweep_jobs",
    "aiorch.dispatch_events",
    "aiorch.finish_job",
    "aiorch.deliver_webhook",
    "aiorch.fill_slots",
}


def _defines_a_task(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                call = decorator.func if isinstance(decorator, ast.Call) else decorator
                if getattr(call, "id", getattr(call, "attr", "")) == "shared_task":
                    return True
    return False


def test_the_worker_entry_point_imports_every_module_that_defines_a_task() -> None:
    modules = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in (ROOT / "tasks").rglob("*.py")
        if _defines_a_task(p)
    }
    tree = ast.parse((ROOT / "tasks/worker.py").read_text(encoding="utf-8"))
    imported = {
        alias.name
        for node in tree.body
        if isinstance(node, ast.Import)
        for alias in node.names
        if alias.name.startswith("tasks.")
    }
    assert modules <= set(TASK_MODULES), sorted(modules - set(TASK_MODULES))
    assert imported == set(TASK_MODULES), sorted(imported ^ set(TASK_MODULES))


def test_celery_dash_a_tasks_worker_registers_every_task_under_its_name(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIORCH_")}
    env.update(AIORCH_VAR_DIR=str(tmp_path / "var"), PYTHONPATH=str(ROOT))
    code = (
        "import json, tasks.worker as w; "
        "print(json.dumps(sorted(n for n in w.celery.tasks if n.startswith('aiorch.'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout.strip().splitlines()[-1])) == TASK_NAMES
