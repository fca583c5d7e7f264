"""``Result.from_path(URL)`` on a damaged run names the URL, where the user finds the files, not
the staging directory it downloaded them into (which is gone by the time the error is read).
Against moto's S3 server, as tests/test_remote.py."""

import os

import pytest

import distbp
from distbp.errors import DataError
from tests import test_remote
from tests.test_remote import staged

s3_server, s3 = test_remote.s3_server, test_remote.s3  # its fixtures: moto's server, a fresh bucket


@pytest.fixture(autouse=True)
def fresh_filesystems():
    """fsspec keeps each S3 filesystem it made, with the endpoint of its time: this module's server
    is not test_remote.py's, so neither module may find the other's."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()

GARBAGE = bytes(range(256)) * 4


@pytest.mark.parametrize("damage, words", [("summary", "summary.json: unreadable"),
                                           ("checkpoint", "checkpoint.npz: "),
                                           ("metrics", "metrics.jsonl: line 1 is not a metrics record")])
def test_a_damaged_run_at_a_url_is_named_by_its_url(damage, words, s3, tmp_path):
    root = f"{s3.bucket}/runs/damaged"
    url = f"s3://{root}"
    if damage == "checkpoint":
        s3.pipe(f"{root}/checkpoint.npz", GARBAGE)  # no summary: the checkpoint is read
    else:
        distbp.Network([2, 4, 3]).save(str(tmp_path / "c.npz"))
        s3.put_file(str(tmp_path / "c.npz"), f"{root}/checkpoint.npz")
        s3.pipe(f"{root}/summary.json", GARBAGE if damage == "summary" else b"{}")
        s3.pipe(f"{root}/metrics.jsonl", b"garbage\n{}\n")
    with pytest.raises(DataError) as caught:
        distbp.Result.from_path(url)
    message = str(caught.value)
    assert f"{url}/{words}" in message, message
    assert str(tmp_path / "staging") not in message and "/staging/" not in message, message
    assert staged(tmp_path) == []  # the download went with the error


def test_a_url_with_a_trailing_slash_is_named_as_given(s3, tmp_path):
    root = f"{s3.bucket}/runs/slash"
    s3.pipe(f"{root}/checkpoint.npz", GARBAGE)
    with pytest.raises(DataError, match=f"^s3://{root}/checkpoint.npz: "):
        distbp.Result.from_path(f"s3://{root}/")
    assert staged(tmp_path) == [] and not os.listdir(tmp_path / "staging")
