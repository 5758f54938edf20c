/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <grp.h>
#include <libmount.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "shmzone.h"
#include "util.h"

extern char **environ;

void harness_skip_all(size_t n_tests, const char *why) {
        fprintf(stderr, "Skipping all %zu tests: %s.\n", n_tests, why);
        /* TAP, as criterion's --tap writes it: meson counts each case as skipped. */
        printf("TAP version 13\n1..%zu\n", n_tests);
        for (size_t i = 1; i <= n_tests; i++)
                printf("ok %zu # SKIP %s\n", i, why);
        fflush(stdout);
}

/* This run's directories are named after the runner's pid: what its tests leave, it can find. */
static void run_prefix(char *buf, size_t size) {
        const char *run = getenv("SHMZ_TEST_RUN");

        snprintf(buf, size, "/tmp/shmz-test-%ld-", run ? strtol(run, NULL, 10) : (long) getpid());
}

/*
 * Detaches every mount whose mount point starts with prefix, the newest first
 * (one stacked or nested over another goes before it): a test that failed,
 * crashed or timed out leaves no mount behind, live or dead.
 */
static void detach_mounts(const char *prefix) {
        struct libmnt_table *t = mnt_new_table();
        struct libmnt_iter *it = mnt_new_iter(MNT_ITER_BACKWARD);
        struct libmnt_fs *fs;

        if (t && it && mnt_table_parse_file(t, "/proc/self/mountinfo") == 0)
                while (mnt_table_next_fs(t, it, &fs) == 0) {
                        const char *target = mnt_fs_get_target(fs);

                        if (target && strncmp(target, prefix, strlen(prefix)) == 0)
                                (void) umount2(target, MNT_DETACH);
                }
        mnt_free_iter(it);
        mnt_unref_table(t);
}

/* After every case ran: what a killed or crashed case left in this run's directories goes. */
static void cleanup_run(void) {
        char prefix[64], cmd[128];
        glob_t g;

        run_prefix(prefix, sizeof(prefix));
        detach_mounts(prefix);
        snprintf(cmd, sizeof(cmd), "%s*", prefix);
        if (glob(cmd, GLOB_NOSORT, NULL, &g) != 0)
                return;
        for (size_t i = 0; i < g.gl_pathc; i++) {
                fprintf(stderr, "harness: %s was left behind, removed.\n", g.gl_pathv[i]);
                snprintf(cmd, sizeof(cmd), "rm -rf '%s'", g.gl_pathv[i]);
                (void) system(cmd);
        }
        globfree(&g);
}

int harness_main(int argc, char *argv[], bool need_root, bool need_fuse) {
        struct criterion_test_set *tests = criterion_initialize();
        char why[128] = "";
        int r = 0, fd;

        /* Arguments first: --help and --list answer for anybody. */
        if (criterion_handle_args(argc, argv, true)) {
                if (need_root && geteuid() != 0)
                        snprintf(why, sizeof(why), "not running as root");
                else if (need_fuse) {
                        fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
                        if (fd < 0)
                                snprintf(why, sizeof(why), "cannot open /dev/fuse: %m");
                        else
                                close(fd);
                }
                if (why[0])
                        harness_skip_all(tests->tests, why);
                else {
                        char pid[32];

                        snprintf(pid, sizeof(pid), "%ld", (long) getpid());
                        (void) setenv("SHMZ_TEST_RUN", pid, 1); /* the cases' processes inherit it */
                        r = criterion_run_all_tests(tests) ? 0 : 1;
                        cleanup_run();
                }
        }
        criterion_finalize(tests);
        return r;
}

static const char *daemon_path(void) {
        const char *p = getenv("SHMZONED");

        return p ? p : "shmzoned";
}

/* The test's own NOTIFY_SOCKET, in its private directory: only its daemon talks to it. */
static int notify_socket_open(const char *path) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        int fd, r;

        if (strlen(path) >= sizeof(sa.sun_path))
                return -ENAMETOOLONG;
        memcpy(sa.sun_path, path, strlen(path) + 1);
        fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return -errno;
        if (bind(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0) {
                r = -errno;
                close(fd);
                return r;
        }
        return fd;
}

/*
 * The notify socket is read all the time by a thread of the test, as PID 1
 * reads its own: the kernel queues only net.unix.max_dgram_qlen datagrams (10
 * by default), and a daemon that stores every zone's fd there (FDSTORE=1) would
 * block on a test that reads only while it waits. What is read is queued in
 * order for harness_wait_notify(); fds go to the fd store at once.
 */
#define QUEUE_MAX 1024

struct harness_reader {
        pthread_t thread;
        pthread_mutex_t lock; /* the queue, d->stored_*, d->notified */
        bool stop;
        char *queue[QUEUE_MAX];
        size_t head, n;
};

/* The notify socket's reader thread (below). */
static void *reader_main(void *userdata);

void harness_init(struct daemon_proc *d, const char *config_text) {
        memset(d, 0, sizeof(*d));
        run_prefix(d->dir, sizeof(d->dir));
        strncat(d->dir, "XXXXXX", sizeof(d->dir) - strlen(d->dir) - 1);
        if (!mkdtemp(d->dir))
                abort();
        (void) chmod(d->dir, 0755); /* other uids in tests must reach the socket */
        snprintf(d->socket, sizeof(d->socket), "%s/sock", d->dir);
        snprintf(d->config, sizeof(d->config), "%s/shmzone.conf", d->dir);
        snprintf(d->mount, sizeof(d->mount), "%s/fs", d->dir);
        snprintf(d->log, sizeof(d->log), "%s/log", d->dir);
        snprintf(d->notify, sizeof(d->notify), "%s/notify", d->dir);
        d->notify_fd = notify_socket_open(d->notify);
        if (d->notify_fd < 0)
                abort();
        d->reader = calloc(1, sizeof(*d->reader));
        if (!d->reader)
                abort();
        pthread_mutex_init(&d->reader->lock, NULL);
        if (pthread_create(&d->reader->thread, NULL, reader_main, d) != 0)
                abort();
        harness_write_config(d, config_text ? config_text : "");
}

void harness_write_config(struct daemon_proc *d, const char *config_text) {
        char tmp[160];
        FILE *f;

        snprintf(tmp, sizeof(tmp), "%s.new", d->config);
        f = fopen(tmp, "we");
        if (!f)
                abort();
        fputs(config_text, f);
        fclose(f);
        if (rename(tmp, d->config) < 0)
                abort();
}

static bool has_line(const char *text, const char *line) {
        size_t n = strlen(line);

        for (const char *p = text;;) {
                const char *e = strchrnul(p, '\n');

                if ((size_t) (e - p) == n && memcmp(p, line, n) == 0)
                        return true;
                if (!*e)
                        return false;
                p = e + 1;
        }
}

/* The value of the line "key=..." in a datagram, copied into ret (empty if there is none). */
static void line_value(const char *text, const char *key, char *ret, size_t size) {
        size_t k = strlen(key);

        ret[0] = 0;
        for (const char *p = text; *p;) {
                const char *e = strchrnul(p, '\n');

                if ((size_t) (e - p) > k && memcmp(p, key, k) == 0 && p[k] == '=') {
                        snprintf(ret, size, "%.*s", (int) (e - p - (ptrdiff_t) k - 1), p + k + 1);
                        return;
                }
                p = *e ? e + 1 : e;
        }
}

/* Plays systemd's fd store: FDSTORE=1 keeps the fds under FDNAME, FDSTOREREMOVE=1 closes all of that name. */
static void fd_store_apply(struct daemon_proc *d, const char *text, int *fds, size_t n_fds) {
        char name[256];

        line_value(text, "FDNAME", name, sizeof(name));
        for (size_t i = 0; has_line(text, "FDSTOREREMOVE=1") && i < d->n_stored;) {
                if (!streq(d->stored_names[i], name)) {
                        i++;
                        continue;
                }
                close(d->stored_fds[i]);
                d->n_stored--;
                d->stored_fds[i] = d->stored_fds[d->n_stored];
                memcpy(d->stored_names[i], d->stored_names[d->n_stored], sizeof(d->stored_names[i]));
        }
        for (size_t i = 0; i < n_fds; i++) {
                if (has_line(text, "FDSTORE=1") && d->n_stored < HARNESS_MAX_STORED) {
                        d->stored_fds[d->n_stored] = fds[i];
                        snprintf(d->stored_names[d->n_stored], sizeof(d->stored_names[0]), "%s", name);
                        d->n_stored++;
                } else
                        close(fds[i]);
        }
}

/* Reads every waiting datagram: fds to the fd store, text to the queue (lock held). */
static void pull_locked(struct daemon_proc *d) {
        struct harness_reader *q = d->reader;
        char buf[4096];

        for (;;) {
                union {
                        struct cmsghdr h;
                        char buf[CMSG_SPACE(sizeof(int) * 16)];
                } control;
                struct iovec iov = { .iov_base = buf, .iov_len = sizeof(buf) - 1 };
                struct msghdr mh = {
                        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = &control, .msg_controllen = sizeof(control)
                };
                ssize_t n = recvmsg(d->notify_fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
                int fds[16];
                size_t n_fds = 0;

                if (n < 0)
                        return;
                buf[n] = 0;
                for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
                        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
                                for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int) && n_fds < 16; i++)
                                        memcpy(&fds[n_fds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
                fd_store_apply(d, buf, fds, n_fds);
                if (q->n == QUEUE_MAX) { /* the oldest goes: a test that never waits needs none of them */
                        free(q->queue[q->head]);
                        q->head = (q->head + 1) % QUEUE_MAX;
                        q->n--;
                }
                q->queue[(q->head + q->n++) % QUEUE_MAX] = strdup(buf);
        }
}

/* The oldest queued datagram into buf, appended to d->notified: 1, or 0 if none waits (lock held). */
static int pop_locked(struct daemon_proc *d, char *buf, size_t size) {
        struct harness_reader *q = d->reader;
        size_t l = strlen(d->notified);
        char *m;

        if (q->n == 0)
                return 0;
        m = q->queue[q->head];
        q->head = (q->head + 1) % QUEUE_MAX;
        q->n--;
        snprintf(buf, size, "%s", m ?: "");
        free(m);
        snprintf(d->notified + l, sizeof(d->notified) - l, "%s|", buf);
        return 1;
}

static void *reader_main(void *userdata) {
        struct daemon_proc *d = userdata;
        struct harness_reader *q = d->reader;

        for (;;) {
                (void) poll(&(struct pollfd){ .fd = d->notify_fd, .events = POLLIN }, 1, 50);
                pthread_mutex_lock(&q->lock);
                if (q->stop) {
                        pthread_mutex_unlock(&q->lock);
                        return NULL;
                }
                pull_locked(d);
                pthread_mutex_unlock(&q->lock);
        }
}

/* WNOWAIT: the exit status stays for harness_stop() or the test to collect. */
static bool daemon_exited(struct daemon_proc *d) {
        siginfo_t si = {};

        if (d->pid <= 0)
                return true;
        if (waitid(P_PID, d->pid, &si, WEXITED | WNOHANG | WNOWAIT) < 0)
                return errno == ECHILD;
        return si.si_pid == d->pid;
}

static uint64_t now_msec(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000 + (uint64_t) ts.tv_nsec / 1000000;
}

int harness_wait_notify(struct daemon_proc *d, const char *want, unsigned seconds) {
        uint64_t deadline = now_msec() + (uint64_t) seconds * 1000;
        struct harness_reader *q = d->reader;
        char buf[4096];

        for (;;) {
                /* Exit checked before reading: what a daemon sent before it died is still read. */
                bool exited = daemon_exited(d);

                pthread_mutex_lock(&q->lock);
                pull_locked(d);
                /* One datagram at a time: those after the one wanted are left for the next wait. */
                while (pop_locked(d, buf, sizeof(buf)) > 0)
                        if (has_line(buf, want)) {
                                pthread_mutex_unlock(&q->lock);
                                return 0;
                        }
                pthread_mutex_unlock(&q->lock);
                if (exited)
                        return -ESRCH;
                if (now_msec() >= deadline)
                        return -ETIMEDOUT;
                usleep(10000);
        }
}

void harness_drain_notify(struct daemon_proc *d) {
        struct harness_reader *q = d->reader;
        char buf[4096];

        if (!q)
                return;
        pthread_mutex_lock(&q->lock);
        /* Read, not discarded: the fd store must see every FDSTORE= the daemon sent. */
        pull_locked(d);
        while (pop_locked(d, buf, sizeof(buf)) > 0)
                ;
        d->notified[0] = 0;
        pthread_mutex_unlock(&q->lock);
}

/*
 * The caller's environment with our NOTIFY_SOCKET in place of any it has and
 * no LISTEN_*; made before fork(), for the child, with 3 free slots at the end
 * (NULL-terminated) for LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID.
 */
static char **child_environment(const char *notify_env) {
        size_t n = 0, k = 0;
        char **env;

        while (environ[n])
                n++;
        env = calloc(n + 5, sizeof(char *));
        if (!env)
                return NULL;
        for (size_t i = 0; i < n; i++)
                if (strncmp(environ[i], "NOTIFY_SOCKET=", strlen("NOTIFY_SOCKET=")) != 0 &&
                    strncmp(environ[i], "LISTEN_", strlen("LISTEN_")) != 0)
                        env[k++] = environ[i];
        env[k++] = (char *) notify_env;
        return env;
}

/* Appends to env (from child_environment()) at its first NULL. */
static void env_append(char **env, char *entry) {
        while (*env)
                env++;
        *env = entry;
}

int harness_start(struct daemon_proc *d, const char *const *extra_args, bool mount) {
        const char *argv[32];
        char notify_env[160], fds_env[32], pid_env[32];
        _cleanup_free_ char *names_env = NULL;
        size_t n_listen = d->n_listen;
        char **env;
        size_t n = 0;
        int status, r;

        argv[n++] = daemon_path();
        argv[n++] = "--config";
        argv[n++] = d->config;
        argv[n++] = "--socket";
        argv[n++] = d->socket;
        if (mount) {
                (void) mkdir(d->mount, 0755);
                argv[n++] = "--mount";
                argv[n++] = d->mount;
        } else
                argv[n++] = "--no-mount";
        for (size_t i = 0; extra_args && extra_args[i] && n < 30; i++)
                argv[n++] = extra_args[i];
        argv[n] = NULL;

        /* The harness's socket wins over one the caller has: only then can it tell when the daemon is up. */
        snprintf(notify_env, sizeof(notify_env), "NOTIFY_SOCKET=%s", d->notify);
        env = child_environment(notify_env);
        if (!env)
                return -ENOMEM;
        d->n_listen = 0; /* for this start only */
        if (n_listen > HARNESS_MAX_STORED) {
                free(env);
                return -E2BIG;
        }
        if (n_listen > 0) {
                size_t len = strlen("LISTEN_FDNAMES=") + 1;

                for (size_t i = 0; i < n_listen; i++)
                        len += strlen(d->listen_names[i]) + 1;
                names_env = calloc(1, len);
                if (!names_env) {
                        free(env);
                        return -ENOMEM;
                }
                strcpy(names_env, "LISTEN_FDNAMES=");
                for (size_t i = 0; i < n_listen; i++) {
                        if (i > 0)
                                strcat(names_env, ":");
                        strcat(names_env, d->listen_names[i]);
                }
                snprintf(fds_env, sizeof(fds_env), "LISTEN_FDS=%zu", n_listen);
                env_append(env, fds_env);
                env_append(env, names_env);
        }
        /* A daemon this test started and killed before may have left datagrams behind. */
        harness_drain_notify(d);

        d->pid = fork();
        if (d->pid < 0) {
                r = -errno;
                free(env);
                return r;
        }
        if (d->pid == 0) {
                int fd = open(d->log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);

                if (fd >= 0)
                        (void) dup2(fd, STDERR_FILENO);
                if (n_listen > 0) {
                        int tmp[HARNESS_MAX_STORED];

                        /* Out of the way of 3.. first, then into place (dup2 clears FD_CLOEXEC). */
                        for (size_t i = 0; i < n_listen; i++) {
                                tmp[i] = fcntl(d->listen_fds[i], F_DUPFD_CLOEXEC, 3 + (int) n_listen);
                                if (tmp[i] < 0)
                                        _exit(126);
                        }
                        for (size_t i = 0; i < n_listen; i++)
                                if (dup2(tmp[i], 3 + (int) i) < 0)
                                        _exit(126);
                        /* The child's own pid, as systemd sets it: only known after fork(). */
                        snprintf(pid_env, sizeof(pid_env), "LISTEN_PID=%d", (int) getpid());
                        env_append(env, pid_env);
                }
                execvpe(argv[0], (char *const *) argv, env);
                _exit(127);
        }
        free(env);
        d->mounted = mount;
        /* Up to 20 s: under sanitizers on a loaded 2-CPU machine start-up is slow. */
        r = harness_wait_notify(d, "READY=1", 20);
        if (r == 0)
                return 0;
        /* Not up: leave neither daemon nor mount behind, as a failed criterion .init runs no .fini. */
        status = harness_stop(d);
        return r == -ESRCH ? status : r;
}

static void unmount(struct daemon_proc *d) {
        if (!d->mounted)
                return;
        /* Lazy: a test that failed half-way may still hold a file open in the view. */
        if (umount2(d->mount, MNT_DETACH) < 0) {
                char cmd[256];

                snprintf(cmd, sizeof(cmd), "fusermount3 -u -z %s 2>/dev/null", d->mount);
                (void) system(cmd);
        }
        d->mounted = false;
}

int harness_stop(struct daemon_proc *d) {
        int status = -1;

        if (d->pid > 0) {
                (void) kill(d->pid, SIGTERM);
                for (int i = 0; i < 3000; i++) {
                        pid_t p = waitpid(d->pid, &status, WNOHANG);

                        if (p == d->pid)
                                break;
                        if (i == 2999) {
                                (void) kill(d->pid, SIGKILL);
                                (void) waitpid(d->pid, &status, 0);
                        }
                        usleep(10000);
                }
                d->pid = 0;
                status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        }
        unmount(d);
        return status;
}

static unsigned count_in_log(struct daemon_proc *d, const char *what) {
        unsigned n = 0;

        for (const char *p = harness_log(d); (p = strstr(p, what)); p += strlen(what))
                n++;
        return n;
}

static int wait_log_count(struct daemon_proc *d, const char *what, unsigned more_than, unsigned seconds) {
        for (unsigned i = 0; i < seconds * 100; i++) {
                if (count_in_log(d, what) > more_than)
                        return 0;
                usleep(10000);
        }
        return -ETIMEDOUT;
}

int harness_reload(struct daemon_proc *d) {
        int r;

        /* The start's READY=1 and later STATUS= updates must not pass for this reload's. */
        harness_drain_notify(d);
        if (kill(d->pid, SIGHUP) < 0)
                return -errno;
        r = harness_wait_notify(d, "RELOADING=1", 20);
        if (r < 0)
                return r;
        /* Sent after the log's "Reload done.": the reload's messages are in the log by now. */
        return harness_wait_notify(d, "READY=1", 20);
}

int harness_wait_log(struct daemon_proc *d, const char *what, unsigned seconds) {
        return wait_log_count(d, what, 0, seconds);
}

const char *harness_log(struct daemon_proc *d) {
        static char buf[65536];
        FILE *f = fopen(d->log, "re");
        size_t n = 0;

        if (f) {
                n = fread(buf, 1, sizeof(buf) - 1, f);
                fclose(f);
        }
        buf[n] = 0;
        return buf;
}

struct shmz_client *harness_connect(struct daemon_proc *d) {
        struct shmz_client *c;

        return shmz_connect(d->socket, &c) < 0 ? NULL : c;
}

void harness_cleanup(struct daemon_proc *d) {
        char cmd[128];

        if (d->pid > 0 || d->mounted)
                (void) harness_stop(d);
        if (d->dir[0]) {
                if (d->reader) {
                        pthread_mutex_lock(&d->reader->lock);
                        d->reader->stop = true;
                        pthread_mutex_unlock(&d->reader->lock);
                        pthread_join(d->reader->thread, NULL);
                        for (size_t i = 0; i < d->reader->n; i++)
                                free(d->reader->queue[(d->reader->head + i) % QUEUE_MAX]);
                        pthread_mutex_destroy(&d->reader->lock);
                        free(d->reader);
                        d->reader = NULL;
                }
                if (d->notify_fd >= 0)
                        close(d->notify_fd);
                d->notify_fd = -EBADF;
                for (size_t i = 0; i < d->n_stored; i++)
                        close(d->stored_fds[i]);
                d->n_stored = 0;
                snprintf(cmd, sizeof(cmd), "%s/", d->dir);
                detach_mounts(cmd); /* a mount a failed test left (the view, a stalling server) */
                snprintf(cmd, sizeof(cmd), "rm -rf %s", d->dir);
                (void) system(cmd);
        }
}

int harness_run_as(uid_t uid, gid_t gid, int (*fn)(void *), void *userdata) {
        pid_t pid = fork();
        int status;

        if (pid < 0)
                return -1;
        if (pid == 0) {
                if (setgroups(0, NULL) < 0 || setgid(gid) < 0 || setuid(uid) < 0)
                        _exit(126);
                _exit(fn(userdata));
        }
        if (waitpid(pid, &status, 0) < 0)
                return -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

int harness_raw_connect(const char *path) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        int fd;

        if (strlen(path) >= sizeof(sa.sun_path))
                return -ENAMETOOLONG;
        memcpy(sa.sun_path, path, strlen(path) + 1);
        fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        if (connect(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0) {
                int r = -errno;

                close(fd);
                return r;
        }
        return fd;
}

void harness_stop_for_restart(struct daemon_proc *d, bool crash) {
        /* One daemon restarts at a time in a test process: the arrays outlive the call, as harness_start() needs. */
        static int fds[HARNESS_MAX_STORED];
        static const char *names[HARNESS_MAX_STORED];

        harness_drain_notify(d);
        if (crash)
                cr_assert_eq(kill(d->pid, SIGKILL), 0);
        cr_assert_eq(harness_stop(d), crash ? 128 + SIGKILL : 0);
        harness_drain_notify(d);
        for (size_t i = 0; i < d->n_stored; i++) {
                fds[i] = d->stored_fds[i];
                names[i] = d->stored_names[i];
        }
        d->listen_fds = fds;
        d->listen_names = names;
        d->n_listen = d->n_stored;
}

int harness_tcp_connect(int port) {
        struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t) port) };
        int fd;

        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        if (connect(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0) {
                int r = -errno;

                close(fd);
                return r;
        }
        return fd;
}

void harness_stop_clean(struct daemon_proc *d) {
        int st = d->pid > 0 ? harness_stop(d) : 0;
        const char *log = harness_log(d);
        bool clean = !strstr(log, "Sanitizer") && !strstr(log, "runtime error");

        if (st != 0 || !clean)
                fprintf(stderr, "daemon log:\n%s\n", log);
        harness_cleanup(d);
        cr_assert_eq(st, 0, "the daemon exited with %d", st);
        cr_assert(clean, "the sanitizers complained");
}

int harness_wait_child(pid_t pid) {
        int status;

        if (waitpid(pid, &status, 0) != pid)
                return -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

struct shmz_port *harness_child_connect(const struct daemon_proc *d, const char *name) {
        struct shmz_client *c;
        struct shmz_port *p;

        if (shmz_connect(d->socket, &c) < 0)
                _exit(100);
        if (shmz_port_connect(c, name, &p) < 0)
                _exit(101);
        return p; /* the client lives until _exit, as the port needs */
}

unsigned harness_count_fds(pid_t pid) {
        char path[64];
        struct dirent *de;
        unsigned n = 0;
        DIR *dir;

        if (pid > 0)
                snprintf(path, sizeof(path), "/proc/%d/fd", (int) pid);
        else
                snprintf(path, sizeof(path), "/proc/self/fd");
        dir = opendir(path);
        if (!dir)
                return 0;
        while ((de = readdir(dir)))
                if (de->d_name[0] != '.')
                        n++;
        closedir(dir);
        return n - (pid > 0 ? 0 : 1); /* not the directory's own fd */
}
