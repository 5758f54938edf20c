#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
# Writes the binary seeds of tests/fuzz/corpus/ (fuzz-control, fuzz-slab, fuzz-port):
# their formats are described at the top of fuzz-control.c, fuzz-slab.c and fuzz-port.c. The config
# seeds are plain files, edited by hand. Run from anywhere; rewrites the seeds.
import os
import struct

here = os.path.dirname(os.path.abspath(__file__))

# ---- fuzz-control: flags byte, then (u16 length | 0x8000 for an fd, packet) frames ----
HELLO, OPEN, CLOSE, UNLINK, INFO, LIST, SETATTR, TICKET, STATUS = range(1, 10)
CREATE, EXCL, RDONLY = 1, 2, 4
F_HELLO, F_ROOT, F_FIX = 1, 2, 4
NAME_BUF, TAG_BUF = 208, 64


def cstr(s, n):
    b = s.encode()
    return b + b"\0" * (n - len(b))


def msg(type_, body=b"", stream=1, flags=0, size=None):
    size = 16 + len(body) if size is None else size
    return struct.pack("<IHHIi", size, type_, flags, stream, 0) + body


def hello(stream=1, lo=2, hi=2):
    return msg(HELLO, struct.pack("<IIQ", lo, hi, 0), stream)


def zopen(name, size=4096, flags=CREATE, tag="", stream=2):
    return msg(OPEN, struct.pack("<QII", size, flags, 0) + cstr(name, NAME_BUF) + cstr(tag, TAG_BUF), stream)


def name_msg(type_, name, stream):
    return msg(type_, cstr(name, NAME_BUF), stream)


def close(handle, stream):
    return msg(CLOSE, struct.pack("<Q", handle), stream)


def setattr(name, mask, mode, uid, gid, stream):
    return msg(SETATTR, struct.pack("<IIII", mask, mode, uid, gid) + cstr(name, NAME_BUF), stream)


# A first word of 0 makes the harness put in a ticket it issues for the n-th zone opened.
def ticket(stream, n=None, flags=0):
    t = (1, 2) if n is None else (0, n)
    return msg(TICKET, struct.pack("<QQII", *t, flags, 0), stream)


def frames(flags, packets):
    out = bytes([flags])
    for p in packets:
        fd = 0
        if isinstance(p, tuple):
            p, fd = p[0], 0x8000
        out += struct.pack("<H", len(p) | fd) + p
    return out


control = {
    # The life of a zone, as libshmzone does it.
    "hello-open-list-close": frames(0, [
        hello(), zopen("demo", 4096, CREATE, "demo", 2), msg(LIST, stream=3), name_msg(INFO, "demo", 4),
        close(1, 5), msg(STATUS, stream=6)]),
    # HELLO forced by the flags; root changes a zone it does not own, then removes it.
    "root-setattr-unlink": frames(F_HELLO | F_ROOT, [
        zopen("a", 8192, CREATE | EXCL, "", 2), zopen("a", 0, RDONLY, "", 3), zopen("b", 4096, CREATE, "t", 4),
        setattr("a", 7, 0o640, 1000, 100, 5), msg(LIST, stream=6), name_msg(UNLINK, "a", 7), close(2, 8),
        close(1, 9), name_msg(INFO, "a", 10)]),
    # Refusals: no hello yet, a quota, tickets nobody issued, a handle nobody holds.
    "refusals": frames(F_FIX, [
        zopen("early", stream=1), hello(2), zopen("big", 1 << 30, CREATE, "", 3), ticket(4), close(99, 5),
        zopen("x" * 201, stream=6), name_msg(UNLINK, "missing", 7), msg(NOTICE := 64, stream=8),
        msg(STATUS, stream=9, flags=1)]),
    # Tickets as the FUSE view hands them out: redeemed once, for the access of the open
    # (zones opened: #0 "t" writable, #1 "t" read-only, then one per ticket redeemed).
    "tickets": frames(F_HELLO, [
        zopen("t", 4096, CREATE, "", 2), zopen("t", 0, RDONLY, "", 3), ticket(4, 0), ticket(5, 1), ticket(6, 1, RDONLY),
        ticket(7, 2), zopen("u", 4096, CREATE, "", 8), ticket(9, 3), close(3, 10), msg(LIST, stream=11)]),
    # An ordinary user changes the mode of its zone, gives it to one of its groups, removes it
    # while attached: the memory goes with the last detach.
    "user-chmod-unlink": frames(F_HELLO, [
        zopen("mine", 4096, CREATE | EXCL, "", 2), setattr("mine", 1, 0o644, 0, 0, 3), setattr("mine", 4, 0, 0, 100, 4),
        setattr("mine", 2, 0, 0, 0, 5), name_msg(UNLINK, "mine", 6), name_msg(INFO, "mine", 7), close(1, 8),
        msg(STATUS, stream=9)]),
    # Framing the decoder refuses: size field wrong, then an fd on a request.
    "bad-size": frames(0, [hello(), msg(LIST, stream=2, size=99)]),
    "fd-passed": frames(F_HELLO, [(msg(STATUS, stream=2),)]),
    "version-mismatch": frames(0, [hello(1, 3, 9), msg(LIST, stream=2)]),
    "oversize": frames(F_HELLO, [msg(STATUS, b"\0" * 1100, stream=2)]),
}

# ---- fuzz-slab: op byte (param << 3 | op), operands ----
A_SMALL, A_LARGE, FREE, STRAY, POKE, POKE32, POKE_PAGE, CHECK = range(8)


def op(o, param=0):
    return bytes([param << 3 | o])


def small(n):
    return op(A_SMALL, n >> 8) + bytes([n & 0xff])


def large(n):
    return op(A_LARGE) + struct.pack("<H", n // 16)


def free(i):
    return op(FREE) + bytes([i])


def check(kind):
    return op(CHECK, kind)


# slab_state offsets (slab.h), relative to the header's alloc[]
BUSY, INTENT, FREE_PAGES = 12, 24, 32
DESC = 3072  # page descriptors follow the alloc[] area (offset 4096 of the zone)

slab = {
    "small-classes": b"".join(small(n) for n in (8, 24, 100, 512, 3000, 8000)) + large(16384) + check(0)
    + b"".join(free(0) for _ in range(7)) + check(0) + check(2),
    "large": large(20000) + large(70000) + small(40) + free(0) + large(4096) + check(0) + free(1) + free(0)
    + free(0) + check(2),
    # A run of one class over several spans, freed again: empty spans go back to the pages.
    "spans": small(40) * 150 + b"".join(free(i) for i in range(64)) + check(0),
    # A co-user died in the middle of an operation: busy set, the next call repairs.
    "dead-busy": small(64) + small(64) + op(POKE32) + struct.pack("<HI", BUSY, 1) + small(64) + check(0),
    # Lying counters and descriptors, then a repair.
    "corrupt-desc": large(8192) + small(200) + op(POKE32, 1) + struct.pack("<HI", DESC + 32 * 2 + 4, 3)
    + op(POKE) + struct.pack("<HB", DESC, 9) + op(POKE32) + struct.pack("<HI", FREE_PAGES, 7) + small(200)
    + free(0) + check(1) + large(4096) + check(0),
    "stray-free": small(16) + op(STRAY) + struct.pack("<I", 0) + op(STRAY) + struct.pack("<I", 600000)
    + free(0) + free(0) + check(0),
}


def write(target, seeds):
    d = os.path.join(here, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)


write("fuzz-control", control)
write("fuzz-slab", slab)


# ---- fuzz-port: op byte, operands (see fuzz-port.c) ----
F_LAST, F_CHUNK, F_FD = 0x1, 0x100, 0x200
DATA, PAD = 1, 2
SEALED, WRONG_SIZE, UNSEALED, PIPE, DEVNULL, EVENTFD, UNIX, TCP = range(8)


def fds(*kinds):
    return bytes([len(kinds)]) + bytes(kinds)


def p_segment(slot, *kinds, ident=1):
    return bytes([1]) + struct.pack("<IIB", ident, slot, 0) + fds(*kinds)


def p_fd(*kinds):
    return bytes([2]) + fds(*kinds)


def p_desc(size, flags=0, kind=DATA, n_slots=1, payload=b"", segment=0, chunk=0, advance=0, type_=1, stream=0):
    return (bytes([3]) + struct.pack("<HHIIIQII", kind, n_slots, flags, type_, stream, size, segment, chunk)
            + bytes([len(payload)]) + payload + struct.pack("<H", advance))


def p_bits(seg, word, value):
    return bytes([5, seg, word]) + struct.pack("<Q", value)


def p_recv(release=True):
    return bytes([6, 1 if release else 0])


def p_send(large=False):
    return bytes([7, 1 if large else 0])


def p_dispatch():
    return bytes([7, 2])


port = {
    "inline": p_desc(16, payload=b"0123456789abcdef") + p_recv() + p_recv(),
    "chunk": p_segment(0, SEALED) + p_bits(0, 0, 0x3) + p_desc(5000, F_CHUNK) + p_recv(False) + p_recv()
    + p_send(True) + p_recv(),
    "fd-message": p_fd(PIPE) + p_desc(0, F_FD) + p_recv() + p_fd(TCP) + p_desc(3, F_FD | F_LAST, payload=b"abc")
    + p_dispatch(),
    "bare-fds": b"".join(p_fd(DEVNULL) for _ in range(70)) + p_recv() * 4,
    "bad-segments": p_segment(1, WRONG_SIZE) + p_recv() + p_segment(2, UNSEALED, UNIX) + p_recv(),
    "lying-desc": p_desc(5000, F_CHUNK, segment=3) + p_recv() + p_desc(100, n_slots=9) + p_recv(),
    "pad-then-shutdown": p_desc(0, kind=PAD, n_slots=1024) + p_recv() + bytes([8]) + p_recv(),
    "sends": p_send() + p_send(True) + p_send(True) + p_recv(),
}
write("fuzz-port", port)
