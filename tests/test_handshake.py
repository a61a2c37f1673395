"""The handshake: authentication, same-host proof, inline fallback, permissions.

Several tests run a subscriber where the publisher's memory is out of reach:
in a private /dev/shm (``unshare --mount`` + tmpfs), in a network namespace
reached over a veth pair, or as another user.  They need root and skip, saying
why, where the kernel refuses.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastshm import AuthenticationError, Publisher, Segment, Subscriber
from fastshm import handshake as H
from fastshm.demo import expected_frame, pattern
from handshakes import connect

REMOTE = str(Path(__file__).with_name("remote_peer.py"))


def _can_unshare() -> str:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return "needs root and unshare(1)"
    rc = subprocess.run(["unshare", "--mount", "sh", "-c", "mount -t tmpfs tmpfs /dev/shm"],
                        capture_output=True, text=True)
    return "" if rc.returncode == 0 else f"the kernel refused a private /dev/shm: {rc.stderr}"


UNSHARE_PROBLEM = _can_unshare()
needs_unshare = pytest.mark.skipif(bool(UNSHARE_PROBLEM), reason=UNSHARE_PROBLEM)


def remote(url: str, *args: str, prefix=(), private_shm: bool = False) -> subprocess.Popen:
    """Start tests/remote_peer.py, optionally in its own /dev/shm, under ``prefix``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, REMOTE, url, *args]
    if private_shm:
        script = 'mount -t tmpfs tmpfs /dev/shm && exec "$@"'
        cmd = ["unshare", "--mount", "sh", "-c", script, "sh", *cmd]
    return subprocess.Popen([*prefix, *cmd], stdout=subprocess.PIPE, text=True, env=env)


def serve(pub: Publisher, proc: subprocess.Popen, count: int, size: int,
          timeout: float = 60) -> dict:
    """Wait for the remote subscriber, send it ``count`` frames, return its report."""
    base = pattern(size)
    try:
        pub.wait_for_subscribers(1, timeout=timeout)
        for seq in range(1, count + 1):
            assert pub.send(expected_frame(base, seq, size), timeout=timeout) == 1
        while proc.poll() is None:
            pub.poll(0.01)
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
    return json.loads(out.strip().splitlines()[-1])


# --- authentication -------------------------------------------------------------

def test_right_secret_is_served_wrong_one_is_refused(route, caplog):
    with Publisher(route, slot_size=256, slots=2, secret="s3cret") as pub:
        good = Subscriber(pub.url, secret="s3cret", connect_timeout=5)
        bad = Subscriber(pub.url, secret="guess", connect_timeout=5)
        with caplog.at_level(logging.WARNING, logger="fastshm"):
            with pytest.raises(AuthenticationError, match="refused"):
                connect(pub, bad, timeout=2)
        assert "proof of the shared secret is wrong" in caplog.text
        assert bad.closed
        connect(pub, good)
        assert pub.subscribers == 1 and pub.stats()["auth_failures"] == 1
        pub.send(b"for friends")
        assert bytes(good.receive(timeout=5)) == b"for friends"
        good.close()
        bad.close()


def test_missing_secret_on_either_side_is_refused(route, caplog):
    with caplog.at_level(logging.WARNING, logger="fastshm"):
        with Publisher(route, slot_size=64, slots=1, secret=b"k") as pub:
            with Subscriber(pub.url, connect_timeout=5) as sub:
                with pytest.raises(AuthenticationError, match="requires a shared secret"):
                    connect(pub, sub, timeout=2)
                for _ in range(10):
                    pub.poll(0.01)  # reads the subscriber's ERROR and logs it
            assert pub.stats()["auth_failures"] == 1
        assert "refused this publisher" in caplog.text and "requires a shared secret" \
            in caplog.text
        caplog.clear()
        with Publisher(route, slot_size=64, slots=1) as pub:
            with Subscriber(pub.url, connect_timeout=5, secret="k") as sub:
                with pytest.raises(AuthenticationError, match="cannot prove"):
                    connect(pub, sub, timeout=2)
                for _ in range(10):
                    pub.poll(0.01)
        assert "cannot prove it knows the secret" in caplog.text


def test_secret_from_the_environment(route, monkeypatch):
    monkeypatch.setenv("FASTSHM_SECRET", "from-env")
    with Publisher(route, slot_size=64, slots=1) as pub:
        with Subscriber(pub.url, connect_timeout=5) as sub:
            connect(pub, sub)
            pub.send(b"ok")
            assert bytes(sub.receive(timeout=5)) == b"ok"
        with Subscriber(pub.url, connect_timeout=5, secret="other") as sub:
            with pytest.raises(AuthenticationError):
                connect(pub, sub, timeout=2)


def test_the_publisher_proves_itself_too():
    """A publisher that answers AUTH with a wrong HMAC is refused by the subscriber."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    from fastshm import _core, protocol as P
    url = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    sub = Subscriber(url, secret="k", connect_timeout=5)
    conn, _ = listener.accept()
    try:
        stream = _core.Stream(conn)
        conn.setblocking(False)
        stream.fill(5)
        ftype, hello = stream.next_frame()
        assert ftype == P.HELLO and P.unpack_hello(hello).features & P.FEATURE_AUTH
        stream.queue(P.HELLO, P.pack_hello(P.Hello(1, 1, P.FEATURE_SHM | P.FEATURE_AUTH, 0,
                                                   os.urandom(16), "")))
        stream.queue(P.AUTH, b"\0" * 32)
        stream.flush(5)
        with pytest.raises(AuthenticationError, match="did not prove"):
            sub.wait_ready(5)
    finally:
        sub.close()
        conn.close()
        listener.close()


def test_binding_a_public_address_needs_a_secret_or_an_opt_out():
    with pytest.raises(ValueError, match="without a secret"):
        Publisher("tcp://0.0.0.0:0", slot_size=64, slots=1)
    with pytest.raises(ValueError, match="insecure=True"):
        Publisher("tcp://[::]:0", slot_size=64, slots=1)
    with Publisher("tcp://0.0.0.0:0", slot_size=64, slots=1, insecure=True):
        pass
    with Publisher("tcp://0.0.0.0:0", slot_size=64, slots=1, secret="k"):
        pass
    for host in ("127.0.0.1", "127.3.2.1", "localhost", "[::1]"):
        if host == "localhost" and not _resolves(host):
            # A name that does not resolve (a minimal root without /etc/hosts) is
            # not known to be loopback: refused like any other.
            with pytest.raises(ValueError, match="without a secret"):
                Publisher(f"tcp://{host}:0", slot_size=64, slots=1)
            continue
        try:
            Publisher(f"tcp://{host}:0", slot_size=64, slots=1).close()
        except OSError as exc:  # no IPv6 here
            assert host == "[::1]", exc


def _resolves(host: str) -> bool:
    try:
        return bool(socket.getaddrinfo(host, None))
    except OSError:
        return False


# --- inline fallback ------------------------------------------------------------

def test_inline_transport_in_process(route):
    size = 300_000
    base = pattern(size)
    with Publisher(route, slot_size=size, slots=2) as pub:
        with Subscriber(pub.url, connect_timeout=5, transport="inline") as sub:
            connect(pub, sub)
            assert sub.transport == "inline"
            for seq in range(1, 21):
                pub.send(expected_frame(base, seq, size), timeout=5, meta=b"m%d" % seq)
                msg = None
                while msg is None:  # the rest of a large payload goes when pub is served
                    pub.poll(0.001)
                    msg = sub.receive(timeout=0.01)
                assert msg.inline and msg.seq == seq and msg.meta == b"m%d" % seq
                assert bytes(msg) == expected_frame(base, seq, size)
                msg.release()
            # Slots come back when their bytes are sent, not when the subscriber releases.
            deadline = time.monotonic() + 5
            while pub.stats()["slots_free"] < 2 and time.monotonic() < deadline:
                pub.poll(0.01)
            assert pub.stats()["slots_free"] == 2


def test_a_wrong_probe_token_means_inline(route, monkeypatch):
    real = H.read_probe

    def wrong_token(name):
        status, token, err = real(name)
        return status, bytes(32), err

    monkeypatch.setattr(H, "read_probe", wrong_token)
    with Publisher(route, slot_size=64, slots=2) as pub:
        with Subscriber(pub.url, connect_timeout=5) as sub:
            connect(pub, sub)
            assert sub.transport == "inline"
            pub.send(b"through the socket")
            msg = sub.receive(timeout=5)
            assert msg.inline and bytes(msg) == b"through the socket"


@needs_unshare
def test_subscriber_with_a_private_dev_shm_gets_verified_frames_inline(route):
    """The reader cannot see the writer's /dev/shm: 200 frames arrive inline, byte-checked."""
    size = 200_000
    with Publisher(route, slot_size=size, slots=4) as pub:
        proc = remote(pub.url, "--size", str(size), "--count", "200", private_shm=True)
        report = serve(pub, proc, 200, size)
    assert report == {"transport": "inline", "received": 200, "bad": 0, "inline": 200}


@needs_unshare
def test_shm_only_subscriber_elsewhere_says_what_is_wrong(route):
    with Publisher(route, slot_size=64, slots=1) as pub:
        proc = remote(pub.url, "--transport", "shm", "--count", "1", private_shm=True)
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            pub.poll(0.01)
        out = proc.communicate(timeout=30)[0]
        proc.stdout.close()
    report = json.loads(out.strip().splitlines()[-1])
    assert report["error"].startswith("FileNotFoundError")
    assert "another /dev/shm" in report["error"] and report["received"] == 0


# --- a subscriber in its own network namespace, over a veth pair ----------------

@pytest.fixture
def netns():
    """A network namespace joined to this one by a veth pair: 10.213.x.1 here, .2 there."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and ip(8) for a network namespace")
    tag = f"fs{os.getpid() % 100000}"
    ns, host_if, ns_if = f"{tag}ns", f"{tag}h", f"{tag}p"
    net = f"10.213.{os.getpid() % 250}"
    steps = [
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns],
        ["ip", "addr", "add", f"{net}.1/30", "dev", host_if],
        ["ip", "link", "set", host_if, "up"],
        ["ip", "-n", ns, "addr", "add", f"{net}.2/30", "dev", ns_if],
        ["ip", "-n", ns, "link", "set", ns_if, "up"],
        ["ip", "-n", ns, "link", "set", "lo", "up"],
    ]
    try:
        for step in steps:
            rc = subprocess.run(step, capture_output=True, text=True)
            if rc.returncode:
                pytest.skip(f"the kernel refused a network namespace: {' '.join(step)}: "
                            f"{rc.stderr.strip()}")
        yield ns, f"{net}.1"
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)


@pytest.mark.parametrize("private_shm", [False, True], ids=["shared-shm", "private-shm"])
def test_subscriber_in_another_network_namespace(netns, private_shm):
    """Another IP address says nothing: shared memory is used when the probe proves it."""
    if private_shm and UNSHARE_PROBLEM:
        pytest.skip(UNSHARE_PROBLEM)
    ns, host = netns
    size = 100_000
    with Publisher(f"tcp://{host}:0", slot_size=size, slots=4, secret="veth") as pub:
        proc = remote(pub.url, "--size", str(size), "--count", "100", "--secret", "veth",
                      prefix=["ip", "netns", "exec", ns], private_shm=private_shm)
        report = serve(pub, proc, 100, size)
    transport = "inline" if private_shm else "shm"
    assert report == {"transport": transport, "received": 100, "bad": 0,
                      "inline": 100 if private_shm else 0}


# --- permissions ----------------------------------------------------------------

NOBODY = 65534


def as_nobody(pub: Publisher, action, send: bytes = b"") -> dict:
    """Run ``action()`` in a forked child as uid/gid 65534 while serving ``pub``.

    ``send``, if given, is published once the child has subscribed.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to switch users")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            result = action()
        except BaseException as exc:
            result = {"error": type(exc).__name__, "message": str(exc)}
        try:
            os.write(w, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.set_blocking(r, False)
    data = b""
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            pub.poll(0.01)
            if send and pub.subscribers and pub.stats()["sent"] == 0:
                pub.send(send)
            try:
                chunk = os.read(r, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return json.loads(data)


def receive_one(url: str, **kwargs) -> dict:
    with Subscriber(url, connect_timeout=5, **kwargs) as sub:
        sub.wait_ready(10)
        msg = sub.receive(timeout=10)
        return {"transport": sub.transport, "data": bytes(msg).decode()}


def test_segments_are_private_to_their_owner_by_default():
    with Publisher("tcp://127.0.0.1:0", slot_size=64, slots=1) as pub:
        assert os.stat(f"/dev/shm/{pub.segment_name}").st_mode & 0o777 == 0o600
        result = as_nobody(pub, lambda: receive_one(pub.url), send=b"secret")
    assert result["error"] == "PermissionError"
    assert "mode=0o640" in result["message"] and "group=" in result["message"]
    assert "uid 65534" in result["message"] and "transport='inline'" in result["message"]


def test_group_readable_segments_serve_another_user():
    with Publisher("tcp://127.0.0.1:0", slot_size=64, slots=1, mode=0o640,
                   group=NOBODY) as pub:
        st = os.stat(f"/dev/shm/{pub.segment_name}")
        assert (st.st_mode & 0o777, st.st_gid) == (0o640, NOBODY)
        result = as_nobody(pub, lambda: receive_one(pub.url), send=b"shared with a group")
    assert result == {"transport": "shm", "data": "shared with a group"}


def test_a_user_who_may_not_map_can_still_ask_for_inline():
    with Publisher("tcp://127.0.0.1:0", slot_size=64, slots=1) as pub:
        result = as_nobody(pub, lambda: receive_one(pub.url, transport="inline"),
                           send=b"over the socket")
    assert result == {"transport": "inline", "data": "over the socket"}


def test_open_as_another_user_explains_what_to_change():
    with Segment.create(4096) as seg:
        with Publisher("tcp://127.0.0.1:0", slot_size=64, slots=1) as pub:
            result = as_nobody(pub, lambda: Segment.open(seg.name) and {})
    assert result["error"] == "PermissionError"
    assert "mode 0o600" in result["message"] and "mode=0o640" in result["message"]


def test_inline_batches_and_arrays_keep_their_slots_accounted(route):
    np = pytest.importorskip("numpy")
    with Publisher(route, slot_size=4096, slots=4) as pub:
        with Subscriber(pub.url, connect_timeout=5, transport="inline") as sub:
            connect(pub, sub)
            with pub.batch():
                for i in range(3):
                    pub.send(bytes([i]) * 100)
            got = [sub.receive(timeout=5) for _ in range(3)]
            assert [bytes(m) for m in got] == [bytes([i]) * 100 for i in range(3)]
            assert all(m.inline for m in got)
            arr = np.arange(12, dtype=np.float32).reshape(3, 4)
            pub.send(arr, meta=b"tag")
            msg = sub.receive(timeout=5)
            assert msg.inline and msg.meta == b"tag"
            view = msg.array()
            assert view.dtype == np.float32 and view.shape == (3, 4)
            assert (view == arr).all()
            del view
            for _ in range(20):
                pub.poll(0.005)
            assert pub.stats()["slots_free"] == 4
            assert sub.stats()["held"] == 0 and sub.stats()["inline"] == 4
            assert [p["transport"] for p in pub.stats()["peers"]] == ["inline"]


def test_an_event_loop_is_woken_to_finish_a_large_inline_payload(route):
    """Output that the socket could not take makes fileno() readable until it is sent."""
    import select as _select
    # Larger than what loopback socket buffers can hold in flight, even autotuned.
    size = 32 << 20
    payload = os.urandom(size)
    with Publisher(route, slot_size=size, slots=2) as pub:
        with Subscriber(pub.url, connect_timeout=5, transport="inline") as sub:
            connect(pub, sub)
            pub.send(payload)
            peer = pub._ready[0]
            assert peer.stream.pending > 0  # more than the socket buffers hold
            loop = _select.epoll()
            loop.register(pub.fileno(), _select.EPOLLIN)
            try:
                msg = None
                deadline = time.monotonic() + 10
                while msg is None and time.monotonic() < deadline:
                    if loop.poll(0.05):  # what an event loop does: poll when told to
                        pub.poll(0)
                    msg = sub.receive(timeout=0.01)
            finally:
                loop.close()
            assert msg is not None and msg.inline and bytes(msg) == payload
            assert peer.stream.pending == 0 and not peer.writing


def test_latest_policy_with_an_inline_subscriber(route):
    """Credit comes back as payloads leave, and the newest waiting message follows."""
    size = 4 << 20
    with Publisher(route, slot_size=size, slots=4, policy="latest", window=1) as pub:
        with Subscriber(pub.url, connect_timeout=5, transport="inline") as sub:
            connect(pub, sub)
            for i in range(1, 6):
                pub.send(bytes([i]) * size, timeout=5)
            got = []
            deadline = time.monotonic() + 10
            while len(got) < 2 and time.monotonic() < deadline:
                pub.poll(0.005)
                msg = sub.receive(timeout=0.005)
                if msg is not None:
                    got.append(msg.tobytes()[:1])
                    msg.release()
            assert got == [b"\x01", b"\x05"]
            for _ in range(20):
                pub.poll(0.005)
            assert pub.stats()["slots_free"] == 4 and pub.stats()["drops"] == 3
