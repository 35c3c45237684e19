"""One contract, two backends: the local folder and S3 (moto's server over HTTP)."""

import hashlib

import pytest

from service.storage import LocalStore, ObjectMissing, S3Store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "objects")
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return S3Store(bucket, "prefix", endpoint_url=endpoint)


def test_put_get_roundtrip_keeps_bytes(store, tmp_path):
    payload = bytes(range(256)) * 5000  # over one chunk
    source = tmp_path / "in.bin"
    source.write_bytes(payload)
    store.put_file("models/a/model.onnx", source)
    assert store.exists("models/a/model.onnx")
    assert store.size("models/a/model.onnx") == len(payload)
    assert store.get_file("models/a/model.onnx", tmp_path / "out.bin").read_bytes() == payload
    streamed = b"".join(store.iter_chunks("models/a/model.onnx", chunk_size=4096))
    assert hashlib.sha256(streamed).digest() == hashlib.sha256(payload).digest()


def test_adopt_file_stores_the_bytes_and_takes_the_file(store, tmp_path):
    source = tmp_path / "part"
    source.write_bytes(b"one upload part " * 1000)
    store.adopt_file("uploads/u/parts/00001", source)
    assert not source.exists()
    assert b"".join(store.iter_chunks("uploads/u/parts/00001")) == b"one upload part " * 1000


def test_overwrite_replaces_whole_object(store, tmp_path):
    (tmp_path / "a").write_bytes(b"first version, longer")
    (tmp_path / "b").write_bytes(b"second")
    store.put_file("k/obj", tmp_path / "a")
    store.put_file("k/obj", tmp_path / "b")
    assert b"".join(store.iter_chunks("k/obj")) == b"second"


def test_missing_objects_raise_object_missing(store, tmp_path):
    assert not store.exists("nope/x")
    with pytest.raises(ObjectMissing):
        store.get_file("nope/x", tmp_path / "x")
    with pytest.raises(ObjectMissing):
        list(store.iter_chunks("nope/x"))
    with pytest.raises(ObjectMissing):
        store.size("nope/x")


def test_delete_and_delete_prefix(store, tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    for key in ("jobs/1/a", "jobs/1/b", "jobs/2/a"):
        store.put_file(key, tmp_path / "f")
    store.delete("jobs/1/a")
    assert not store.exists("jobs/1/a")
    store.delete_prefix("jobs/1")
    assert not store.exists("jobs/1/b")
    assert store.exists("jobs/2/a")
    store.ping()


@pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/./b", ""])
def test_keys_cannot_escape(store, key, tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(ValueError):
        store.put_file(key, tmp_path / "f")


def test_local_store_leaves_no_partial_file_on_failure(tmp_path):
    store = LocalStore(tmp_path / "objects")
    with pytest.raises(FileNotFoundError):
        store.put_file("a/b", tmp_path / "does-not-exist")
    assert not store.exists("a/b")
    assert not list((tmp_path / "objects" / "a").glob(".partial-*"))
