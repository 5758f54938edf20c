# SPDX-License-Identifier: LGPL-2.1-or-later
"""The other process of a test: python3 peer.py ROLE SOCKET NAME."""
import os
import sys
import time

import numpy as np

import shmzone


def say(*words):
    print(*words, flush=True)


def zone_writer(sock, name):
    c = shmzone.Client(sock)
    z = c.zone(name)  # attach as it is
    a = np.frombuffer(z, dtype=np.int64)
    say("ready", z.size)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "write":
            a[int(cmd[1])] = int(cmd[2])
            say("ok")
        elif cmd[0] == "read":
            say(int(a[int(cmd[1])]))
        else:
            break


def lock_holder(sock, name):
    z = shmzone.Client(sock).zone(name)
    z.lock()
    memoryview(z)[0] = 1  # half-way through an update
    say("locked")
    time.sleep(3600)


def echo(sock, name):
    c = shmzone.Client(sock)
    with c.listen(name, mode=0o666) as l:
        say("ready")
        p = l.accept(timeout=30)
    while True:
        try:
            m = p.recv(timeout=30)
        except BrokenPipeError:
            break
        with m:
            n = len(m.data)
            fd = m.take_fd()
            if n > 4096:
                # Written once into our port's memory, sent in place.
                b = p.buffer(n, timeout=30)
                b[:] = m.data
            else:
                b = bytes(m.data)
            p.send(b, type=m.type, stream=m.stream, last=True, fd=fd, timeout=30)
            if fd is not None:
                os.close(fd)
    say("done")


if __name__ == "__main__":
    {"zone_writer": zone_writer, "lock_holder": lock_holder, "echo": echo}[sys.argv[1]](*sys.argv[2:])
