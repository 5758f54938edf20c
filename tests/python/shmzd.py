# SPDX-License-Identifier: LGPL-2.1-or-later
"""A real shmzoned on its own socket and mount point, as tests/integration/harness.c starts one."""
import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import time

import shmzone

# Daemons started and not stopped yet: stopped (and their views unmounted) at exit, whatever ends the
# process; SIGTERM (a test runner's timeout) and SIGHUP become SystemExit so that exit comes.
_live = set()


def _stop_all():
    for d in list(_live):
        d.stop()


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def _guard():
    if not _live:
        atexit.register(_stop_all)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _exit_on_signal)


def mounted(path):
    """Whether path is a mount point, from the kernel's table rather than by stat() (os.path.ismount),
    which asks the view's daemon, gone or wedged when a run fails."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


class Daemon:
    def __init__(self, mount=True):
        self.dir = tempfile.mkdtemp(prefix="shmz-py-", dir="/tmp")
        os.chmod(self.dir, 0o755)
        self.socket = os.path.join(self.dir, "sock")
        self.config = os.path.join(self.dir, "shmzone.conf")
        self.mount = os.path.join(self.dir, "fs") if mount else None
        self.log = os.path.join(self.dir, "log")
        self.proc = None
        with open(self.config, "w"):
            pass

    def start(self):
        _guard()
        _live.add(self)
        argv = [os.environ.get("SHMZONED", "shmzoned"), "--config", self.config, "--socket", self.socket]
        if self.mount:
            os.mkdir(self.mount)
            argv += ["--mount", self.mount]
        else:
            argv += ["--no-mount"]
        # The daemon is a sanitized program of its own: no preload, leaks checked as in the C tests.
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "NOTIFY_SOCKET")}
        env["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=0"
        if os.environ.get("SHMZ_LSAN_SUPP"):
            env["LSAN_OPTIONS"] = "suppressions=" + os.environ["SHMZ_LSAN_SUPP"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stderr=log, stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 20
        while True:
            try:
                shmzone.Client(self.socket).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("shmzoned did not start:\n" + self.read_log())
                time.sleep(0.02)
        if self.mount:
            while not mounted(self.mount):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("the view was not mounted:\n" + self.read_log())
                time.sleep(0.02)

    def read_log(self):
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self):
        status = None
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            status = self.proc.returncode
        # Lazy: a failed test may still hold a file open in the view.
        if self.mount and mounted(self.mount):
            if subprocess.call(["umount", "-l", self.mount], stderr=subprocess.DEVNULL) != 0:
                subprocess.call(["fusermount3", "-u", "-z", self.mount], stderr=subprocess.DEVNULL)
        _live.discard(self)
        if self.mount and mounted(self.mount):
            raise RuntimeError("the view at %s stayed mounted" % self.mount)
        return status

    def client(self):
        return shmzone.Client(self.socket)
