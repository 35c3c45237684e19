"""service.sandbox: third-party parsers run in a limited child; a hostile upload costs a 422, not the API."""

import io
import os
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service import sandbox
from service.config import Settings
from tests.test_models_api import assert_problem, upload

GENEROUS = sandbox.Limits(wall_s=120, cpu_s=60, memory_bytes=2 * 1024**3)


def test_a_spinning_parser_is_stopped_by_its_cpu_limit():
    # The wall limit is far away: what stops it is RLIMIT_CPU, which a loaded machine cannot delay.
    with pytest.raises(sandbox.SandboxTimeout):
        sandbox.run_json([sys.executable, "-c", "while True: pass"], limits=sandbox.Limits(120, 1, 2 * 1024**3))


def test_a_parser_that_outlives_its_wall_clock_is_killed():
    with pytest.raises(sandbox.SandboxTimeout):
        sandbox.run_json([sys.executable, "-c", "import time; time.sleep(600)"], limits=sandbox.Limits(1, 60, 2 * 1024**3))


def test_a_parser_that_allocates_past_its_limit_is_reported_out_of_memory():
    with pytest.raises(sandbox.SandboxOutOfMemory):
        sandbox.run_json([sys.executable, "-c", "b = bytearray(4 * 1024**3)"], limits=GENEROUS)


def test_the_child_sees_no_secret_of_ours_and_works_in_an_empty_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("MODELPRESS_SECRET_FOR_TEST", "do-not-leak")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "server-file").write_text("x")
    script = "import json, os; print(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd(), 'ls': os.listdir('.')}))"
    answer = sandbox.run_json([sys.executable, "-c", script], limits=GENEROUS)
    assert "MODELPRESS_SECRET_FOR_TEST" not in answer["env"]
    assert not any("DATABASE" in k or "BROKER" in k or "REDIS" in k for k in answer["env"])
    assert answer["cwd"] != str(tmp_path) and answer["ls"] == []
    assert not os.path.exists(answer["cwd"])  # the empty folder is removed afterwards


def test_a_crashing_parser_is_a_failure_not_an_answer():
    with pytest.raises(sandbox.SandboxFailed):
        sandbox.run_json([sys.executable, "-c", "import os; os.abort()"], limits=GENEROUS)
    with pytest.raises(sandbox.SandboxFailed):
        sandbox.run_json([sys.executable, "-c", "print('[1, 2]')"], limits=GENEROUS)


def big_onnx(megabytes: int) -> bytes:
    """A valid one-node ONNX whose weight alone is `megabytes` MiB: reading it needs several times that."""
    weight = numpy_helper.from_array(np.zeros(megabytes * 1024**2 // 4, np.float32), "w")
    node = helper.make_node("Add", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [weight.dims[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [weight.dims[0]])], [weight])
    buffer = io.BytesIO()
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), buffer)
    return buffer.getvalue()


@pytest.fixture
def tight_client(tmp_path):
    from fastapi.testclient import TestClient

    from worker.serve import create_app

    # Room for the interpreter and a small model, not for reading a 300 MiB one several times over.
    settings = Settings(data_dir=tmp_path / "data", model_parse_memory_bytes=1024 * 1024**2)
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def test_a_model_that_needs_too_much_memory_to_read_is_refused_and_the_api_stays_up(tight_client, reference):
    assert_problem(upload(tight_client, big_onnx(300), "big.onnx"), 422, "model_parse_out_of_memory")
    assert tight_client.get("/healthz").status_code == 200
    assert upload(tight_client, reference.onnx.read_bytes(), "small.onnx").status_code == 201


def test_a_model_read_past_its_time_limit_is_refused(tmp_path, reference):
    from fastapi.testclient import TestClient

    from worker.serve import create_app

    # Even a warm child (onnx imported) does not read and check a 20 MiB model in 10 ms (about 0.3 s
    # in-process): the wall limit always fires first.
    settings = Settings(data_dir=tmp_path / "data", model_parse_timeout_s=0.01)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert_problem(upload(client, big_onnx(20), "m.onnx"), 422, "model_parse_timeout")
        assert client.get("/healthz").status_code == 200


def test_sandboxed_and_in_process_inspection_agree(reference):
    from service.models.inspect import inspect_model
    from service.models.sandboxed import inspect_model_sandboxed

    for path in (reference.onnx, reference.pt2, reference.torchscript):
        assert inspect_model_sandboxed(path, max_unpacked_bytes=2**30, limits=GENEROUS) == inspect_model(path)


def wait_for_idle_child(reader, not_pid: int | None = None) -> int:
    """The pid of the reader's waiting child (a new one, not `not_pid`), polled: it starts in the background."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pids = [pid for pid in reader.idle_pids() if pid != not_pid]
        if pids:
            return pids[0]
        time.sleep(0.05)
    raise AssertionError("no warm child was started")


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_each_upload_is_read_by_a_warm_child_used_once(tmp_path, reference):
    from fastapi.testclient import TestClient

    from worker.serve import create_app

    with TestClient(create_app(Settings(data_dir=tmp_path / "data")), raise_server_exceptions=False) as client:
        reader = client.app.state.context.model_reader
        first = wait_for_idle_child(reader)  # started with the app, before any upload
        assert upload(client, reference.onnx.read_bytes(), "a.onnx").status_code == 201
        assert not is_running(first) and first not in reader.idle_pids()  # it served the upload and exited
        second = wait_for_idle_child(reader, not_pid=first)
        assert second != first
        assert upload(client, reference.onnx.read_bytes(), "b.onnx").status_code == 201
        assert not is_running(second)
        third = wait_for_idle_child(reader, not_pid=second)
    assert not is_running(third)  # the app's shutdown ends its waiting child


def test_a_warm_child_waits_under_the_limits_with_no_secret_in_an_empty_folder(monkeypatch):
    from service.models.sandboxed import SandboxedModelReader

    monkeypatch.setenv("MODELPRESS_SECRET_FOR_TEST", "do-not-leak")
    limits = sandbox.Limits(wall_s=30, cpu_s=7, memory_bytes=1536 * 1024**2)
    reader = SandboxedModelReader(limits=limits)
    reader.start()
    try:
        pid = wait_for_idle_child(reader)
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        assert not any(b"MODELPRESS" in entry or b"DATABASE" in entry or b"BROKER" in entry for entry in environ)
        folder = os.readlink(f"/proc/{pid}/cwd")
        assert "modelpress-sandbox-" in folder and os.listdir(folder) == []
        limit_lines = {line[:26].strip(): line[26:].split() for line in open(f"/proc/{pid}/limits")}
        assert limit_lines["Max address space"][:2] == [str(limits.memory_bytes)] * 2
        # Soft: the imports' share; hard: room for the request's own cpu_s after them.
        assert limit_lines["Max cpu time"][:2] == ["7", "15"]
        assert limit_lines["Max core file size"][:2] == ["0", "0"]
    finally:
        reader.close()
    assert not is_running(pid) and not os.path.exists(folder)


def test_warm_and_cold_children_read_models_alike(reference, tmp_path):
    from service.models.sandboxed import SandboxedModelReader, inspect_model_sandboxed

    reader = SandboxedModelReader(limits=GENEROUS)
    reader.start()
    try:
        for path in (reference.onnx, reference.pt2, reference.torchscript):
            assert reader.inspect(path, max_unpacked_bytes=2**30) == inspect_model_sandboxed(
                path, max_unpacked_bytes=2**30, limits=GENEROUS)
        bad = tmp_path / "not-a-model.onnx"
        bad.write_bytes(b"\x00" * 64)
        with pytest.raises(Exception) as warm_error:
            reader.inspect(bad, max_unpacked_bytes=2**30)
        with pytest.raises(Exception) as cold_error:
            inspect_model_sandboxed(bad, max_unpacked_bytes=2**30, limits=GENEROUS)
        assert warm_error.value.code == cold_error.value.code
    finally:
        reader.close()


def test_a_warm_child_that_died_while_waiting_is_never_handed_an_upload(tmp_path, reference):
    import signal

    from fastapi.testclient import TestClient

    from worker.serve import create_app

    with TestClient(create_app(Settings(data_dir=tmp_path / "data")), raise_server_exceptions=False) as client:
        reader = client.app.state.context.model_reader
        waiting = wait_for_idle_child(reader)
        os.kill(waiting, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while open(f"/proc/{waiting}/stat").read().rsplit(")", 1)[1].split()[0] != "Z" and time.monotonic() < deadline:
            time.sleep(0.05)  # dead, not yet reaped: what the next upload finds
        assert upload(client, reference.onnx.read_bytes(), "a.onnx").status_code == 201
        assert not is_running(waiting)


# --- namespaces (service/confine.py) -------------------------------------------------------------

def probe_parser(tmp_path, *, confined: bool) -> dict:
    """What the test-only entry tests/sandbox_probe_entry.py reaches from a warm child."""
    import socket

    from service.confine import Confinement, available

    data = tmp_path / "data"
    (data / "objects").mkdir(parents=True)
    (data / "tmp").mkdir()
    secret = data / "modelpress.db"
    secret.write_text("secret")
    the_upload = data / "tmp" / "upload-1.onnx"
    the_upload.write_text("the upload")
    confinement = Confinement.of(data, data / "objects", inbox_root=data / "tmp" / "sandbox")
    if confined and not available(confinement):
        pytest.skip("this kernel refuses user namespaces: the sandbox runs with rlimits only")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        box = sandbox.WarmSandbox("tests.sandbox_probe_entry", limits=GENEROUS, spares=1,
                                  confinement=confinement if confined else None)
        box.start()
        try:
            port = str(listener.getsockname()[1])
            return box.run_json([str(the_upload), str(secret), port, str(data)], inputs=(the_upload,))["info"]
        finally:
            box.close()


def test_a_confined_parser_reads_its_upload_and_nothing_else_of_ours(tmp_path):
    seen = probe_parser(tmp_path, confined=True)
    assert seen["upload"] == "the upload"  # handed in, as a name in the child's own folder
    assert seen["secret"].startswith("refused")  # the database file, beside the upload
    assert seen["network"].startswith("refused")  # loopback: a server of ours listens there
    assert seen["data_folder"] == ["inbox"]  # an empty tmpfs, with the child's own folder


def test_the_probe_entry_reaches_both_when_not_confined(tmp_path):
    """The control: the entry does reach the file and the port when nothing stops it."""
    seen = probe_parser(tmp_path, confined=False)
    assert (seen["upload"], seen["secret"], seen["network"]) == ("the upload", "secret", "connected")
    assert "modelpress.db" in seen["data_folder"]


def test_uploads_are_read_by_confined_children_in_the_app(client, reference):
    from service.confine import Confinement, available

    settings = client.app.state.context.settings
    if not available(Confinement.of(settings.data_dir, inbox_root=settings.tmp_dir / "sandbox")):
        pytest.skip("this kernel refuses user namespaces")
    assert client.app.state.context.model_reader._sandbox.confinement is not None
    assert client.get("/readyz").json()["upload_parsers"] == "namespaces"  # the local user sees details
    for path in (reference.onnx, reference.pt2, reference.torchscript):
        assert upload(client, path.read_bytes(), path.name).status_code == 201


def test_namespaces_can_be_turned_off_and_readyz_says_so(tmp_path):
    from fastapi.testclient import TestClient

    from worker.serve import create_app

    with TestClient(create_app(Settings(data_dir=tmp_path / "data", parse_namespaces=False))) as client:
        assert client.app.state.context.model_reader._sandbox.confinement is None
        assert client.get("/readyz").json()["upload_parsers"] == "rlimits only"
