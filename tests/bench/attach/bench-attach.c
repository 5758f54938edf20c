/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Attach latency: connect + open + map of a zone served by a real shmzoned,
 * against shm_open + mmap of a /dev/shm file, side by side in one run.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "../bench-util.h"
#include "harness.h"
#include "shmzone.h"

#define ZONE_SIZE (1u << 20)
#define ITERATIONS 2000
#define RUNS 7

/* Each timed op touches the first page, so that the mapping is really usable. */
static double run_shmz_full(const char *sock) {
        double t0 = now_ns();

        for (int i = 0; i < ITERATIONS; i++) {
                struct shmz_client *c;
                struct shmz_zone *z;

                if (shmz_connect(sock, &c) < 0 || shmz_zone_open(c, "bench", 0, NULL, 0, &z) < 0)
                        abort();
                ((volatile char *) shmz_zone_base(z))[0]++;
                shmz_zone_close(z);
                shmz_disconnect(c);
        }
        return (now_ns() - t0) / ITERATIONS;
}

static double run_shmz_open(struct shmz_client *c) {
        double t0 = now_ns();

        for (int i = 0; i < ITERATIONS; i++) {
                struct shmz_zone *z;

                if (shmz_zone_open(c, "bench", 0, NULL, 0, &z) < 0)
                        abort();
                ((volatile char *) shmz_zone_base(z))[0]++;
                shmz_zone_close(z);
        }
        return (now_ns() - t0) / ITERATIONS;
}

static double run_shm_open(const char *name) {
        double t0 = now_ns();

        for (int i = 0; i < ITERATIONS; i++) {
                int fd = shm_open(name, O_RDWR | O_CLOEXEC, 0);
                void *p;

                if (fd < 0)
                        abort();
                p = mmap(NULL, ZONE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
                if (p == MAP_FAILED)
                        abort();
                ((volatile char *) p)[0]++;
                munmap(p, ZONE_SIZE);
                close(fd);
        }
        return (now_ns() - t0) / ITERATIONS;
}

int main(int argc, char *argv[]) {
        double full[RUNS], open_only[RUNS], anchor[RUNS];
        struct daemon_proc d;
        struct shmz_client *c;
        struct shmz_zone *z;
        char shm_name[64];
        int fd;

        harness_init(&d, "[daemon]\nmemory_budget = 64M\n[zone bench]\nsize = 1M\nmode = 0600\n");
        if (harness_start(&d, NULL, false) != 0) {
                fprintf(stderr, "daemon did not start: %s\n", harness_log(&d));
                harness_cleanup(&d);
                return 1;
        }
        snprintf(shm_name, sizeof(shm_name), "/shmz-bench-%d", (int) getpid());
        fd = shm_open(shm_name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd < 0 || ftruncate(fd, ZONE_SIZE) < 0)
                return 1;
        close(fd);
        if (shmz_connect(d.socket, &c) < 0 || shmz_zone_open(c, "bench", 0, NULL, 0, &z) < 0)
                return 1;
        shmz_zone_close(z);

        /* Interleaved runs: machine noise hits both sides alike. */
        for (int r = 0; r < RUNS; r++) {
                anchor[r] = run_shm_open(shm_name);
                full[r] = run_shmz_full(d.socket);
                open_only[r] = run_shmz_open(c);
        }
        shmz_disconnect(c);
        shm_unlink(shm_name);
        harness_cleanup(&d);

        printf("attach (connect+open+map+touch+close), shmzone: %.0f ns median of %d runs x %d\n", median(full, RUNS),
               RUNS, ITERATIONS);
        printf("attach (open+map+touch+close on a connection), shmzone: %.0f ns\n", median(open_only, RUNS));
        printf("attach (shm_open+mmap+touch+munmap), /dev/shm: %.0f ns\n", median(anchor, RUNS));
        printf("RATIO attach/shm_open %.3f\n", median(anchor, RUNS) / median(full, RUNS));
        printf("RATIO attach_connected/shm_open %.3f\n", median(anchor, RUNS) / median(open_only, RUNS));
        return 0;
}
