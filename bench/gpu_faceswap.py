"""``make bench-gpu``, section faceswap: a 1080p target (960x540 for ``--small``) with 1 and 4
faces, a real ``faceswap`` job (``started_at..finished_at``: decoding both inputs, the engine, the
output encode, storage) against the same engine's ``faceswap`` called in this process on the same
images, then its output encoded as the job's is. Whichever engine the worker picks (InsightFace when
its models are installed, else the landmark engine) is the one called raw.

Ratio (a) compares the engine call inside the worker (``result.meta.timing.engine_s``, the face
engine's ``faceswap`` call the ``faceswap`` task makes) with the raw call; ratio (b) the job.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.gpu_session import Bench, data_uri, interleave, job_seconds, judge_case, ratio


def bench_faceswap(bench: Bench) -> dict[str, Any]:
    from PIL import Image

    from inference.faceswap import LandmarkFaceSwapper, MeshFaceSwapper
    from tests.inference.face_images import astronaut, group

    bench.fresh_start()
    side = (540, 960) if bench.small else (1080, 1920)
    k = side[0] / 1080
    targets = {
        1: group([(int(760 * k), int(240 * k), 2.4 * k)], size=side)[0],
        4: group([(int(x * k), int(380 * k), 1.3 * k) for x in (120, 560, 1000, 1440)], size=side)[0],
    }
    source = Image.fromarray(astronaut())
    source_uri = data_uri(source)
    details: dict[str, Any] = {"target": f"{side[1]}x{side[0]}", "faces": {}}
    raw_engine: Any = None
    for faces, rgb in targets.items():
        target = Image.fromarray(rgb)
        payload = {
            "source_url": source_uri,
            "target_url": data_uri(target),
            "upscale": 0,
            "max_side": max(side),
        }
        first = bench.job("faceswap", payload)  # warm-up: the worker builds its face engine
        backend = first["result"]["meta"]["backend"]
        if raw_engine is None:
            if backend.startswith("insightface"):
                raise RuntimeError("raw InsightFace comparison needs the store's model paths; not wired")
            mesh = backend.startswith("landmark-mediapipe")
            raw_engine = MeshFaceSwapper() if mesh else LandmarkFaceSwapper()
        engine = raw_engine

        def raw_call(_i: int, engine: Any = engine, target: Any = target) -> dict[str, Any]:
            t0 = time.perf_counter()
            out = engine.faceswap(source, target, max_side=max(side)).images[0].image
            seconds = time.perf_counter() - t0
            return {"call_s": seconds, "encode_s": bench.encode(out)}

        def job_call(_i: int, payload: dict[str, Any] = payload) -> dict[str, Any]:
            job = bench.job("faceswap", payload)
            engine_s = (job["result"]["meta"].get("timing") or {}).get("engine_s")
            return {"engine_s": engine_s, "job_s": job_seconds(job), "job_id": job["job_id"]}

        raw_call(-1)  # warm-up of the raw engine
        label = f"{side[1]}x{side[0]}, {faces} face(s)"
        jobs, raws = interleave(bench, f"faceswap {label}", job_call, raw_call)
        judged = judge_case(bench, "faceswap", label, jobs, raws)
        job_median = statistics.median(j["job_s"] for j in jobs)
        raw_median = statistics.median(r["call_s"] for r in raws)
        bench.row(
            "faceswap",
            f"{label}: swaps per second (job vs raw call), median",
            round(faces / job_median, 2),
            round(faces / raw_median, 2),
            ratio(raw_median, job_median),
        )
        details["faces"][faces] = {"backend": backend, "job": jobs, "raw": raws, **judged}
    return details
