# SPDX-License-Identifier: LGPL-2.1-or-later
"""Starts a daemon with its view, says where the view is, and waits to be interrupted (the harness's teardown test)."""
import time

from shmzd import Daemon

d = Daemon()
d.start()
print(d.mount, flush=True)
while True:
    time.sleep(1)
