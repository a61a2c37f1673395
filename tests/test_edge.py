"""The edge-module entrypoints (fastshm-writer / fastshm-reader) and the IoT Edge example.

The entrypoints run as separate processes configured only through environment
variables, as IoT Edge starts them. Each test uses its own channel, so the
segments it checks for are its own even when other suites share /dev/shm.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import pytest

from fastshm import edge, segment_size

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "iotedge"
TIMEOUT = 30.0  # generous: a loaded two-core machine; the tests take far less
_counter = itertools.count()


# -- helpers ---------------------------------------------------------------------------


def channel() -> str:
    return f"edgetest{os.getpid()}n{next(_counter)}"


def segments_of(chan: str) -> List[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"fastshm.{chan}."))


def free_tcp_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def base_env(**fastshm: object) -> Dict[str, str]:
    """A clean environment: no FASTSHM_* or IOTEDGE_* from outside, this Python's path."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FASTSHM_", "IOTEDGE_")) and k != "EdgeHubConnectionString"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in fastshm.items():
        env[key if key.startswith(("IOTEDGE_", "FAKE_")) else "FASTSHM_" + key] = str(value)
    return env


def command(role: str) -> List[str]:
    """The console script when it is installed beside this Python, else ``-m``."""
    script = Path(sys.executable).parent / f"fastshm-{role}"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "fastshm.edge", role]


class Proc:
    """An entrypoint process whose stdout lines are collected by a thread."""

    def __init__(self, role: str, env: Dict[str, str], stdin: Optional[int] = None,
                 prefix: Sequence[str] = ()) -> None:
        self.role = role
        self.p = subprocess.Popen([*prefix, *command(role)], env=env, stdin=stdin,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.stderr: List[str] = []
        self._threads = [threading.Thread(target=self._pump, daemon=True),
                         threading.Thread(target=self._pump_err, daemon=True)]
        for t in self._threads:
            t.start()

    def _pump(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _pump_err(self) -> None:
        assert self.p.stderr is not None
        for line in self.p.stderr:
            self.stderr.append(line)

    def records(self, n: int, timeout: float = TIMEOUT) -> List[dict]:
        """The next ``n`` JSON lines; fails with the process's log if they do not come."""
        out: List[dict] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                pytest.fail(f"{self.role}: {len(out)} of {n} lines; log:\n{self.log()}")
            out.append(json.loads(line))
        return out

    def log(self) -> str:
        return "".join(self.stderr)

    def terminate(self) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        return self.wait()

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            pytest.fail(f"{self.role} did not exit; log:\n{self.log()}")
        for t in self._threads:
            t.join(5)
        return rc

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()
        for stream in (self.p.stdout, self.p.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def procs() -> Iterator[List[Proc]]:
    """Processes to end whatever happens in the test."""
    started: List[Proc] = []
    yield started
    for proc in started:
        proc.kill()


def start(procs: List[Proc], role: str, **env: object) -> Proc:
    proc = Proc(role, base_env(**env))
    procs.append(proc)
    return proc


# -- configuration ---------------------------------------------------------------------


def test_parse_size():
    assert edge.parse_size("6220800") == 6220800
    assert edge.parse_size("64k") == 65536
    assert edge.parse_size("1M") == edge.parse_size("1MiB") == edge.parse_size("1mb") == 1 << 20
    assert edge.parse_size("2G") == 2 << 30
    assert edge.parse_size("100b") == edge.parse_size(" 100 ") == 100
    for bad in ("", "-1", "1.5M", "12 parsecs", "1i", "1ib", "1kk"):
        with pytest.raises(ValueError):
            edge.parse_size(bad)


def test_environment_configures_and_flags_override():
    env = {"FASTSHM_URL": "tcp://0.0.0.0:6000", "FASTSHM_SLOT_SIZE": "2MiB", "FASTSHM_SLOTS": "4",
           "FASTSHM_MODE": "0640", "FASTSHM_RATE": "12.5", "FASTSHM_LOOP": "yes",
           "IOTEDGE_MODULEID": "camera writer", "IOTEDGE_DEVICEID": "dev-1"}
    cfg = edge.writer_config([], env)
    assert (cfg.url, cfg.slot_size, cfg.slots, cfg.mode, cfg.rate, cfg.loop) == \
        ("tcp://0.0.0.0:6000", 2 << 20, 4, 0o640, 12.5, True)
    assert cfg.frame_size == cfg.slot_size
    assert (cfg.module, cfg.device, cfg.channel) == ("camera writer", "dev-1", "camera_writer")
    cfg = edge.writer_config(["--slots", "16", "--url", "unix:///tmp/x.sock"], env)
    assert (cfg.slots, cfg.url) == (16, "unix:///tmp/x.sock")

    cfg = edge.reader_config([], {"FASTSHM_OUTPUT": "", "FASTSHM_RETRY_MAX": "0.5"})
    assert (cfg.output, cfg.retry_max, cfg.module, cfg.output_every) == ("", 0.5, None, 1)


def test_bad_environment_is_reported_like_a_bad_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        edge.writer_config([], {"FASTSHM_POLICY": "sometimes"})
    assert exc.value.code == 2
    assert "--policy" in capsys.readouterr().err


def test_shm_size_covers_the_segment_twice():
    seg, shm = edge.shm_size(6220800, 8)
    assert seg == segment_size(6220800, 8)
    assert shm >= 2 * seg and shm % (1 << 20) == 0
    out = subprocess.run([sys.executable, "-m", "fastshm.edge", "shm-size", "--slot-size", "64k",
                          "--slots", "3"], capture_output=True, text=True, env=base_env(),
                         timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["segment_size"] == segment_size(65536, 3)


def test_test_pattern_is_numbered_by_sequence():
    assert edge.test_pattern(1, 300) != edge.test_pattern(2, 300)
    assert edge.test_pattern(3, 300)[0] == 3


# -- the entrypoints as processes -------------------------------------------------------


@pytest.mark.parametrize("reader_first", [True, False], ids=["reader-first", "writer-first"])
def test_writer_and_reader_exchange_frames(procs, reader_first):
    url, chan, n = free_tcp_url(), channel(), 20
    reader_env = dict(URL=url, COUNT=n, VERIFY="pattern", IOTEDGE_MODULEID="fastshmreader",
                      IOTEDGE_DEVICEID="test-device")
    writer_env = dict(URL=url, CHANNEL=chan, SLOT_SIZE="64k", SLOTS=4, RATE=0, COUNT=n,
                      WAIT_SUBSCRIBERS=1)
    if reader_first:
        reader = start(procs, "reader", **reader_env)
        time.sleep(0.3)  # the reader is waiting for a writer that is not there yet
        writer = start(procs, "writer", **writer_env)
    else:
        writer = start(procs, "writer", **writer_env)
        time.sleep(0.3)
        reader = start(procs, "reader", **reader_env)
    records = reader.records(n)
    assert reader.wait() == 0, reader.log()
    assert writer.wait() == 0, writer.log()
    assert [r["seq"] for r in records] == list(range(1, n + 1))
    for r in records:
        assert r["bytes"] == 65536 and r["valid"] is True and r["transport"] == "shm"
        assert r["checksum"] == "crc32:%08x" % zlib.crc32(edge.test_pattern(r["seq"], 65536))
        assert r["latency_ms"] >= 0
        assert (r["module"], r["device"]) == ("fastshmreader", "test-device")
    assert segments_of(chan) == []


@pytest.mark.parametrize("policy", ["drop", "latest"])
def test_overflow_policy_reaches_the_writer(procs, tmp_path, policy):
    """With drop or latest the writer never waits for the reader: it may skip frames."""
    url, chan, n = f"unix://{tmp_path / 'route.sock'}", channel(), 200
    reader = start(procs, "reader", URL=url, VERIFY="pattern")
    writer = start(procs, "writer", URL=url, CHANNEL=chan, SLOT_SIZE="64k", SLOTS=4, RATE=0,
                   COUNT=n, WAIT_SUBSCRIBERS=1, POLICY=policy, SEND_TIMEOUT=0)
    assert writer.wait() == 0, writer.log()
    assert "dropped 0" in writer.log()  # no send ever failed: the policy skipped instead
    records = reader.records(1)
    assert reader.terminate() == 0
    while True:
        line = reader.lines.get(timeout=TIMEOUT)
        if line is None:
            break
        records.append(json.loads(line))
    seqs = [r["seq"] for r in records]
    assert seqs == sorted(set(seqs)) and all(1 <= q <= n for q in seqs)
    assert all(r["valid"] for r in records)
    assert segments_of(chan) == []


def test_sigterm_stops_both_cleanly(procs, tmp_path):
    sock = tmp_path / "route.sock"
    url, chan = f"unix://{sock}", channel()
    writer = start(procs, "writer", URL=url, CHANNEL=chan, SLOT_SIZE="256k", RATE=200)
    reader = start(procs, "reader", URL=url)
    reader.records(5)
    assert segments_of(chan)
    assert writer.terminate() == 0, writer.log()
    assert reader.terminate() == 0, reader.log()
    assert segments_of(chan) == []
    assert not sock.exists()
    assert "writer stopped" in writer.log()


def test_reader_survives_a_writer_restart(procs, tmp_path):
    url, chan = f"unix://{tmp_path / 'route.sock'}", channel()
    reader = start(procs, "reader", URL=url, VERIFY="pattern", RETRY_MAX=0.2)
    first = start(procs, "writer", URL=url, CHANNEL=chan, SLOT_SIZE="16k", RATE=100)
    before = reader.records(3)
    assert first.terminate() == 0, first.log()
    assert segments_of(chan) == []
    # The second writer sends nothing before the reader is back, so the reader's first
    # frame from it is its number 1; lines of the first writer may still be in the pipe.
    second = start(procs, "writer", URL=url, CHANNEL=chan, SLOT_SIZE="16k", RATE=100,
                   WAIT_SUBSCRIBERS=1)
    for _ in range(500):
        (record,) = reader.records(1)
        if record["seq"] == 1:
            break
    after = [record] + reader.records(2)
    assert [r["seq"] for r in after] == [1, 2, 3]
    assert all(r["valid"] for r in before + after)
    assert second.terminate() == 0, second.log()
    assert reader.terminate() == 0, reader.log()
    assert "reconnecting" in reader.log()
    assert segments_of(chan) == []


def test_stdin_source_sends_whole_frames(procs, tmp_path):
    url, chan, size = f"unix://{tmp_path / 'route.sock'}", channel(), 1000
    frames = [bytes([i]) * size for i in (7, 8, 9)]
    reader = start(procs, "reader", URL=url, COUNT=3)
    writer = Proc("writer", base_env(URL=url, CHANNEL=chan, SLOT_SIZE=size, SOURCE="stdin",
                                     RATE=0, WAIT_SUBSCRIBERS=1), stdin=subprocess.PIPE)
    procs.append(writer)
    assert writer.p.stdin is not None
    writer.p.stdin.buffer.write(b"".join(frames) + b"partial")
    writer.p.stdin.close()
    records = reader.records(3)
    assert reader.wait() == 0 and writer.wait() == 0, writer.log()
    assert [r["checksum"] for r in records] == ["crc32:%08x" % zlib.crc32(f) for f in frames]
    assert "partial frame of 7 bytes" in writer.log()


def test_sigterm_stops_a_writer_waiting_on_a_silent_pipe(procs, tmp_path):
    url, chan = f"unix://{tmp_path / 'route.sock'}", channel()
    writer = Proc("writer", base_env(URL=url, CHANNEL=chan, SLOT_SIZE=4096, SOURCE="stdin"),
                  stdin=subprocess.PIPE)
    procs.append(writer)
    wait_for_segment(chan)
    time.sleep(0.3)  # blocked on stdin, which stays open and silent
    assert writer.terminate() == 0, writer.log()
    assert segments_of(chan) == []


def test_file_source_loops(procs, tmp_path):
    url, chan, size = f"unix://{tmp_path / 'route.sock'}", channel(), 4096
    raw = tmp_path / "frames.raw"
    raw.write_bytes(b"a" * size + b"b" * size)
    reader = start(procs, "reader", URL=url, COUNT=5)
    writer = start(procs, "writer", URL=url, CHANNEL=chan, SLOT_SIZE=size,
                   SOURCE=f"file:{raw}", LOOP=1, RATE=0, COUNT=5, WAIT_SUBSCRIBERS=1)
    records = reader.records(5)
    assert reader.wait() == 0 and writer.wait() == 0
    a, b = ("crc32:%08x" % zlib.crc32(c * size) for c in (b"a", b"b"))
    assert [r["checksum"] for r in records] == [a, b, a, b, a]


def unprivileged_reader(procs: List[Proc], **env: object) -> Proc:
    """A reader without the capabilities that let root ignore file permissions.

    It stays uid 0 (the interpreter may live where no other user can reach it), so
    the tests give the segment another owner: the reader then gets exactly the access
    that the segment's group and mode grant to a reader of another user.
    """
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv, to take the reader's file capabilities away")
    proc = Proc("reader", base_env(**env), prefix=[
        setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--"])
    procs.append(proc)
    return proc


def wait_for_segment(chan: str) -> str:
    deadline = time.monotonic() + TIMEOUT
    while not segments_of(chan):
        assert time.monotonic() < deadline, "the writer created no segment"
        time.sleep(0.02)
    return "/dev/shm/" + segments_of(chan)[0]


def test_reader_of_another_user_maps_group_readable_segments(procs):
    """The README's setup: writer and reader are different users of one group, mode 0640."""
    url, chan, n = free_tcp_url(), channel(), 5
    writer = start(procs, "writer", URL=url, CHANNEL=chan, SLOT_SIZE="64k", RATE=0, COUNT=n,
                   WAIT_SUBSCRIBERS=1, MODE="0640", GROUP=os.getegid())
    path = wait_for_segment(chan)
    assert os.stat(path).st_mode & 0o777 == 0o640
    os.chown(path, 65534, -1)  # another owner; the reader's group stays the segment's
    reader = unprivileged_reader(procs, URL=url, COUNT=n, VERIFY="pattern")
    records = reader.records(n)
    assert reader.wait() == 0 and writer.wait() == 0, reader.log()
    assert all(r["valid"] and r["transport"] == "shm" for r in records)


def test_reader_that_cannot_map_exits_after_repeated_failures(procs):
    """A private segment (0600) of another user: the reader says why and, when asked, exits 3."""
    url, chan = free_tcp_url(), channel()
    writer = start(procs, "writer", URL=url, CHANNEL=chan, SLOT_SIZE="64k", RATE=50)
    os.chown(wait_for_segment(chan), 65534, 65534)
    reader = unprivileged_reader(procs, URL=url, EXIT_ON_MAP_FAILURES=2, RETRY_MAX=0.1)
    assert reader.wait() == edge.EXIT_NO_MAPPING
    assert "Permission denied" in reader.log() and "exiting" in reader.log()
    assert writer.terminate() == 0
    assert segments_of(chan) == []


def test_writer_refuses_a_frame_larger_than_its_slots(procs, tmp_path):
    writer = start(procs, "writer", URL=f"unix://{tmp_path / 's.sock'}", SLOT_SIZE=1000,
                   FRAME_SIZE=2000)
    assert writer.wait() == 2
    assert "larger than FASTSHM_SLOT_SIZE" in writer.log()


FAKE_AZURE = '''
"""A stand-in for azure.iot.device: records what the reader sends to its output."""
import json, os

class Message:
    def __init__(self, data, content_encoding=None, content_type=None):
        self.data, self.content_encoding, self.content_type = data, content_encoding, content_type

class IoTHubModuleClient:
    @classmethod
    def create_from_edge_environment(cls):
        assert os.environ["IOTEDGE_MODULEID"]
        return cls()
    def connect(self):
        # Fail the first FAKE_IOTEDGE_FAILS connections, as while edgeHub is starting.
        marker = os.environ["FAKE_IOTEDGE_LOG"] + ".fails"
        fails = int(open(marker).read()) if os.path.exists(marker) else 0
        if fails < int(os.environ.get("FAKE_IOTEDGE_FAILS", "0")):
            open(marker, "w").write(str(fails + 1))
            raise ConnectionRefusedError("edgeHub is not up yet")
        self.log = open(os.environ["FAKE_IOTEDGE_LOG"], "a")
    def send_message_to_output(self, message, output_name):
        self.log.write(json.dumps({"output": output_name, "type": message.content_type,
                                   "encoding": message.content_encoding,
                                   "body": json.loads(message.data)}) + "\\n")
        self.log.flush()
    def shutdown(self):
        self.log.write(json.dumps({"shutdown": True}) + "\\n")
        self.log.close()
'''


def test_reader_reports_to_the_iot_edge_output(procs, tmp_path):
    package = tmp_path / "fake" / "azure" / "iot" / "device"
    package.mkdir(parents=True)
    for d in (package.parent.parent, package.parent):
        (d / "__init__.py").write_text("")
    (package / "__init__.py").write_text(FAKE_AZURE)
    sent = tmp_path / "sent.jsonl"
    url, chan = f"unix://{tmp_path / 'route.sock'}", channel()
    n = 20  # one second of frames: the reader's first connection to "edgeHub" fails
    env = base_env(URL=url, COUNT=n, OUTPUT="frames", OUTPUT_EVERY=2,
                   IOTEDGE_MODULEID="fastshmreader", IOTEDGE_DEVICEID="dev",
                   IOTEDGE_WORKLOADURI="unix:///var/run/iotedge/workload.sock",
                   FAKE_IOTEDGE_LOG=sent, FAKE_IOTEDGE_FAILS=1)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "fake"), env["PYTHONPATH"]])
    reader = Proc("reader", env)
    procs.append(reader)
    writer = start(procs, "writer", URL=url, CHANNEL=chan, SLOT_SIZE="8k", RATE=20, COUNT=n,
                   WAIT_SUBSCRIBERS=1)
    stdout = reader.records(n)
    assert reader.wait() == 0 and writer.wait() == 0, reader.log()
    lines = [json.loads(line) for line in sent.read_text().splitlines()]
    assert lines[-1] == {"shutdown": True}
    reports = lines[:-1]
    assert [r["body"] for r in reports] == stdout[::2]
    assert {(r["output"], r["type"], r["encoding"]) for r in reports} == \
        {("frames", "application/json", "utf-8")}
    assert "cannot connect to the IoT Edge hub yet" in reader.log()  # and then could


def test_python_m_fastshm_edge_usage():
    run = [sys.executable, "-m", "fastshm.edge"]
    assert subprocess.run(run, capture_output=True, env=base_env(), timeout=TIMEOUT).returncode == 2
    for role in ("writer", "reader"):
        out = subprocess.run(run + [role, "--help"], capture_output=True, text=True,
                             env=base_env(), timeout=TIMEOUT)
        assert out.returncode == 0 and "FASTSHM_URL" in out.stdout


# -- the IoT Edge example -----------------------------------------------------------------


def load_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def create_options(module: dict) -> dict:
    """createOptions as the template writes them: an object, or stringified JSON."""
    opts = module["settings"].get("createOptions", {})
    return json.loads(opts) if isinstance(opts, str) else opts


@pytest.fixture(scope="module")
def deployment() -> dict:
    return load_json(EXAMPLE / "deployment.template.json")


def test_deployment_has_the_runtime_and_both_modules(deployment):
    content = deployment["modulesContent"]
    agent = content["$edgeAgent"]["properties.desired"]
    hub = content["$edgeHub"]["properties.desired"]
    assert agent["schemaVersion"] == hub["schemaVersion"] == "1.1"
    assert agent["runtime"]["type"] == "docker"
    assert set(agent["systemModules"]) == {"edgeAgent", "edgeHub"}
    assert set(agent["modules"]) == {"fastshmwriter", "fastshmreader"}
    for name, module in agent["modules"].items():
        assert module["type"] == "docker" and module["status"] == "running"
        assert module["restartPolicy"] in ("never", "on-failure", "on-unhealthy", "always")
        assert module["settings"]["image"] == "${MODULES.%s}" % name
        assert (EXAMPLE / "modules" / name / "module.json").exists()
        for value in module["env"].values():
            assert set(value) == {"value"} and isinstance(value["value"], str)
    assert hub["storeAndForwardConfiguration"]["timeToLiveSecs"] > 0


def test_deployment_environment_is_what_the_entrypoints_read(deployment):
    modules = deployment["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]
    writer_env = {k: v["value"] for k, v in modules["fastshmwriter"]["env"].items()}
    reader_env = {k: v["value"] for k, v in modules["fastshmreader"]["env"].items()}
    assert set(writer_env) <= edge.WRITER_ENV
    assert set(reader_env) <= edge.READER_ENV
    # Values parse as the entrypoints parse them (placeholders aside).
    filled = {k: ("x" if v.startswith("${") else v) for k, v in writer_env.items()}
    wcfg = edge.writer_config([], filled)
    rcfg = edge.reader_config([], {k: ("x" if v.startswith("${") else v)
                                   for k, v in reader_env.items()})
    # The reader connects to the writer's module (IoT Edge names containers after modules),
    # on the port the writer listens on, with the same secret.
    wport = re.fullmatch(r"tcp://0\.0\.0\.0:(\d+)", wcfg.url)
    rhost = re.fullmatch(r"tcp://([^:]+):(\d+)", rcfg.url)
    assert wport and rhost
    assert rhost.group(1) == "fastshmwriter" and rhost.group(2) == wport.group(1)
    assert writer_env["FASTSHM_SECRET"] == reader_env["FASTSHM_SECRET"] == "${FASTSHM_SECRET}"
    # Group-readable, not world-readable: the reader runs as another user of the group.
    assert wcfg.mode & 0o040 and not wcfg.mode & 0o007
    assert wcfg.frame_size == wcfg.slot_size


def test_deployment_shares_ipc_and_sizes_dev_shm(deployment):
    modules = deployment["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]
    writer, reader = modules["fastshmwriter"], modules["fastshmreader"]
    wopts, ropts = create_options(writer), create_options(reader)
    assert wopts["HostConfig"]["IpcMode"] == "shareable"
    assert ropts["HostConfig"]["IpcMode"] == "container:fastshmwriter"
    assert "ShmSize" not in ropts["HostConfig"]  # the reader uses the writer's /dev/shm
    assert writer["startupOrder"] < reader["startupOrder"]
    env = {k: v["value"] for k, v in writer["env"].items()}
    _, needed = edge.shm_size(edge.parse_size(env["FASTSHM_SLOT_SIZE"]), int(env["FASTSHM_SLOTS"]))
    shm = wopts["HostConfig"]["ShmSize"]
    assert isinstance(shm, int) and needed <= shm < 2 ** 31
    # Different users, one group; the images say the same.
    wuser, ruser = wopts["User"].split(":"), ropts["User"].split(":")
    assert wuser[0] != ruser[0] and wuser[1] == ruser[1]
    for name, user in (("fastshmwriter", wopts["User"]), ("fastshmreader", ropts["User"])):
        for dockerfile in (EXAMPLE / "modules" / name).glob("Dockerfile.*"):
            assert f"USER {user}" in dockerfile.read_text()


def test_deployment_routes_the_reader_output_upstream(deployment):
    routes = deployment["modulesContent"]["$edgeHub"]["properties.desired"]["routes"]
    modules = deployment["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]
    output = modules["fastshmreader"]["env"]["FASTSHM_OUTPUT"]["value"]
    assert f"FROM /messages/modules/fastshmreader/outputs/{output} INTO $upstream" in \
        routes.values()


@pytest.mark.parametrize("name,script", [("fastshmwriter", "fastshm-writer"),
                                         ("fastshmreader", "fastshm-reader")])
def test_module_json_and_dockerfiles(name, script):
    # Module names are letters and digits: they are container and host names too.
    assert re.fullmatch(r"[a-z0-9]+", name)
    folder = EXAMPLE / "modules" / name
    spec = load_json(folder / "module.json")
    image = spec["image"]
    assert image["repository"].endswith("/" + name)
    assert set(image["tag"]["platforms"]) == {"amd64", "arm64v8", "arm32v7"}
    context = (folder / image["contextPath"]).resolve()
    assert context == EXAMPLE.resolve() and (context / "wheels").is_dir()
    for platform, dockerfile in image["tag"]["platforms"].items():
        text = (folder / dockerfile).read_text()
        froms = re.findall(r"^FROM (\S+)", text, re.M)
        assert froms == [("" if platform == "amd64" else platform + "/") +
                         "python:${PYTHON_VERSION}-slim-bookworm"]
        assert "COPY wheels/ " in text and "--no-index --find-links" in text
        assert f'CMD ["{script}"]' in text
        assert re.search(r"^USER \d+:\d+$", text, re.M)  # numeric: non-root is checkable


def test_console_scripts_match_the_images():
    text = (ROOT / "pyproject.toml").read_text()
    for name in ("fastshm-writer", "fastshm-reader"):
        assert f'{name} = "fastshm.edge:{name.split("-")[1]}_main"' in text
    assert re.search(r'^iotedge = \["azure-iot-device>=2,<3"\]', text, re.M)


@pytest.mark.parametrize("value", ["${FASTSHM_SECRET}", "", "  "])
@pytest.mark.parametrize("main", [edge.writer_main, edge.reader_main])
def test_unexpanded_or_empty_secret_is_one_line_and_exit_2(monkeypatch, capsys, main, value):
    monkeypatch.setenv("FASTSHM_SECRET", value)
    assert main([]) == edge.EXIT_CONFIG
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FASTSHM_SECRET" in err[0]
