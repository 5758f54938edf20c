# SPDX-License-Identifier: LGPL-2.1-or-later
"""A real shmzoned per test (shmzd.py), and the peers the tests start."""
import os
import select
import shutil
import subprocess
import sys

import pytest

from shmzd import Daemon

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def daemon():
    d = Daemon()
    try:
        d.start()
        yield d
    finally:
        status = d.stop()
        log = d.read_log()
        shutil.rmtree(d.dir, ignore_errors=True)
    assert status == 0, "shmzoned exited with %s:\n%s" % (status, log)
    assert "Sanitizer" not in log and "runtime error" not in log, log


@pytest.fixture
def client(daemon):
    with daemon.client() as c:
        yield c


def python_peer(script, *args, **kw):
    """Another Python process running tests/python/<script> with the same module and environment."""
    return subprocess.Popen([sys.executable, os.path.join(HERE, script)] + [str(a) for a in args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **kw)


def read_line(proc, timeout=20):
    r, _, _ = select.select([proc.stdout], [], [], timeout)
    assert r, "the peer said nothing for %s s" % timeout
    return proc.stdout.readline().strip()


def wait_exit(proc, timeout=30):
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
