/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The rate limiter example: decisions per second on a shared zone (the tree
 * and LRU list under the zone lock), in one process and in two processes
 * hammering the same zone, against the same arithmetic on a process-private
 * hash table (what a single-process server would do, no sharing at all).
 * Medians of several runs; RATIO <metric>/<anchor> <x>, x = our rate / anchor
 * rate (below 1: what sharing costs).
 */
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench-util.h"
#include "limiter.h"
#include "shmzone.h"
#include "zone.h"

#define MAX(a, b) ((a) > (b) ? (a) : (b))

#define RUNS 5
#define KEYS 10000u            /* distinct clients */
#define DECISIONS 2000000u     /* per process and run */
#define HASH_SLOTS (1u << 15u) /* the anchor's table: a power of two over twice the keys */

static const struct limiter_config cfg = { .rate = 100 * 1000, .burst = 100, .delay = LIMITER_NODELAY };
static uint32_t *seq; /* the key of each decision: the same sequence for both */

/* ---- the anchor: nginx's arithmetic on a private open-addressing hash table ------------------ */

struct slot {
        uint32_t key;
        bool used;
        uint32_t excess;
        uint64_t last;
};

static struct slot *table;

static int private_decide(uint32_t key, uint64_t now) {
        uint32_t h = (key * 2654435761u) & (HASH_SLOTS - 1);
        struct slot *s;
        int64_t ms, e;

        for (;; h = (h + 1) & (HASH_SLOTS - 1)) {
                s = &table[h];
                if (!s->used) {
                        *s = (struct slot){ .key = key, .used = true, .excess = 0, .last = now };
                        return LIMITER_PASS;
                }
                if (s->key == key)
                        break;
        }
        ms = (int64_t) (now - s->last);
        if (ms < -60000)
                ms = 1;
        else if (ms < 0)
                ms = 0;
        e = (int64_t) s->excess - (int64_t) cfg.rate * ms / 1000 + 1000;
        if (e < 0)
                e = 0;
        if (e > (int64_t) cfg.burst * 1000)
                return LIMITER_REJECT;
        s->excess = (uint32_t) e;
        if (ms)
                s->last = now;
        return LIMITER_PASS;
}

/* ---- runs --------------------------------------------------------------------------------- */

enum { SHARED, PRIVATE };

/* One process's share: DECISIONS decisions from offset `start` of the key sequence. */
static uint64_t run_one(int kind, struct limiter *l, unsigned start) {
        uint64_t passed = 0;

        for (unsigned i = 0; i < DECISIONS; i++) {
                uint32_t key = seq[(start + i) % DECISIONS];
                uint64_t now = 1000000 + i / 64; /* 64 decisions a millisecond */
                int v;

                if (kind == SHARED) {
                        struct limiter_decision d;
                        if (limiter_decide(l, &key, sizeof(key), now, &d) < 0) {
                                fprintf(stderr, "limiter_decide failed\n");
                                exit(1);
                        }
                        v = d.verdict;
                } else
                        v = private_decide(key, now);
                passed += v != LIMITER_REJECT;
        }
        return passed;
}

/* Start line and finish times of the processes of a run, shared: fork costs are not timed. */
struct race {
        _Atomic int ready, go;
        _Atomic uint64_t end_ns[2];
};
static struct race *race;

/* Decisions per second, all nproc processes together; a fresh zone or table each run. */
static double rate(int kind, unsigned nproc) {
        double r[RUNS];

        for (int run = 0; run < RUNS; run++) {
                struct shmz_zone *z = NULL;
                struct limiter *l = NULL;
                pid_t pids[2];
                double t0, t1;

                if (kind == SHARED) {
                        if (zone_new_anonymous("bench-limiter", 16 << 20, &z) < 0 || limiter_open(z, &cfg, &l) < 0) {
                                fprintf(stderr, "zone or limiter\n");
                                exit(1);
                        }
                } else
                        memset(table, 0, HASH_SLOTS * sizeof(*table));
                if (nproc == 1) {
                        t0 = now_ns();
                        (void) run_one(kind, l, 0);
                        t1 = now_ns();
                } else {
                        memset(race, 0, sizeof(*race));
                        for (unsigned p = 0; p < nproc; p++) {
                                pids[p] = fork();
                                if (pids[p] < 0) {
                                        perror("fork");
                                        exit(1);
                                }
                                if (pids[p] == 0) {
                                        atomic_fetch_add(&race->ready, 1);
                                        while (!atomic_load(&race->go))
                                                ;
                                        /* Private: each process has its own copy of the table, as it would. */
                                        (void) run_one(kind, l, p * (DECISIONS / 2));
                                        atomic_store(&race->end_ns[p], (uint64_t) now_ns());
                                        _exit(0);
                                }
                        }
                        while (atomic_load(&race->ready) < (int) nproc)
                                ;
                        t0 = now_ns();
                        atomic_store(&race->go, 1);
                        for (unsigned p = 0; p < nproc; p++)
                                waitpid(pids[p], NULL, 0);
                        t1 = 0;
                        for (unsigned p = 0; p < nproc; p++)
                                t1 = MAX(t1, (double) atomic_load(&race->end_ns[p]));
                }
                r[run] = (double) DECISIONS * nproc / ((t1 - t0) / 1e9);
                limiter_close(l);
                shmz_zone_close(z);
        }
        return median(r, RUNS);
}

int main(void) {
        double s1, p1, s2, p2;

        setvbuf(stdout, NULL, _IOLBF, 0);
        seq = malloc(DECISIONS * sizeof(*seq));
        table = malloc(HASH_SLOTS * sizeof(*table));
        race = mmap(NULL, sizeof(*race), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (!seq || !table || race == MAP_FAILED)
                return 1;
        srandom(1);
        for (unsigned i = 0; i < DECISIONS; i++)
                seq[i] = 0x0a000000u + (uint32_t) random() % KEYS; /* 10.0.x.y */

        printf("# %u decisions per process over %u IPv4 keys, rate 100r/s burst 100 nodelay; median of %d runs\n",
               DECISIONS, KEYS, RUNS);
        printf("# node: %zu bytes per IPv4 key\n", limiter_node_bytes(4));
        s1 = rate(SHARED, 1);
        p1 = rate(PRIVATE, 1);
        printf("decisions_1proc shared_zone %.0f/s private_hash %.0f/s\n", s1, p1);
        s2 = rate(SHARED, 2);
        p2 = rate(PRIVATE, 2);
        printf("decisions_2proc shared_zone %.0f/s private_hash %.0f/s (each process its own table)\n", s2, p2);
        printf("RATIO decisions_1proc/private_hash %.3f\n", s1 / p1);
        printf("RATIO decisions_2proc/private_hash %.3f\n", s2 / p2);
        printf("# the private table shares nothing: two nginx-less servers would each count clients on their own\n");
        free(seq);
        free(table);
        return 0;
}
