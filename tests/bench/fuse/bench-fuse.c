/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The FUSE view against tmpfs, side by side in one run:
 *   seq_read   sequential read() of a 1 GiB zone through the mount vs a 1 GiB tmpfs file
 *   ls_l_10k   ls -l of a directory of 10 000 zones vs 10 000 tmpfs files
 *   stat       stat() of one path (the path walk revalidates the dentry) vs tmpfs
 * Each figure is the median of several alternating runs; RATIO = anchor / ours.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../bench-util.h"
#include "harness.h"
#include "shmzone.h"

#define GIB (UINT64_C(1) << 30)
#define READ_BUF (1u << 20)
#define RUNS 5
#define NFILES 10000
#define NSTAT 20000

static struct daemon_proc d;
static char tmpdir[] = "/dev/shm/shmz-bench-XXXXXX";

static double now(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

static void die(const char *what) {
        fprintf(stderr, "bench-fuse: %s: %s\n", what, strerror(errno));
        (void) harness_stop(&d);
        harness_cleanup(&d);
        exit(1);
}

static double time_read(const char *path, void *buf) {
        double t0 = now();
        uint64_t total = 0;
        ssize_t n;
        int fd = open(path, O_RDONLY | O_CLOEXEC);

        if (fd < 0)
                die(path);
        while ((n = read(fd, buf, READ_BUF)) > 0)
                total += (uint64_t) n;
        close(fd);
        if (n < 0 || total != GIB)
                die("short read");
        return now() - t0;
}

static double time_ls(const char *dir) {
        double t0 = now();
        pid_t pid = fork();
        int st;

        if (pid < 0)
                die("fork");
        if (pid == 0) {
                int fd = open("/dev/null", O_WRONLY);

                (void) dup2(fd, STDOUT_FILENO);
                execlp("ls", "ls", "-l", dir, (char *) NULL);
                _exit(127);
        }
        if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
                die("ls -l");
        return now() - t0;
}

static double time_stat(const char *path) {
        struct stat st;
        double t0 = now();

        for (int i = 0; i < NSTAT; i++)
                if (stat(path, &st) < 0)
                        die(path);
        return (now() - t0) / NSTAT;
}

static void fill_file(const char *path, uint64_t size, void *buf) {
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);

        if (fd < 0)
                die(path);
        memset(buf, 0x5a, READ_BUF);
        for (uint64_t o = 0; o < size; o += READ_BUF)
                if (write(fd, buf, READ_BUF) != READ_BUF)
                        die("write");
        close(fd);
}

int main(void) {
        char path[512], anchor[512], dir[512], adir[512];
        double fuse_t[RUNS], tmpfs_t[RUNS];
        struct shmz_client *c = NULL;
        struct shmz_zone *z = NULL;
        char *buf;
        double f, t;

        buf = aligned_alloc(4096, READ_BUF);
        if (!buf || !mkdtemp(tmpdir))
                die("setup");
        harness_init(&d, "[daemon]\nmemory_budget = 2G\nuid_quota = 2G\nuid_max_zones = 20000\n");
        if (harness_start(&d, NULL, true) != 0)
                die("daemon did not start");
        if (shmz_connect(d.socket, &c) < 0)
                die("connect");

        /* 1. Sequential read of 1 GiB. */
        if (shmz_zone_open(c, "big", GIB, NULL, SHMZ_CREATE, &z) < 0)
                die("zone");
        memset(shmz_zone_base(z), 0x5a, GIB); /* the pages exist, as tmpfs's do */
        snprintf(path, sizeof(path), "%s/zones/big", d.mount);
        snprintf(anchor, sizeof(anchor), "%s/big", tmpdir);
        fill_file(anchor, GIB, buf);
        (void) time_read(path, buf); /* warm-up */
        (void) time_read(anchor, buf);
        for (int i = 0; i < RUNS; i++) {
                fuse_t[i] = time_read(path, buf);
                tmpfs_t[i] = time_read(anchor, buf);
        }
        f = median(fuse_t, RUNS);
        t = median(tmpfs_t, RUNS);
        printf("seq_read 1GiB bs=1MiB: fuse %.1f ms (%.2f GB/s), tmpfs %.1f ms (%.2f GB/s)\n", f * 1e3,
               (double) GIB / f / 1e9, t * 1e3, (double) GIB / t / 1e9);
        printf("RATIO seq_read/tmpfs %.3f\n", t / f);
        shmz_zone_close(z);
        (void) shmz_zone_unlink(c, "big");
        (void) unlink(anchor);

        /* 2. ls -l of 10 000 entries. */
        snprintf(adir, sizeof(adir), "%s/many", tmpdir);
        if (mkdir(adir, 0755) < 0)
                die("mkdir");
        for (int i = 0; i < NFILES; i++) {
                char name[32];
                int fd;

                snprintf(name, sizeof(name), "zone-%05d", i);
                if (shmz_zone_open(c, name, 4096, NULL, SHMZ_CREATE, &z) < 0)
                        die("zone");
                shmz_zone_close(z);
                if (snprintf(path, sizeof(path), "%s/%s", adir, name) >= (int) sizeof(path))
                        die("path");
                fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
                if (fd < 0 || ftruncate(fd, 4096) < 0)
                        die(path);
                close(fd);
        }
        snprintf(dir, sizeof(dir), "%s/zones", d.mount);
        (void) time_ls(dir);
        (void) time_ls(adir);
        for (int i = 0; i < RUNS; i++) {
                fuse_t[i] = time_ls(dir);
                tmpfs_t[i] = time_ls(adir);
        }
        f = median(fuse_t, RUNS);
        t = median(tmpfs_t, RUNS);
        printf("ls -l of %d entries: fuse %.1f ms, tmpfs %.1f ms\n", NFILES, f * 1e3, t * 1e3);
        printf("RATIO ls_l_10k/tmpfs %.3f\n", t / f);

        /* 3. stat latency of one path. */
        if (snprintf(path, sizeof(path), "%s/zones/zone-04242", d.mount) >= (int) sizeof(path) ||
            snprintf(anchor, sizeof(anchor), "%s/zone-04242", adir) >= (int) sizeof(anchor))
                die("path");
        for (int i = 0; i < RUNS; i++) {
                fuse_t[i] = time_stat(path);
                tmpfs_t[i] = time_stat(anchor);
        }
        f = median(fuse_t, RUNS);
        t = median(tmpfs_t, RUNS);
        printf("stat: fuse %.2f us, tmpfs %.2f us\n", f * 1e6, t * 1e6);
        printf("RATIO stat/tmpfs %.3f\n", t / f);

        shmz_disconnect(c);
        if (harness_stop(&d) != 0)
                fprintf(stderr, "bench-fuse: the daemon did not exit cleanly: %s\n", harness_log(&d));
        harness_cleanup(&d);
        snprintf(path, sizeof(path), "rm -rf %s", tmpdir);
        (void) system(path);
        free(buf);
        return 0;
}
