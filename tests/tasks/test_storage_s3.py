"""Storage on an S3-compatible bucket (moto's stand-alone server over HTTP) and on the local folder:
one contract, two backends; and a local-storage process never loads boto3."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from config import Settings
from models.assets import OUTPUT, UPLOAD
from tasks import storage_s3
from tasks.storage import Storage
from tasks.storage_backends import Backend, LocalBackend
from tasks.storage_s3 import S3Backend
from tests.support.platform import ROOT
from tests.support.s3 import S3Server


@pytest.fixture
def shared(s3: S3Server, bucket: str, tmp_path: Path) -> Storage:
    """Storage on the bucket, with this host's folder (local copies only) in ``tmp_path``."""
    return Storage(s3.settings(Settings(storage_dir=tmp_path / "local"), bucket, "pre/fix"))


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, s3: S3Server, tmp_path: Path) -> Backend:
    if request.param == "local":
        return LocalBackend(tmp_path / "store")
    return S3Backend(s3.settings(Settings(), s3.new_bucket(), "p"))


def test_both_backends_keep_the_same_contract(backend: Backend, tmp_path: Path) -> None:
    backend.put("files/a.png", b"png bytes")
    backend.put("inputs/j1/x_0.png", b"one")
    backend.put("inputs/j1/x_1.png", b"two")
    assert backend.get("files/a.png") == b"png bytes" and backend.exists("files/a.png")
    blob = backend.open("files/a.png")
    assert blob is not None and blob.size == 9
    content = blob.path.read_bytes() if blob.path is not None else blob.stream.read()  # type: ignore[union-attr]
    assert content == b"png bytes"
    # Missing keys are not errors.
    assert backend.get("files/none.png") is None and backend.open("files/none.png") is None
    assert not backend.exists("files/none.png")
    backend.delete(["files/none.png"])
    assert backend.download("inputs/j1/x_1.png", tmp_path / "copy.png")
    assert (tmp_path / "copy.png").read_bytes() == b"two"
    assert not backend.download("inputs/j1/none.png", tmp_path / "none.png")
    backend.delete_prefix("inputs/j1/")
    assert backend.get("inputs/j1/x_0.png") is None and backend.get("inputs/j1/x_1.png") is None
    backend.delete(["files/a.png"])
    assert not backend.exists("files/a.png")
    backend.ping()


def test_an_output_lands_in_the_bucket_under_its_prefix_and_not_on_the_local_disk(
    shared: Storage, s3: S3Server, bucket: str, tmp_path: Path
) -> None:
    saved = shared.save_output(b"\x89PNG output", "png")
    assert saved.path is None and saved.size == 11 and saved.content_type == "image/png"
    assert s3.keys(bucket) == [f"pre/fix/files/{saved.name}"]
    assert (
        s3.client().head_object(Bucket=bucket, Key=f"pre/fix/files/{saved.name}")["ContentType"]
        == "image/png"
    )
    assert not any(path.is_file() for path in tmp_path.rglob("*"))
    assert shared.read_file(OUTPUT, saved.name) == b"\x89PNG output"
    assert shared.has_file(OUTPUT, saved.name)
    assert shared.url_for(saved.name).endswith(f"/files/{saved.name}")
    # An output is never read as an upload, nor the other way round.
    assert shared.open_file(UPLOAD, saved.name) is None


def test_a_name_storage_never_makes_reaches_no_key(shared: Storage, s3: S3Server, bucket: str) -> None:
    shared.save_upload(b"secret", "png")
    for name in ("../uploads/x.png", "x.png", "", "f" * 32 + ".exe"):
        assert shared.open_file(OUTPUT, name) is None and shared.read_file(UPLOAD, name) is None
        assert not shared.has_file(OUTPUT, name)
    shared.delete_files([(UPLOAD, "../files/")])
    assert len(s3.keys(bucket)) == 1


def test_an_objects_stream_serves_its_length_etag_and_time(shared: Storage) -> None:
    saved = shared.save_output(b"0123456789", "jpg")
    blob = shared.open_file(OUTPUT, saved.name)
    assert blob is not None and blob.path is None and blob.stream is not None
    with blob.stream:
        assert blob.stream.read() == b"0123456789"
    assert blob.size == 10 and blob.etag and blob.last_modified is not None


def test_a_jobs_inputs_are_read_from_the_bucket_copied_for_file_engines_and_removed_with_it(
    shared: Storage, s3: S3Server, bucket: str, tmp_path: Path
) -> None:
    entry = shared.save_input("job1", "image_url_0.png", b"checked image")
    video = shared.save_input("job1", "video_url_0.mp4", b"checked video")
    assert entry == {"name": "image_url_0.png"}  # no local path: another host reads it
    assert s3.keys(bucket, "pre/fix/inputs/") == [
        "pre/fix/inputs/job1/image_url_0.png",
        "pre/fix/inputs/job1/video_url_0.mp4",
    ]
    assert shared.read_input("job1", entry) == b"checked image"
    copy = shared.local_input("job1", video)
    assert copy.read_bytes() == b"checked video" and copy.is_relative_to(tmp_path / "local")
    shared.remove_inputs("job1")
    assert s3.keys(bucket, "pre/fix/inputs/") == [] and not copy.exists()
    with pytest.raises(FileNotFoundError, match="image_url_0.png"):
        shared.read_input("job1", entry)


def test_local_storage_keeps_its_layout_and_reads_entries_written_before_shared_storage(
    tmp_path: Path,
) -> None:
    local = Storage(Settings(storage_dir=tmp_path))
    entry = local.save_input("job1", "image_url_0.png", b"img")
    assert entry == {"name": "image_url_0.png", "path": str(tmp_path / "inputs/job1/image_url_0.png")}
    # An entry recorded by an older release carries only its path.
    assert local.read_input("job1", {"path": entry["path"]}) == b"img"
    assert local.local_input("job1", entry) == tmp_path / "inputs/job1/image_url_0.png"
    saved = local.save_output(b"out", "png")
    assert saved.path == tmp_path / "files" / saved.name and saved.path.read_bytes() == b"out"


def test_deleting_files_removes_their_objects_in_batches_and_missing_ones_are_quiet(
    shared: Storage, s3: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage_s3, "DELETE_BATCH", 2)  # several DeleteObjects requests
    outputs = [shared.save_output(b"o", "png").name for _ in range(3)]
    uploads = [shared.save_upload(b"u", "webp").name for _ in range(2)]
    kept = shared.save_output(b"kept", "png").name
    shared.delete_files([(OUTPUT, name) for name in outputs] + [(UPLOAD, name) for name in uploads])
    shared.delete_outputs(outputs)  # a second sweep of the same names
    assert s3.keys(bucket) == [f"pre/fix/files/{kept}"]
    for index in range(5):
        shared.save_input("job2", f"images_{index}.png", b"i")
    shared.remove_inputs("job2")
    assert s3.keys(bucket) == [f"pre/fix/files/{kept}"]


def test_a_missing_bucket_fails_loudly_not_as_a_missing_file(s3: S3Server, tmp_path: Path) -> None:
    gone = Storage(s3.settings(Settings(storage_dir=tmp_path), "no-such-bucket-here"))
    with pytest.raises(ClientError):
        gone.ping()
    with pytest.raises(ClientError, match="NoSuchBucket"):
        gone.save_output(b"x", "png")


def test_a_local_storage_process_never_imports_boto3(tmp_path: Path) -> None:
    code = (
        "import sys, pathlib\n"
        "from config import Settings\n"
        "from tasks.storage import Storage\n"
        "Storage(Settings(storage_dir=pathlib.Path(sys.argv[1]))).save_output(b'x', 'png')\n"
        "assert 'boto3' not in sys.modules and 'botocore' not in sys.modules, 'boto3 loaded'\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, check=True, timeout=60)
