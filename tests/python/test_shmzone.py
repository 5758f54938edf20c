# SPDX-License-Identifier: LGPL-2.1-or-later
"""The shmzone module against a real shmzoned."""
import asyncio
import errno
import gc
import os
import shutil
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

import shmzone
from conftest import python_peer, read_line, wait_exit
from shmzd import Daemon, mounted

HERE = os.path.dirname(os.path.abspath(__file__))


def memfd_mapped(address):
    """True if address lies in a shared mapping of a memfd in this process (shared memory, not a copy)."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                return fields[1][3] == "s" and len(fields) > 5 and fields[5].startswith("/memfd:")
    return False


def address_of(buf):
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def port_pair(client, name="pair"):
    l = client.listen(name, mode=0o600)
    a = client.connect_port(name)
    b = l.accept(timeout=10)
    l.close()
    return a, b


# ---- zones ------------------------------------------------------------------------------------------

def test_zone_create_attach_stat(client, daemon):
    z = client.zone("cache", size=1 << 20, tag="mine", mode=0o640)
    assert (z.name, z.size, z.existed) == ("cache", 1 << 20, False)
    st = client.stat("cache")
    assert (st.name, st.tag, st.size, st.mode & 0o7777, st.attached) == ("cache", "mine", 1 << 20, 0o640, 1)
    assert [s.name for s in client.zones()] == ["cache"]
    again = client.zone("cache", size=1 << 20, tag="mine")
    assert again.existed
    with pytest.raises(FileExistsError) as e:
        client.zone("cache", size=1 << 20, tag="other")
    assert e.value.errno == errno.EEXIST
    with pytest.raises(FileNotFoundError):
        client.zone("missing")
    with pytest.raises(FileExistsError):
        client.zone("cache", size=1 << 20, tag="mine", exclusive=True)
    client.chmod("cache", 0o600)
    assert client.stat("cache").mode & 0o7777 == 0o600
    assert client.status().zones == 1
    # Through the FUSE view: the same bytes.
    memoryview(z)[:5] = b"hello"
    v = shmzone.open_path(os.path.join(daemon.mount, "zones", "cache"))
    assert bytes(memoryview(v)[:5]) == b"hello"
    v.close()
    z.close()
    again.close()
    client.unlink("cache")
    with pytest.raises(FileNotFoundError):
        client.stat("cache")


def test_allocator_and_root(client):
    z = client.zone("heap", size=1 << 20)
    off = z.alloc(100)
    b = z.buffer(off, 100)
    b[:] = bytes(range(100))
    z.root = off
    assert z.root == off
    # Offsets are the zone's: memoryview(z) starts after its header.
    assert bytes(memoryview(z)[off - shmzone.ZONE_HEADER_SIZE:][:3]) == b"\x00\x01\x02"
    other = client.zone("heap")
    assert other.root == off and bytes(other.buffer(off, 100)) == bytes(range(100))
    assert z.check()
    z.free(off)
    with pytest.raises(OSError) as e:
        z.free(off)  # twice
    assert e.value.errno == errno.EALREADY
    with pytest.raises(ValueError):
        z.buffer(z.size + shmzone.ZONE_HEADER_SIZE - 10, 100)
    with pytest.raises(MemoryError):
        z.alloc(2 << 20)
    z.root = 0
    assert z.root == 0


def test_readonly_zone(client):
    client.zone("ro", size=1 << 16)
    r = client.zone("ro", readonly=True)
    mv = memoryview(r)
    assert mv.readonly
    with pytest.raises(TypeError):
        mv[0] = 1
    with pytest.raises(OSError) as e:
        r.alloc(10)
    assert e.value.errno == errno.EROFS


def test_numpy_array_shared_between_processes(client, daemon):
    z = client.zone("array", size=8 * 4096)
    a = np.frombuffer(z, dtype=np.int64)
    a[:] = 0
    peer = python_peer("peer.py", "zone_writer", daemon.socket, "array")
    try:
        assert read_line(peer) == "ready %d" % z.size
        # Its writes are seen here with nothing sent: one memory, no copy.
        peer.stdin.write("write 17 4242\n")
        peer.stdin.flush()
        assert read_line(peer) == "ok"
        assert a[17] == 4242
        a[4095] = -7
        peer.stdin.write("read 4095\n")
        peer.stdin.flush()
        assert read_line(peer) == "-7"
        assert memfd_mapped(a.ctypes.data)
    finally:
        peer.stdin.close()
        assert wait_exit(peer) == 0


def test_lock_owner_killed(client, daemon):
    z = client.zone("locked", size=4096)
    peer = python_peer("peer.py", "lock_holder", daemon.socket, "locked")
    try:
        assert read_line(peer) == "locked"
        with pytest.raises(TimeoutError):
            z.lock(timeout=0.1)
        with pytest.raises(BlockingIOError):
            z.lock(timeout=0)
    finally:
        peer.kill()
        wait_exit(peer)
    with pytest.raises(shmzone.OwnerDied) as e:
        z.lock(timeout=10)
    assert e.value.errno == errno.EOWNERDEAD
    # The caller holds it now: repair what the dead holder left half-done, then say so.
    assert memoryview(z)[0] == 1
    memoryview(z)[0] = 0
    z.consistent()
    z.unlock()
    with z.lock(timeout=1):
        pass
    with pytest.raises(OSError) as e:
        z.unlock()  # not held
    assert e.value.errno == errno.EPERM


def test_lock_waits_without_the_gil(client):
    z = client.zone("gil", size=4096)
    other = client.zone("gil")
    held = threading.Event()
    release = threading.Event()
    got = []

    def holder():
        with other.lock():
            held.set()
            release.wait(10)

    def waiter():
        with z.lock(timeout=10):
            got.append(True)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(10)
    w = threading.Thread(target=waiter)
    w.start()
    # The waiter sleeps in the library in slices of 50 ms: had it the GIL, this thread would stall each time.
    stalls, last = 0, time.monotonic()
    end = last + 0.5
    while last < end:
        now = time.monotonic()
        stalls += now - last > 0.03
        last = now
    assert stalls < 3 and not got
    release.set()
    t.join(10)
    w.join(10)
    assert got == [True]


# ---- ports ------------------------------------------------------------------------------------------

def test_small_messages_and_peer(client):
    a, b = port_pair(client)
    assert a.peer == (os.getpid(), os.getuid(), os.getgid()) == b.peer
    a.send(b"x" * 64, type=7, stream=3)
    m = b.recv(timeout=5)
    assert (m.type, m.stream, m.flags, m.fd, bytes(m.data)) == (7, 3, 0, None, b"x" * 64)
    m.release()
    a.send(b"", last=True)
    m = b.recv(timeout=5)
    assert m.last and m.flags & shmzone.LAST and len(m.data) == 0
    with pytest.raises(BlockingIOError):
        b.recv(timeout=0)
    with pytest.raises(TimeoutError):
        b.recv(timeout=0.05)
    a.close()
    with pytest.raises(BrokenPipeError):
        b.recv(timeout=5)



def test_send_arguments_and_spin(client):
    a, b = port_pair(client)
    # send(data) alone takes the short way; every other form the parser's, with its errors.
    a.send(b"positional", 2, 5, True)
    with b.recv(timeout=5) as m:
        assert (m.type, m.stream, m.last, bytes(m.data)) == (2, 5, True, b"positional")
    for bad in [lambda: a.send(), lambda: a.send(b"x", colour=1), lambda: a.send(b"x", 1, type=1),
                lambda: a.send(42), lambda: a.send(b"x", b"y")]:
        with pytest.raises(TypeError):
            bad()
    # The spin: fixed, none (sleeps at once), back to the default; any of them still receives.
    for spin in (0.001, 0, None, 1e12):
        b.set_spin(spin)
        threading.Timer(0.05, a.send, (b"late",)).start()
        with b.recv(timeout=5) as m:
            assert bytes(m.data) == b"late"
    with pytest.raises(TypeError):
        b.set_spin("fast")
    b.close()
    with pytest.raises(ValueError):
        b.set_spin(None)
    with pytest.raises(ValueError):
        b.send(b"closed")

def test_one_mib_echoed_in_place(client, daemon):
    peer = python_peer("peer.py", "echo", daemon.socket, "echo")
    try:
        assert read_line(peer) == "ready"
        p = client.connect_port("echo")
        payload = np.random.default_rng(1).integers(0, 256, 1 << 20, dtype=np.uint8)
        for i in range(3):
            b = p.buffer(1 << 20, timeout=10)
            assert memfd_mapped(address_of(b))
            np.frombuffer(b, dtype=np.uint8)[:] = payload  # the array is a temporary: nothing holds b's memory
            p.send(b, type=1, timeout=10)
            with pytest.raises(ValueError):
                b[0]  # the memory travelled: the view went with it
            with p.recv(timeout=10) as m:
                assert len(m.data) == 1 << 20 and m.data.readonly
                assert memfd_mapped(address_of(m.data))  # the peer's shared memory, in place
                assert np.array_equal(np.frombuffer(m.data, dtype=np.uint8), payload)
        p.close()
    finally:
        assert wait_exit(peer) == 0
    assert read_line(peer) == "done"


def test_send_refuses_a_buffer_still_exported(client):
    a, b = port_pair(client)
    buf = a.buffer(1 << 16)
    arr = np.frombuffer(buf, dtype=np.uint8)
    with pytest.raises(BufferError):
        a.send(buf)
    with pytest.raises(BufferError):
        a.send(arr)
    with pytest.raises(ValueError):
        a.send(buf[1:])
    arr[:] = 5
    del arr
    head = buf[:4]
    with pytest.raises(BufferError):
        a.send(buf)
    del head
    a.send(buf[:100])
    with pytest.raises(ValueError):
        buf[0]
    with b.recv(timeout=5) as m:
        assert bytes(m.data) == b"\x05" * 100


def test_fds_ride_along(client):
    a, b = port_pair(client)
    r, w = os.pipe()
    a.send(b"with an fd", fd=w)
    os.close(w)
    m = b.recv(timeout=5)
    assert m.fd is not None
    fd = m.take_fd()
    m.release()
    os.write(fd, b"through")
    os.close(fd)
    assert os.read(r, 100) == b"through"
    # Not taken: the message closes it at release.
    before = open_fds()
    a.send(b"again", fd=r)
    m = b.recv(timeout=5)
    assert open_fds() == before + 1
    m.release()
    assert open_fds() == before
    os.close(r)


def test_backpressure(client):
    a, b = port_pair(client)
    held = []
    # Nobody releases: the sender's shared memory runs out, it is told, nothing is lost.
    with pytest.raises(BlockingIOError):
        for i in range(10000):
            buf = a.buffer(1 << 20, timeout=0)
            buf[0] = i % 256
            a.send(buf, timeout=0)
            held.append(b.recv(timeout=5))
    sent = len(held)
    assert sent > 0
    with pytest.raises(TimeoutError):
        a.buffer(1 << 20, timeout=0.1)
    # One released: room again, in order.
    for i, m in enumerate(held):
        assert m.data[0] == i % 256
    held.pop(0).release()
    buf = a.buffer(1 << 20, timeout=5)
    a.send(buf, timeout=5)
    held.append(b.recv(timeout=5))
    with pytest.raises(BlockingIOError):
        a.buffer(1 << 20, timeout=0)
    # A sender blocked for room wakes when the receiver releases.
    t = threading.Timer(0.2, lambda: [m.release() for m in held])
    t.start()
    start = time.monotonic()
    buf = a.buffer(1 << 20, timeout=10)
    assert time.monotonic() - start >= 0.15
    t.join()


def test_asyncio(client):
    a, b = port_pair(client)

    async def main():
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, a.send, b"late")
        start = loop.time()
        m = await asyncio.wait_for(b.recv_async(), 10)
        waited = loop.time() - start
        with m:
            return bytes(m.data), waited

    data, waited = asyncio.run(main())
    assert data == b"late" and waited >= 0.05
    a.close()

    async def gone():
        return await asyncio.wait_for(b.recv_async(), 10)

    with pytest.raises(BrokenPipeError):
        asyncio.run(gone())


def test_threads_share_a_port(client):
    a, b = port_pair(client)
    n_threads, n = 4, 200
    got = []
    lock = threading.Lock()

    def receiver():
        for _ in range(n):
            with b.recv(timeout=20) as m:
                with lock:
                    got.append(bytes(m.data))

    def sender(k):
        for i in range(n):
            a.send(b"%d:%d" % (k, i), timeout=20)

    threads = [threading.Thread(target=receiver) for _ in range(n_threads)]
    threads += [threading.Thread(target=sender, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(got) == sorted(b"%d:%d" % (k, i) for k in range(n_threads) for i in range(n))


# ---- a Python client, a C service ---------------------------------------------------------------------

def test_python_client_c_service(client, daemon):
    service = subprocess.Popen([os.environ["SHMZ_ECHO_SERVICE"], daemon.socket, "csvc"], stdout=subprocess.PIPE,
                               text=True, env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"})
    try:
        assert read_line(service) == "ready"
        p = client.connect_port("csvc")
        replies = [bytes(m.data) for m in p.call(b"one reply", type=1)]
        assert replies == [b"one reply"]
        replies = list(p.call(b"three", type=2))
        assert [bytes(m.data) for m in replies] == [b"0", b"1", b"2"]
        assert [m.last for m in replies] == [False, False, True]
        for m in replies:
            m.release()
        # In place both ways: a 1 MiB buffer of ours, their reply in their memory.
        b = p.buffer(1 << 20)
        b[:] = b"z" * (1 << 20)
        (m,) = p.call(b, type=1)
        assert bytes(m.data) == b"z" * (1 << 20) and memfd_mapped(address_of(m.data))
        m.release()
        with pytest.raises(TimeoutError):
            list(p.call(b"never answered", type=3, deadline=time.monotonic() + 0.2))
        p.send(b"plain", type=1)
        assert bytes(p.recv(timeout=5).data) == b"plain"
        p.close()
    finally:
        assert wait_exit(service) == 0
    assert read_line(service).startswith("done")


# ---- no object outlives the memory it points at -------------------------------------------------------

def test_zone_closed_views_raise(client):
    z = client.zone("uac", size=1 << 16)
    mv = memoryview(z)
    part = mv[10:20]
    buf = z.buffer(z.alloc(64), 64)
    z.close()
    for v in (mv, part, buf):
        with pytest.raises(ValueError):
            v[0]
        with pytest.raises(ValueError):
            bytes(v)
    with pytest.raises(ValueError):
        memoryview(z)
    for call in (lambda: z.alloc(1), lambda: z.lock(), lambda: z.root, lambda: z.buffer(4096, 1)):
        with pytest.raises(ValueError):
            call()
    # Released views that live on may be what C code (numpy) reads through: the mapping goes with them.
    assert client.stat("uac").attached == 1
    del mv, part, buf, v
    gc.collect()
    assert client.stat("uac").attached == 0
    # Nothing over it: unmapped at close.
    z = client.zone("uac")
    z.close()
    assert client.stat("uac").attached == 0


def test_zone_closed_while_its_lock_is_held(client):
    z = client.zone("held-lock", size=4096)
    other = client.zone("held-lock")
    with z.lock():
        z.close()
        # The lock word is in the mapping: it stays until the unlock, which still works.
        assert client.stat("held-lock").attached == 2
        seen = []
        t = threading.Thread(target=lambda: seen.append(pytest.raises(TimeoutError, other.lock, timeout=0.05)))
        t.start()
        t.join(10)
        assert len(seen) == 1  # still held: another thread times out
    assert client.stat("held-lock").attached == 1
    with other.lock(timeout=1):
        pass
    with pytest.raises(ValueError):
        z.unlock()


def test_zone_closed_under_numpy_keeps_the_mapping(client):
    z = client.zone("held", size=1 << 16)
    a = np.frombuffer(z, dtype=np.uint8)
    a[:4] = [1, 2, 3, 4]
    z.close()
    # A numpy array cannot be told to let go: the mapping stays while it lives, it reads real memory.
    assert list(a[:4]) == [1, 2, 3, 4]
    assert client.stat("held").attached == 1
    del a
    gc.collect()
    assert client.stat("held").attached == 0


def test_released_message_views_raise(client):
    a, b = port_pair(client)
    a.send(b"y" * 100000)
    m = b.recv(timeout=5)
    d = m.data
    part = d[5:10]
    other = memoryview(m)
    used = client.status().chunks_used
    m.release()
    for v in (d, part, other):
        with pytest.raises(ValueError):
            v[0]
    with pytest.raises(ValueError):
        m.data
    with pytest.raises(ValueError):
        memoryview(m)
    # Its chunks go back once the released views are gone (C code may read through them).
    assert client.status().chunks_used == used
    del d, part, other, v
    gc.collect()
    assert client.status().chunks_used < used
    # Only m.data, released: the chunks go back at once.
    a.send(b"u" * 100000)
    m = b.recv(timeout=5)
    d = m.data
    m.release()
    assert client.status().chunks_used < used
    with pytest.raises(ValueError):
        d[0]
    # One under a numpy array stays until the array goes; then it goes back.
    a.send(b"w" * 100000)
    m = b.recv(timeout=5)
    arr = np.frombuffer(m.data, dtype=np.uint8)
    m.release()
    assert arr[99999] == ord("w")
    assert client.status().chunks_used == used
    del arr
    gc.collect()
    assert client.status().chunks_used < used


def test_closed_port_views_raise(client):
    a, b = port_pair(client)
    buf = a.buffer(1 << 16)
    a.send(b"q" * 100000)
    m = b.recv(timeout=5)
    d = m.data
    a.close()
    b.close()
    with pytest.raises(ValueError):
        buf[0]
    with pytest.raises(ValueError):
        d[0]
    with pytest.raises(ValueError):
        m.data
    for call in (lambda: a.send(b"x"), lambda: b.recv(timeout=0), lambda: a.buffer(10), a.fileno, lambda: a.peer):
        with pytest.raises(ValueError):
            call()
    # Nothing held them open: the daemon sees both ends go (it learns asynchronously).
    deadline = time.monotonic() + 10
    while client.status().ports != 0:
        assert time.monotonic() < deadline, client.status()
        time.sleep(0.01)


def test_closed_listener_and_call(client, daemon):
    l = client.listen("gone")
    l.close()
    for call in (l.accept, l.fileno):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(FileNotFoundError):
        client.connect_port("gone")  # the name went with it
    service = subprocess.Popen([os.environ["SHMZ_ECHO_SERVICE"], daemon.socket, "csvc"], stdout=subprocess.PIPE,
                               text=True, env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"})
    try:
        assert read_line(service) == "ready"
        p = client.connect_port("csvc")
        replies = p.call(b"three", type=2)
        first = next(replies)
        data = first.data
        p.close()
        with pytest.raises(ValueError):
            next(replies)
        with pytest.raises(ValueError):
            data[0]
        with pytest.raises(ValueError):
            first.data
    finally:
        assert wait_exit(service) == 0


def test_port_closed_under_numpy_keeps_its_memory(client):
    a, b = port_pair(client)
    a.send(b"k" * 100000)
    m = b.recv(timeout=5)
    arr = np.frombuffer(m.data, dtype=np.uint8)
    b.close()
    assert arr[0] == ord("k") and arr[-1] == ord("k")
    del arr, m
    gc.collect()
    with pytest.raises(BrokenPipeError):
        a.send(b"x", timeout=1)


def test_close_while_another_thread_waits(client):
    a, b = port_pair(client)
    z = client.zone("wait", size=4096)
    z2 = client.zone("wait")
    z2.lock()
    l = client.listen("nobody")
    errors = []

    def wait(call):
        try:
            call()
        except Exception as e:  # noqa: BLE001 - what it raised is the point
            errors.append(type(e))

    threads = [threading.Thread(target=wait, args=(f,)) for f in (b.recv, z.lock, l.accept)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    b.close()
    z.close()
    l.close()
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    assert errors == [ValueError] * 3
    z2.unlock()


def test_client_closed(client, daemon):
    c = daemon.client()
    z = c.zone("kept", size=4096)
    c.close()
    for call in (lambda: c.zone("x", size=4096), lambda: c.stat("kept"), c.zones, c.status):
        with pytest.raises(ValueError):
            call()
    memoryview(z)[0] = 9  # zones opened stay usable
    assert client.stat("kept").attached == 1


def test_errors_are_oserror_subclasses(client, daemon):
    with pytest.raises(FileNotFoundError):
        shmzone.Client(os.path.join(daemon.dir, "no-such-socket"))
    with pytest.raises(FileNotFoundError):
        client.connect_port("nobody")
    l = client.listen("taken")
    with pytest.raises(OSError) as e:
        client.listen("taken")
    assert e.value.errno == errno.EADDRINUSE
    l.close()
    with pytest.raises(OSError) as e:
        client.zone("bad/name", size=4096)
    assert e.value.errno == errno.EINVAL
    assert issubclass(shmzone.OwnerDied, OSError)


# ---- the harness's own teardown: no view is left mounted, however a run ends ----------------------------

def test_view_unmounted_after_the_daemon_died():
    d = Daemon()
    try:
        d.start()
        d.proc.kill()  # a crashed daemon: its FUSE mount stays
        d.proc.wait()
        assert mounted(d.mount)
        d.stop()
        assert not mounted(d.mount)
    finally:
        d.stop()
        shutil.rmtree(d.dir, ignore_errors=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_view_unmounted_when_the_run_is_interrupted(sig):
    """A test runner killed by its timeout (SIGTERM), Ctrl-C, a closed terminal: the daemons go, with their views."""
    proc = python_peer("hold-view.py")
    mount = read_line(proc)
    assert mounted(mount)
    proc.send_signal(sig)
    assert wait_exit(proc) != 0
    assert not mounted(mount)
    shutil.rmtree(os.path.dirname(mount), ignore_errors=True)
