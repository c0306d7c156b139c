"""``make bench-gpu``: the GPU engines through the real platform against the same library call made
directly in one process, on random-weight models of production size, judged on what users wait for.

    python -m bench.gpu                      # every section, full size (CUDA, fp16)
    python -m bench.gpu --only diffusion     # one section
    python -m bench.gpu --small              # tiny models at tiny sizes: a CPU smoke run
    python -m bench.gpu --repeats 31         # pairs per case (default 15)
    python -m bench.gpu --training-repeats 5 # pairs of the training section (default 3)
    python -m bench.gpu --format jpg         # the output format the jobs ask for (default png)
    python -m bench.gpu --embedded           # SQLite + kombu filesystem transport
    python -m bench.gpu --database-url ... --broker-url ...   # existing ones (as bench.run)

Sections (one module each): diffusion (``bench/gpu_diffusion.py``: SD 1.5-shaped, 512x512, 20
steps), superres (``bench/gpu_superres.py``: RRDB x4 on 512x512, compact x4 on 1024x1024, then
batching), faceswap (``bench/gpu_faceswap.py``: a 1080p target with 1 and 4 faces), training
(``bench/gpu_training.py``: ``train_lora`` on the SD 1.5-shaped model, 512x512, rank 16, 100 steps,
through a training worker of its own against ``inference.training.train_lora`` called here; its
own ratios and ``--training-repeats`` pairs, see that module).

Every case starts clean (``Bench.fresh_start``: the gpu worker restarted, this process's cached
memory released), installs its random-weight model into the benchmark's models dir while the
workers run (the model store is re-read per job), and runs one unmeasured warm-up on each side.
Then ``--repeats`` interleaved pairs, each a job through the API and a real Celery worker and the
bare library call in this process, in alternating order. Two ratios are judged per case
(``bench/gpu_judge.py``):

(a) the engine's own call in the worker (``result.meta.timing``) / the raw call: target <= 1.03;
(b) the job's ``started_at..finished_at`` / (raw call + ``tasks.storage.encode_image`` of the raw
    output to the job's format): target <= 1.05.

Each verdict is on the median per-pair ratio and its 95 % distribution-free interval: PASS when
the interval lies at or below the target, FAIL when above, UNSURE when it straddles it. Without
CUDA the run switches to ``--small`` and says, in the table and the JSON, that its numbers are CPU
smoke numbers and not GPU measurements; a smoke run gives no verdicts.

Prints the tables and writes ``bench-results/bench-gpu-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform as host_platform
import signal
import sys
import tempfile
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import infra
from bench.gpu_controlnet import bench_controlnet
from bench.gpu_diffusion import bench_diffusion
from bench.gpu_faceswap import bench_faceswap
from bench.gpu_judge import FEW_REPEATS, MIN_REPEATS, NOT_REPORTED, Judgement, Spread
from bench.gpu_session import Bench
from bench.gpu_superres import bench_superres
from bench.gpu_training import bench_training
from bench.run import bench_settings, fmt, git_revision, redact, say, verdict
from inference.model_store import ModelStore
from models.db import Database
from models.migrate import upgrade
from tests.support.platform import ROOT, Platform, free_port

SECTIONS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "diffusion": bench_diffusion,
    "controlnet": bench_controlnet,
    "superres": bench_superres,
    "faceswap": bench_faceswap,
    "training": bench_training,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        choices=sorted(SECTIONS),
        action="append",
        help="run only this section (repeatable; default: all)",
    )
    parser.add_argument(
        "--small",
        action="store_true",
        help="tiny models at tiny sizes (automatic without CUDA): a smoke run, not a measurement",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=MIN_REPEATS,
        help=f"interleaved pairs (job, raw call) per case (default {MIN_REPEATS})",
    )
    parser.add_argument(
        "--training-repeats",
        type=int,
        default=FEW_REPEATS,
        help=f"interleaved pairs (job, direct train_lora call) of section training (default {FEW_REPEATS})",
    )
    parser.add_argument(
        "--format",
        choices=("png", "jpg", "webp"),
        default="png",
        help="output format of every job, and of the raw side's encode (default png)",
    )
    parser.add_argument("--embedded", action="store_true", help="SQLite + kombu filesystem transport")
    parser.add_argument("--database-url", help="an existing database (default: a private Postgres database)")
    parser.add_argument("--broker-url", help="an existing broker (default: a private RabbitMQ vhost)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results", help="where the JSON goes")
    return parser.parse_args(argv)


# -- the report ---------------------------------------------------------------------------------------


def spread_text(spread: Spread | None, digits: int) -> str:
    if spread is None:
        return "-"
    return f"{spread.median:.{digits}f} [{spread.p10:.{digits}f}..{spread.p90:.{digits}f}]"


def milliseconds(spread: Spread | None) -> str:
    if spread is None:
        return "-"
    return f"{spread.median * 1000:+.1f} ms [{spread.p10 * 1000:+.1f}..{spread.p90 * 1000:+.1f}]"


def judged_lines(row: dict[str, Any]) -> list[str]:
    """Two lines per judged ratio: the case and verdict, then both sides and the per-pair ratio as
    median [p10..p90] with the interval of the median ratio, and the per-pair difference (what
    the numerator's side added, in milliseconds)."""
    j: Judgement = row["judgement"]
    num, den = row["sides"]
    interval = "-" if j.interval is None else f"{j.interval[0]:.3f}..{j.interval[1]:.3f}"
    first = f"{row['section']:<10} {row['metric']:<70} {row['target']:>8}  {j.verdict}"
    if j.verdict == NOT_REPORTED:
        return [first, f"{'':<12}{den} {spread_text(j.denominator, 4)} s; the engine reports no call time"]
    n = j.ratio.n if j.ratio else 0
    return [
        first,
        f"{'':<12}{num} {spread_text(j.numerator, 4)} s   {den} {spread_text(j.denominator, 4)} s   "
        f"ratio {spread_text(j.ratio, 3)}   {j.confidence:.0%} CI {interval}   n={n}   "
        f"added {milliseconds(j.difference)}",
    ]


def tables(rows: list[dict[str, Any]]) -> str:
    judged = [r for r in rows if "judgement" in r]
    info = [r for r in rows if "judgement" not in r]
    header = f"{'section':<10} {'case: ratio (median of per-pair ratios)':<70} {'target':>8}  verdict"
    lines = [header, "-" * len(header)]
    for r in judged:
        lines += judged_lines(r)
    if not info:
        return "\n".join(lines)
    header = f"{'section':<10} {'metric':<60} {'engine':>12} {'raw':>12} {'ratio':>7} {'target':>8}  pass"
    lines += ["", header, "-" * len(header)]
    for r in info:
        lines.append(
            f"{r['section']:<10} {r['metric']:<60} {fmt(r['engine'], r['unit']):>12} "
            f"{fmt(r['raw'], r['unit']):>12} {fmt(r['ratio']):>7} {r['target']:>8}  {verdict(r['pass'])}"
        )
    return "\n".join(lines)


def json_row(row: dict[str, Any]) -> dict[str, Any]:
    if "judgement" not in row:
        return row
    return {**row, "judgement": row["judgement"].as_dict()}


# -- running ------------------------------------------------------------------------------------------


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    small = args.small or device == "cpu"
    smoke_note = None
    if device == "cpu":
        smoke_note = (
            "NO CUDA: tiny models on the CPU (--small). These are CPU smoke numbers that show "
            "the benchmark runs end to end; they are NOT GPU measurements."
        )
    elif small:
        smoke_note = "--small: tiny models at tiny sizes; a smoke run, not a measurement."
    if smoke_note:
        say(smoke_note)
    if args.repeats < MIN_REPEATS and not small:
        say(f"{args.repeats} pairs per case: fewer than {MIN_REPEATS} rarely resolve a 3 % target (UNSURE)")
    names = args.only or list(SECTIONS)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_id = uuid.uuid4().hex[:10]
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "revision": git_revision(),
        "device": device,
        "device_name": torch.cuda.get_device_name(0)
        if device == "cuda"
        else host_platform.processor() or "cpu",
        "small": small,
        "smoke_only": smoke_note is not None,
        "note": smoke_note,
        "repeats": args.repeats,
        "training_repeats": args.training_repeats,
        "format": args.format,
        "host": {
            "cpus": os.cpu_count(),
            "python": host_platform.python_version(),
            "torch": torch.__version__,
            "loadavg_start": os.getloadavg(),
        },
        "sections": {},
    }
    status = 1
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aiorch-bench-gpu-")))
        var = tmp / "var"
        database_url, broker_url = args.database_url, args.broker_url
        if not args.embedded:
            try:
                if not database_url:
                    database_url = stack.enter_context(infra.private_database(f"aiorch_bench_gpu_{run_id}"))
                if not broker_url:
                    broker_url = stack.enter_context(infra.private_vhost(f"aiorch_bench_gpu_{run_id}"))
            except Exception as exc:  # noqa: BLE001 (no Postgres/RabbitMQ here: the embedded default runs)
                say(f"no private Postgres/RabbitMQ ({type(exc).__name__}): using the embedded default")
                database_url = broker_url = None
        port = free_port()
        settings = bench_settings(var, port, database_url, broker_url).with_overrides(
            models_dir=tmp / "models"
        )
        var.mkdir(parents=True)
        settings.models_dir.mkdir(parents=True)
        results["database"], results["broker"] = redact(settings.database_url), redact(settings.broker_url)
        db = Database(settings)
        stack.callback(db.dispose)
        upgrade(db)
        plat = Platform(settings, tmp / "logs")
        stack.callback(plat.stop)
        bench = Bench(
            plat,
            ModelStore(settings.models_dir),
            device,
            small,
            args.repeats,
            args.format,
            args.training_repeats,
        )
        try:
            plat.start_api()
            plat.start_workers()
            say(f"API on {plat.base_url}, cpu and gpu workers ready; sections: {', '.join(names)}")
            failed = []
            for name in names:
                try:
                    results["sections"][name] = SECTIONS[name](bench)
                except Exception as exc:  # noqa: BLE001 (one broken section must not cost the others)
                    failed.append(name)
                    results["sections"][name] = {"error": f"{type(exc).__name__}: {exc}"}
                    say(f"section {name} failed: {type(exc).__name__}: {exc}")
                    worker = "train" if name == "training" else "gpu"
                    print(f"--- {worker} worker log (tail) ---\n{plat.log(worker)[-1500:]}", file=sys.stderr)
            if failed:
                results["error"] = f"sections failed: {', '.join(failed)}"
            status = 1 if failed else 0
        except BaseException as exc:
            results["error"] = f"{type(exc).__name__}: {exc}"
            for name in ("api", "cpu", "gpu", "train"):
                tail = plat.log(name)
                if tail:
                    print(f"--- {name} log (tail) ---\n{tail[-1500:]}", file=sys.stderr)
            if not isinstance(exc, Exception):
                raise
        finally:
            results["host"]["loadavg_end"] = os.getloadavg()
            results["table"] = [json_row(r) for r in bench.rows]
            args.out.mkdir(parents=True, exist_ok=True)
            path = args.out / f"bench-gpu-{stamp}.json"
            path.write_text(json.dumps(results, indent=2, default=str) + "\n")
            print()
            print(
                f"aiorch bench-gpu  device={results['device_name']} ({device})  db={results['database']}  "
                f"broker={results['broker']}  rev={results['revision']}  pairs={args.repeats}  "
                f"format={args.format}"
            )
            if smoke_note:
                print(f"*** {smoke_note} ***")
            print(tables(bench.rows))
            if "error" in results:
                print(f"\nERROR: {results['error']}")
            print(f"\nwrote {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
