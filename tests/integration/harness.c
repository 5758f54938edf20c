/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
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

static const char *daemon_path(void) {
        const char *p = getenv("SHMZONED");

        return p ? p : "shmzoned";
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

static bool socket_answers(struct daemon_proc *d) {
        struct shmz_client *c;

        if (shmz_connect(d->socket, &c) < 0)
                return false;
        shmz_disconnect(c);
        return true;
}

int harness_start(struct daemon_proc *d, const char *const *extra_args, bool mount) {
        const char *argv[32];
        size_t n = 0;
        int status;

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

        d->pid = fork();
        if (d->pid < 0)
                return -1;
        if (d->pid == 0) {
                int fd = open(d->log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);

                if (fd >= 0)
                        (void) dup2(fd, STDERR_FILENO);
                execvp(argv[0], (char *const *) argv);
                _exit(127);
        }
        d->mounted = mount;
        /* Up to 20 s: under sanitizers on a loaded 2-CPU machine start-up is slow. */
        for (int i = 0; i < 2000; i++) {
                if (waitpid(d->pid, &status, WNOHANG) == d->pid) {
                        d->pid = 0;
                        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
                }
                if (socket_answers(d))
                        return 0;
                usleep(10000);
        }
        return -1;
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
        unsigned before = count_in_log(d, "Reload done.");

        if (kill(d->pid, SIGHUP) < 0)
                return -errno;
        return wait_log_count(d, "Reload done.", before, 20);
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
