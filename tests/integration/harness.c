/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "shmzone.h"

extern char **environ;

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
                if (why[0]) {
                        /* scripts/test.sh counts the skipped cases from this line. */
                        fprintf(stderr, "Skipping all %zu tests: %s.\n", tests->tests, why);
                        r = 77;
                } else
                        r = criterion_run_all_tests(tests) ? 0 : 1;
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

void harness_init(struct daemon_proc *d, const char *config_text) {
        memset(d, 0, sizeof(*d));
        snprintf(d->dir, sizeof(d->dir), "/tmp/shmz-test-XXXXXX");
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

/* Reads one waiting datagram into buf and appends it to d->notified: 1, 0 if none waits, or -errno. */
static int notify_recv(struct daemon_proc *d, char *buf, size_t size) {
        ssize_t n = recv(d->notify_fd, buf, size - 1, MSG_DONTWAIT);
        size_t l = strlen(d->notified);

        if (n < 0)
                return errno == EAGAIN || errno == EINTR ? 0 : -errno;
        buf[n] = 0;
        snprintf(d->notified + l, sizeof(d->notified) - l, "%s|", buf);
        return 1;
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
        char buf[4096];

        for (;;) {
                /* Exit checked before reading: what a daemon sent before it died is still read. */
                bool exited = daemon_exited(d);
                int r;

                /* One datagram at a time: those after the one wanted are left for the next wait. */
                while ((r = notify_recv(d, buf, sizeof(buf))) > 0)
                        if (has_line(buf, want))
                                return 0;
                if (r < 0)
                        return r;
                if (exited)
                        return -ESRCH;
                if (now_msec() >= deadline)
                        return -ETIMEDOUT;
                /* Woken by the next datagram; the timeout only lets us notice a daemon that died. */
                (void) poll(&(struct pollfd){ .fd = d->notify_fd, .events = POLLIN }, 1, 100);
        }
}

void harness_drain_notify(struct daemon_proc *d) {
        char buf[4096];

        while (d->notify_fd >= 0 && recv(d->notify_fd, buf, sizeof(buf), MSG_DONTWAIT) >= 0)
                ;
        d->notified[0] = 0;
}

/* The caller's environment with our NOTIFY_SOCKET in place of any it has; made before fork(), for the child. */
static char **child_environment(const char *notify_env) {
        size_t n = 0, k = 0;
        char **env;

        while (environ[n])
                n++;
        env = calloc(n + 2, sizeof(char *));
        if (!env)
                return NULL;
        for (size_t i = 0; i < n; i++)
                if (strncmp(environ[i], "NOTIFY_SOCKET=", strlen("NOTIFY_SOCKET=")) != 0)
                        env[k++] = environ[i];
        env[k++] = (char *) notify_env;
        return env;
}

int harness_start(struct daemon_proc *d, const char *const *extra_args, bool mount) {
        const char *argv[32];
        char notify_env[160];
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
                if (d->notify_fd >= 0)
                        close(d->notify_fd);
                d->notify_fd = -EBADF;
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
