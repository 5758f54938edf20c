# SPDX-License-Identifier: LGPL-2.1-or-later
"""
The Python module against what Python users have, each anchor in the same run:

  rtt_64B         a 64-byte round trip to an echo process: Port.send/recv (as
                  they come: a receive spins up to 30 us before it sleeps, and
                  stops spinning while its spins end in sleeps) against
                  multiprocessing.Pipe (send_bytes/recv_bytes) and a socketpair;
                  and a bare eventfd ping-pong, no payload: the floor of any
                  round trip between Python processes that sleep in the kernel;
                  rtt_64B_sleep: both receivers sleep at once (Port.set_spin(0))
  array_1MiB      a 1 MiB numpy array made in one process and read (summed) in
                  another, 200 in a row: written in place into Port.buffer()
                  against multiprocessing.Queue (pickled) and against
                  shared_memory.SharedMemory with 4 slots plus a Pipe each way to
                  say which slot is full and which is free again (our port has 4
                  MiB in flight too)
  lock            a with-block of the zone lock against one of
                  multiprocessing.Lock, one process alone (uncontended, the cost
                  of every use); lock_contended_2proc: two processes taking it
                  in turns to bump a counter in shared memory

Each figure is the median of RUNS runs, ours and the anchors' taking turns;
RATIO x = anchor's time / ours (x > 1: shmzone is faster).
"""
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time

import numpy as np

import shmzone

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from shmzd import Daemon  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "5"))
RTT_ITERS = 20000
ARRAYS = 200
LOCK_ITERS = 100000
N64 = (1 << 20) // 8
PAYLOAD = b"x" * 64


# ---- the other processes (spawned: nothing of the parent's state comes along) ------------------------

def shmz_echo(sock, name, spin):
    c = shmzone.Client(sock)
    p = c.connect_port(name)
    if spin is not None:
        p.set_spin(spin)
    try:
        while True:
            with p.recv() as m:
                p.send(m)  # a message is a buffer: its bytes go back as they came
    except BrokenPipeError:
        pass


def pipe_echo(conn):
    try:
        while True:
            conn.send_bytes(conn.recv_bytes())
    except EOFError:
        pass


def eventfd_echo(ping, pong):
    while os.eventfd_read(ping) < 2:
        os.eventfd_write(pong, 1)


def socket_echo(s):
    while True:
        data = s.recv(64)
        if not data:
            break
        s.sendall(data)


def shmz_array_consumer(sock, name, n):
    c = shmzone.Client(sock)
    p = c.connect_port(name)
    total = 0
    for _ in range(n):
        with p.recv() as m:
            total += int(np.frombuffer(m.data, dtype=np.int64).sum())
    p.send(str(total).encode())
    try:
        p.recv()  # until the producer has read it and closes
    except BrokenPipeError:
        pass


def queue_consumer(q, done, n):
    total = 0
    for _ in range(n):
        total += int(q.get().sum())
    done.put(total)


def shm_consumer(shm_name, fwd, back, n):
    from multiprocessing import shared_memory

    shm = shared_memory.SharedMemory(shm_name)  # spawned: the creator's resource tracker is ours, it unlinks
    total = 0
    for _ in range(n):
        slot = fwd.recv()
        total += int(np.ndarray(N64, dtype=np.int64, buffer=shm.buf, offset=slot << 20).sum())
        back.send(slot)
    back.send(("done", total))
    shm.close()


def shmz_lock_worker(sock, name, n, start):
    z = shmzone.Client(sock).zone(name)
    counter = np.frombuffer(z, dtype=np.int64, count=1)
    start.wait()
    for _ in range(n):
        with z.lock():
            counter[0] += 1


def mp_lock_worker(lock, shm_name, n, start):
    from multiprocessing import shared_memory

    shm = shared_memory.SharedMemory(shm_name)
    counter = np.ndarray(1, dtype=np.int64, buffer=shm.buf)
    start.wait()
    for _ in range(n):
        with lock:
            counter[0] += 1
    del counter
    shm.close()


# ---- the runs -------------------------------------------------------------------------------------------

ctx = mp.get_context("spawn")


def per_call(n, one, warm=0):
    """Seconds per call of one() over n calls, after warm calls that do not count."""
    for _ in range(warm):
        one()
    t = time.perf_counter()
    for _ in range(n):
        one()
    return (time.perf_counter() - t) / n


def race(children, start):
    """Seconds from start.set() until every child (started, waiting for start) is done."""
    for c in children:
        c.start()
    time.sleep(0.5)  # all attached and waiting
    t = time.perf_counter()
    start.set()
    for c in children:
        c.join()
    return time.perf_counter() - t


def shmz_peer(client, name, target, *args):
    """A spawned process running target(socket, name, *args) and our end of its port."""
    l = client.listen(name)
    child = ctx.Process(target=target, args=(client_socket, name) + args)
    child.start()
    p = l.accept(timeout=30)
    l.close()
    return p, child


def rtt_shmz(client, spin=None):
    p, child = shmz_peer(client, "bench-rtt", shmz_echo, spin)
    if spin is not None:
        p.set_spin(spin)

    def one():
        p.send(PAYLOAD)
        p.recv().release()

    t = per_call(RTT_ITERS, one, warm=1000)
    p.close()
    child.join()
    return t


def rtt_echoed(a, b, echo, one):
    """Round trips one() through a to a spawned echo(b)."""
    child = ctx.Process(target=echo, args=(b,))
    child.start()
    b.close()
    t = per_call(RTT_ITERS, one, warm=1000)
    a.close()
    child.join()
    return t


def rtt_pipe():
    a, b = ctx.Pipe()

    def one():
        a.send_bytes(PAYLOAD)
        a.recv_bytes()

    return rtt_echoed(a, b, pipe_echo, one)


def rtt_socketpair():
    a, b = socket.socketpair()

    def one():
        a.sendall(PAYLOAD)
        got = 0
        while got < 64:
            got += len(a.recv(64 - got))

    return rtt_echoed(a, b, socket_echo, one)


def rtt_eventfd():
    """The floor of a round trip between sleeping Python receivers: two eventfds, no payload."""
    ping, pong = os.eventfd(0), os.eventfd(0)
    # Forked: the eventfds are inherited (the child calls nothing but os.eventfd_*).
    child = mp.get_context("fork").Process(target=eventfd_echo, args=(ping, pong))
    child.start()

    def one():
        os.eventfd_write(ping, 1)
        os.eventfd_read(pong)

    t = per_call(RTT_ITERS, one, warm=1000)
    os.eventfd_write(ping, 2)
    child.join()
    os.close(ping)
    os.close(pong)
    return t


def expected_total(n):
    return N64 * n * (n - 1) // 2


def array_shmz(client):
    p, child = shmz_peer(client, "bench-array", shmz_array_consumer, ARRAYS)
    t = time.perf_counter()
    for i in range(ARRAYS):
        b = p.buffer(1 << 20)
        np.frombuffer(b, dtype=np.int64)[:] = i  # made in place: the array is the message
        p.send(b)
    with p.recv() as m:
        total = int(bytes(m.data))
    t = time.perf_counter() - t
    p.close()
    child.join()
    assert total == expected_total(ARRAYS), total
    return t / ARRAYS


def array_queue():
    q, done = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=queue_consumer, args=(q, done, ARRAYS))
    child.start()
    t = time.perf_counter()
    for i in range(ARRAYS):
        a = np.empty(N64, dtype=np.int64)
        a[:] = i
        q.put(a)
    total = done.get()
    t = time.perf_counter() - t
    child.join()
    assert total == expected_total(ARRAYS), total
    return t / ARRAYS


def array_shared_memory():
    from multiprocessing import shared_memory

    slots = 4
    shm = shared_memory.SharedMemory(create=True, size=slots << 20)
    fwd_r, fwd_w = ctx.Pipe(duplex=False)
    back_r, back_w = ctx.Pipe(duplex=False)
    child = ctx.Process(target=shm_consumer, args=(shm.name, fwd_r, back_w, ARRAYS))
    child.start()
    free = list(range(slots))
    t = time.perf_counter()
    for i in range(ARRAYS):
        slot = free.pop() if free else back_r.recv()
        np.ndarray(N64, dtype=np.int64, buffer=shm.buf, offset=slot << 20)[:] = i
        fwd_w.send(slot)
    while True:
        msg = back_r.recv()
        if isinstance(msg, tuple):
            total = msg[1]
            break
    t = time.perf_counter() - t
    child.join()
    shm.close()
    shm.unlink()
    assert total == expected_total(ARRAYS), total
    return t / ARRAYS


def lock_shmz_contended(client):
    z = client.zone("bench-lock", size=4096)
    counter = np.frombuffer(z, dtype=np.int64, count=1)
    counter[0] = 0
    start = ctx.Event()
    t = race([ctx.Process(target=shmz_lock_worker, args=(client_socket, "bench-lock", LOCK_ITERS, start))
              for _ in range(2)], start)
    assert counter[0] == 2 * LOCK_ITERS, counter[0]
    del counter
    z.close()
    return t / (2 * LOCK_ITERS)


def lock_mp_contended():
    from multiprocessing import shared_memory

    shm = shared_memory.SharedMemory(create=True, size=4096)
    counter = np.ndarray(1, dtype=np.int64, buffer=shm.buf)
    counter[0] = 0
    lock, start = ctx.Lock(), ctx.Event()
    t = race([ctx.Process(target=mp_lock_worker, args=(lock, shm.name, LOCK_ITERS, start)) for _ in range(2)], start)
    assert counter[0] == 2 * LOCK_ITERS, counter[0]
    del counter
    shm.close()
    shm.unlink()
    return t / (2 * LOCK_ITERS)


def lock_shmz_alone(client):
    z = client.zone("bench-lock", size=4096)

    def one():
        with z.lock():
            pass

    t = per_call(LOCK_ITERS, one)
    z.close()
    return t


def lock_mp_alone():
    lock = ctx.Lock()

    def one():
        with lock:
            pass

    return per_call(LOCK_ITERS, one)


def compare(metric, ours_fn, anchors):
    """Runs ours and each anchor RUNS times, in turns; prints the medians and the RATIO lines."""
    ours, theirs = [], {name: [] for name, _ in anchors}
    for _ in range(RUNS):
        ours.append(ours_fn())
        for name, fn in anchors:
            theirs[name].append(fn())
    o = statistics.median(ours)
    print("%s: shmzone %.2f us (median of %d; runs %s)" % (metric, o * 1e6, RUNS,
                                                           " ".join("%.2f" % (x * 1e6) for x in ours)))
    for name, _ in anchors:
        a = statistics.median(theirs[name])
        print("%s: %s %.2f us (runs %s)" % (metric, name, a * 1e6, " ".join("%.2f" % (x * 1e6) for x in theirs[name])))
        print("RATIO %s/%s %.2f" % (metric, name, a / o), flush=True)


client_socket = None


def main():
    global client_socket

    only = sys.argv[1:]
    d = Daemon(mount=False)
    d.start()
    try:
        client_socket = d.socket
        with d.client() as c:
            if not only or "rtt" in only:
                compare("rtt_64B", lambda: rtt_shmz(c), [("mp_pipe", rtt_pipe), ("socketpair", rtt_socketpair),
                                                         ("eventfd_pingpong", rtt_eventfd)])
                compare("rtt_64B_sleep", lambda: rtt_shmz(c, spin=0),
                        [("mp_pipe", rtt_pipe), ("socketpair", rtt_socketpair)])
            if not only or "array" in only:
                compare("array_1MiB", lambda: array_shmz(c),
                        [("mp_queue", array_queue), ("mp_shared_memory", array_shared_memory)])
            if not only or "lock" in only:
                compare("lock", lambda: lock_shmz_alone(c), [("mp_lock", lock_mp_alone)])
                compare("lock_contended_2proc", lambda: lock_shmz_contended(c), [("mp_lock", lock_mp_contended)])
    finally:
        status = d.stop()
        log = d.read_log()
        import shutil

        shutil.rmtree(d.dir, ignore_errors=True)
    if status != 0:
        sys.exit("shmzoned exited with %s:\n%s" % (status, log))


if __name__ == "__main__":
    main()
