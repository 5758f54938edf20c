/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The zone allocator side by side with glibc malloc (one process) and
 * Boost.Interprocess managed_shared_memory (rbtree_best_fit, the default), in
 * the same run. Each figure is the median of several runs. One line per
 * comparison: RATIO <metric>/<anchor> <x>, x = how many times better we do.
 */
#include <algorithm>
#include <boost/interprocess/managed_shared_memory.hpp>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <malloc.h>
#include <new>
#include <string>
#include <unistd.h>
#include <vector>

extern "C" {
#include "zone.h"
}

namespace bip = boost::interprocess;

static const size_t ZONE = 64u << 20;
static const int RUNS = 5;

static double now_ns() {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double) ts.tv_sec * 1e9 + (double) ts.tv_nsec;
}

static double median(std::vector<double> v) {
        std::sort(v.begin(), v.end());
        return v[v.size() / 2];
}

static uint64_t rng = 88172645463325252ull;
static uint64_t xorshift() {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        return rng;
}

/* The allocators behind one interface; the benchmark loops are templates so nothing is indirect. */
struct Glibc {
        const char *name = "glibc";
        void *alloc(size_t n) {
                return malloc(n);
        }
        void dealloc(void *p) {
                free(p);
        }
};

struct Shmz {
        const char *name = "shmzone";
        struct shmz_zone *z = nullptr;
        Shmz() {
                if (zone_new_anonymous("bench", ZONE, &z) < 0) {
                        perror("zone_new_anonymous");
                        exit(1);
                }
        }
        ~Shmz() {
                shmz_zone_close(z);
        }
        void *alloc(size_t n) {
                return shmz_alloc(z, n);
        }
        void dealloc(void *p) {
                shmz_free(z, p);
        }
};

/* The _locked calls under one lock taken around a batch, as nginx modules do under their zone lock. */
struct ShmzLocked : Shmz {
        ShmzLocked() {
                name = "shmzone_locked";
                shmz_mutex_lock(shmz_zone_mutex(z));
        }
        ~ShmzLocked() {
                shmz_mutex_unlock(shmz_zone_mutex(z));
        }
        void *alloc(size_t n) {
                return shmz_alloc_locked(z, n);
        }
        void dealloc(void *p) {
                shmz_free_locked(z, p);
        }
};

/*
 * Not an allocator: the zone lock taken and released once in alloc and once in
 * free, as shmz_alloc and shmz_free must, and nothing else. Its pair time is the
 * floor of an allocator that locks per call; glibc's pair (thread cache, no
 * atomic at all) over it bounds pair/glibc.
 */
struct LockFloor : Shmz {
        char buf[512];
        LockFloor() {
                name = "lock_floor";
        }
        void *alloc(size_t) {
                shmz_mutex_lock(shmz_zone_mutex(z));
                shmz_mutex_unlock(shmz_zone_mutex(z));
                return buf;
        }
        void dealloc(void *) {
                shmz_mutex_lock(shmz_zone_mutex(z));
                shmz_mutex_unlock(shmz_zone_mutex(z));
        }
};

struct Boost {
        const char *name = "boost";
        std::string shm_name;
        bip::managed_shared_memory *seg;
        Boost() {
                shm_name = "shmzone-bench-" + std::to_string(getpid());
                bip::shared_memory_object::remove(shm_name.c_str());
                seg = new bip::managed_shared_memory(bip::create_only, shm_name.c_str(), ZONE);
        }
        ~Boost() {
                delete seg;
                bip::shared_memory_object::remove(shm_name.c_str());
        }
        void *alloc(size_t n) {
                return seg->allocate(n, std::nothrow);
        }
        void dealloc(void *p) {
                seg->deallocate(p);
        }
};

static std::vector<size_t> sizes_16_512(size_t n) {
        std::vector<size_t> v(n);
        for (auto &s : v)
                s = 16 + xorshift() % 497;
        return v;
}

/* ns per alloc+free pair, sizes 16..512, freed right away. */
template <class A> static double bench_pair(int iters) {
        std::vector<double> r;
        std::vector<size_t> sz = sizes_16_512(4096);
        for (int run = 0; run < RUNS; run++) {
                A a;
                double t0 = now_ns();
                for (int i = 0; i < iters; i++) {
                        char *p = (char *) a.alloc(sz[i & 4095]);
                        if (!p)
                                abort();
                        p[0] = (char) i;
                        a.dealloc(p);
                }
                r.push_back((now_ns() - t0) / iters);
        }
        return median(r);
}

/* ns per (free + alloc) on a live set of 20000 objects of 16..512 bytes, freed in random order. */
template <class A> static double bench_churn(int iters) {
        std::vector<double> r;
        std::vector<size_t> sz = sizes_16_512(1 << 16);
        std::vector<uint32_t> idx(1 << 16);
        for (auto &i : idx)
                i = (uint32_t) (xorshift() % 20000);
        for (int run = 0; run < RUNS; run++) {
                A a;
                std::vector<void *> live(20000);
                for (size_t i = 0; i < live.size(); i++)
                        live[i] = a.alloc(sz[i]);
                double t0 = now_ns();
                for (int i = 0; i < iters; i++) {
                        uint32_t k = idx[i & 0xffff];
                        a.dealloc(live[k]);
                        live[k] = a.alloc(sz[(i * 7) & 0xffff]);
                        if (!live[k])
                                abort();
                }
                r.push_back((now_ns() - t0) / iters);
                for (void *p : live)
                        a.dealloc(p);
        }
        return median(r);
}

/* Payload stored in the 64 MiB area before the first failure, as a fraction of it. */
template <class A> static double fill_zone(bool mixed) {
        A a;
        double payload = 0;
        for (;;) {
                size_t n = mixed ? 16 + xorshift() % 497 : 84;
                if (!a.alloc(n))
                        break;
                payload += (double) n;
        }
        return payload / (double) ZONE;
}

/* glibc has no fixed area: payload over the heap it took to hold 64 MiB of payload. */
static double fill_glibc(bool mixed) {
        std::vector<void *> v;
        double payload = 0;
        struct mallinfo2 before = mallinfo2();
        while (payload < (double) ZONE) {
                size_t n = mixed ? 16 + xorshift() % 497 : 84;
                v.push_back(malloc(n));
                payload += (double) n;
        }
        struct mallinfo2 after = mallinfo2();
        double heap = (double) (after.uordblks - before.uordblks);
        for (void *p : v)
                free(p);
        return payload / heap;
}

static void ratio(const char *metric, const char *anchor, double x) {
        printf("RATIO %s/%s %.2f\n", metric, anchor, x);
}

int main() {
        const int pair_iters = 2000000, churn_iters = 1000000, boost_iters = 200000;

        setvbuf(stdout, nullptr, _IOLBF, 0);
        printf("# alloc+free pair, sizes 16..512 B, median of %d runs, ns per pair\n", RUNS);
        double p_glibc = bench_pair<Glibc>(pair_iters);
        double p_shmz = bench_pair<Shmz>(pair_iters);
        double p_locked = bench_pair<ShmzLocked>(pair_iters);
        double p_boost = bench_pair<Boost>(boost_iters);
        double p_floor = bench_pair<LockFloor>(pair_iters);
        printf("pair glibc %.1f shmzone %.1f shmzone_locked %.1f boost %.1f lock_floor %.1f\n", p_glibc, p_shmz,
               p_locked, p_boost, p_floor);

        printf("# random churn on 20000 live objects of 16..512 B, ns per free+alloc\n");
        double c_glibc = bench_churn<Glibc>(churn_iters);
        double c_shmz = bench_churn<Shmz>(churn_iters);
        double c_locked = bench_churn<ShmzLocked>(churn_iters);
        double c_boost = bench_churn<Boost>(boost_iters);
        printf("churn glibc %.1f shmzone %.1f shmzone_locked %.1f boost %.1f\n", c_glibc, c_shmz, c_locked, c_boost);

        printf("# fill: payload before the first failure in 64 MiB (glibc: payload / heap used)\n");
        double f84_shmz = fill_zone<Shmz>(false), f84_boost = fill_zone<Boost>(false), f84_glibc = fill_glibc(false);
        double fmx_shmz = fill_zone<Shmz>(true), fmx_boost = fill_zone<Boost>(true), fmx_glibc = fill_glibc(true);
        printf("fill84 shmzone %.3f boost %.3f glibc %.3f\n", f84_shmz, f84_boost, f84_glibc);
        printf("fill16-512 shmzone %.3f boost %.3f glibc %.3f\n", fmx_shmz, fmx_boost, fmx_glibc);

        ratio("pair", "glibc", p_glibc / p_shmz);
        ratio("pair", "boost", p_boost / p_shmz);
        ratio("pair_locked", "glibc", p_glibc / p_locked);
        /* How near the two lock round trips alone we are, and the best pair/glibc any per-call lock allows. */
        ratio("pair", "lock_floor", p_floor / p_shmz);
        printf("# floor: two lock/unlock pairs alone give pair/glibc at most %.2f\n", p_glibc / p_floor);
        ratio("churn", "glibc", c_glibc / c_shmz);
        ratio("churn", "boost", c_boost / c_shmz);
        ratio("churn_locked", "glibc", c_glibc / c_locked);
        ratio("fill84", "boost", f84_shmz / f84_boost);
        ratio("fill84", "glibc", f84_shmz / f84_glibc);
        ratio("fill_mixed", "boost", fmx_shmz / fmx_boost);
        ratio("fill_mixed", "glibc", fmx_shmz / fmx_glibc);
        printf("# goals: pair and churn >= 0.5 against glibc, >= 5 against boost; fill84 >= 0.85 of the zone\n");
        return 0;
}
