/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Starts a real shmzoned on a private socket (and mount) for one test. */

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#define HARNESS_MAX_STORED 64

struct harness_reader;

struct daemon_proc {
        pid_t pid;
        char dir[64];     /* private temporary directory */
        char socket[128]; /* dir/sock */
        char config[128]; /* dir/shmzone.conf */
        char mount[128];  /* dir/fs, when mounted */
        char log[128];    /* dir/log: the daemon's stderr */
        char notify[128]; /* dir/notify: the daemon's NOTIFY_SOCKET */
        int notify_fd;
        struct harness_reader *reader; /* the thread that reads notify_fd (harness.c) */
        char notified[4096];           /* datagrams received since the last start or reload, each followed by '|' */
        bool mounted;
        /*
         * systemd's fd store as the daemon filled it through the notify socket
         * (FDSTORE=1 adds, FDSTOREREMOVE=1 drops by FDNAME), up to
         * HARNESS_MAX_STORED, kept by the reader thread. Read them after
         * harness_drain_notify() or harness_stop(), while the daemon is idle.
         * The fds stay open here across a stop, as they would in systemd.
         */
        int stored_fds[HARNESS_MAX_STORED];
        char stored_names[HARNESS_MAX_STORED][256];
        size_t n_stored;
        /*
         * For the next harness_start() only: fds to pass at 3.. with
         * LISTEN_FDS, LISTEN_FDNAMES and the child's LISTEN_PID, as systemd
         * does after a restart. Not taken over (the caller closes them).
         */
        const int *listen_fds;
        const char *const *listen_names;
        size_t n_listen;
};

/*
 * The main() of every integration binary: reports every case skipped
 * (harness_skip_all()) when it is not root or, with need_fuse, cannot open
 * /dev/fuse; runs the criterion tests otherwise (meson passes --tap).
 */
int harness_main(int argc, char *argv[], bool need_root, bool need_fuse);
/* Reports every one of n_tests cases skipped, for why (in TAP on stdout; the program then exits 0). */
void harness_skip_all(size_t n_tests, const char *why);

/* A fresh private directory with the given config text (NULL: none). */
void harness_init(struct daemon_proc *d, const char *config_text);
/* Rewrites the config file. */
void harness_write_config(struct daemon_proc *d, const char *config_text);
/*
 * Starts the daemon with extra arguments (NULL-terminated, may be NULL) and
 * waits (up to 20 s) until it says READY=1 on the harness's own
 * NOTIFY_SOCKET, which replaces any NOTIFY_SOCKET of the caller's. Returns
 * 0, or the daemon's exit status if it exited, or a negative errno.
 */
int harness_start(struct daemon_proc *d, const char *const *extra_args, bool mount);
/* SIGTERM, wait; returns the exit status (or 128+signal). Unmounts in any case. */
int harness_stop(struct daemon_proc *d);
/*
 * Stops the daemon (crash: SIGKILL first) as systemd's restart does and hands
 * what it stored to the next harness_start(): asserts it exited as it should.
 */
void harness_stop_for_restart(struct daemon_proc *d, bool crash);
/*
 * Stops a daemon that may not have started (harness_stop), cleans up, and asserts that it
 * exited 0 with nothing from the sanitizers in its log (leaks of what the test made), which
 * it prints otherwise.
 */
void harness_stop_clean(struct daemon_proc *d);
/* Sends SIGHUP and waits (up to 20 s) for RELOADING=1, then READY=1; 0 or a negative errno. */
int harness_reload(struct daemon_proc *d);
/*
 * Waits (up to seconds) for a datagram with the line want (e.g. "STOPPING=1")
 * on the notify socket, appending all it reads to d->notified. 0, -ETIMEDOUT,
 * or -ESRCH if the daemon exited first (it is not reaped).
 */
int harness_wait_notify(struct daemon_proc *d, const char *want, unsigned seconds);
/* Throws away the datagrams not read yet (their FDSTORE= fds go to d->stored_*) and empties d->notified. */
void harness_drain_notify(struct daemon_proc *d);
/* Waits (up to seconds) until the daemon's log has what in it; 0 or -ETIMEDOUT. */
int harness_wait_log(struct daemon_proc *d, const char *what, unsigned seconds);
/* The daemon's stderr so far, NUL-terminated (static buffer). */
const char *harness_log(struct daemon_proc *d);
/* A client of the test's daemon, or NULL. */
struct shmz_client *harness_connect(struct daemon_proc *d);
/* Removes the directory. */
void harness_cleanup(struct daemon_proc *d);
/* Runs fn in a child switched to uid/gid (no supplementary groups); returns its exit status. */
int harness_run_as(uid_t uid, gid_t gid, int (*fn)(void *), void *userdata);
/* A bare SOCK_SEQPACKET connection to path (no hello), or -errno. */
int harness_raw_connect(const char *path);
/* A TCP connection to 127.0.0.1:port: its fd or -errno. */
int harness_tcp_connect(int port);

/* A child's exit status, or 128 + the signal that ended it; -1 if it cannot be waited for. */
int harness_wait_child(pid_t pid);
/* In a forked child: its own client of d and a port to the listener `name`, or _exit(100/101). */
struct shmz_port *harness_child_connect(const struct daemon_proc *d, const char *name);
/* Open fds of pid (0: this process), not counting the one that reads them. */
unsigned harness_count_fds(pid_t pid);
