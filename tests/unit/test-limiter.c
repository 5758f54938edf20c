/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The rate limiter (ratelimit/) on daemon-less zones: nginx's
 * limit_req decisions on a virtual clock, its tree and list under churn,
 * eviction, several processes, and deaths in the middle of an update. Children
 * never call criterion asserts: they report through exit codes and the zone.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>

#include "limiter.h"
#include "mutex.h"
#include "shmzone.h"
#include "slab.h"
#include "zone.h"

static struct shmz_zone *zone;
static struct limiter *lim;

static void teardown(void) {
        limiter_close(lim);
        lim = NULL;
        shmz_zone_close(zone);
        zone = NULL;
}

static void open_limiter(uint64_t zone_size, uint32_t rate, uint32_t burst, uint32_t delay) {
        struct limiter_config cfg = { .rate = rate, .burst = burst, .delay = delay };

        cr_assert_eq(zone_new_anonymous("limiter-test", zone_size, &zone), 0);
        cr_assert_eq(limiter_open(zone, &cfg, &lim), 0);
}

static uint64_t mono_ms(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000 + (uint64_t) ts.tv_nsec / 1000000;
}

static struct limiter_stats lstats(void) {
        struct limiter_stats st;
        cr_assert_eq(limiter_stats(lim, &st), 0);
        return st;
}

/* Blocks handed out by the allocator: the limiter's header and one per key, nothing leaked. */
static uint64_t used_blocks(void) {
        struct shmz_alloc_stats st;
        uint64_t n = 0;

        cr_assert_eq(shmz_zone_alloc_stats(zone, &st), 0);
        for (unsigned c = 0; c < st.nclasses; c++)
                n += st.classes[c].used;
        return n + st.large_used;
}

TestSuite(limiter, .fini = teardown);

/* ---- nginx's semantics on a virtual clock ---------------------------------------------------- */

Test(limiter, parse_rate) {
        uint32_t r;

        cr_assert_eq(limiter_parse_rate("1r/s", &r), 0);
        cr_assert_eq(r, 1000);
        cr_assert_eq(limiter_parse_rate("30r/m", &r), 0);
        cr_assert_eq(r, 500);
        cr_assert_eq(limiter_parse_rate("1r/m", &r), 0);
        cr_assert_eq(r, 16, "1000/60 truncates, as in nginx");
        cr_assert_eq(limiter_parse_rate("0r/s", &r), -EINVAL);
        cr_assert_eq(limiter_parse_rate("1r/h", &r), -EINVAL);
        cr_assert_eq(limiter_parse_rate("r/s", &r), -EINVAL);
        cr_assert_eq(limiter_parse_rate("-1r/s", &r), -EINVAL);
        cr_assert_eq(limiter_parse_rate("99999999999r/s", &r), -ERANGE);
}

enum { P = LIMITER_PASS, D = LIMITER_DELAY, R = LIMITER_REJECT };

struct step {
        const char *key;
        uint64_t t; /* ms */
        int verdict;
        uint64_t delay_ms;
        uint32_t excess;
};

struct table {
        const char *name;
        const char *rate;
        uint32_t burst, delay;
        struct step steps[16];
};

/* Each expected value worked out by hand from nginx's documented algorithm (see limiter.h). */
static const struct table tables[] = {
        { "1r/s, no burst: one request a second",
          "1r/s",
          0,
          0,
          { { "a", 0, P, 0, 0 },
            { "a", 0, R, 0, 0 },
            { "a", 500, R, 0, 0 }, /* 0 + 1000 - 500 > 0; a reject leaves last at 0 */
            { "a", 1000, P, 0, 0 },
            { "a", 1999, R, 0, 0 },
            { "a", 2000, P, 0, 0 },
            { "b", 2000, P, 0, 0 }, /* keys are independent */
            { NULL } } },
        { "burst 3, delayed (no nodelay, no delay=)",
          "1r/s",
          3,
          0,
          { { "a", 0, P, 0, 0 },
            { "a", 0, D, 1000, 1000 },
            { "a", 0, D, 2000, 2000 },
            { "a", 0, D, 3000, 3000 },
            { "a", 0, R, 0, 3000 },
            { "a", 1500, D, 2500, 2500 }, /* 3000 + 1000 - 1500 */
            { "b", 1500, P, 0, 0 },
            { NULL } } },
        { "nodelay",
          "10r/s",
          5,
          LIMITER_NODELAY,
          { { "a", 0, P, 0, 0 },
            { "a", 0, P, 0, 1000 },
            { "a", 0, P, 0, 2000 },
            { "a", 0, P, 0, 3000 },
            { "a", 0, P, 0, 4000 },
            { "a", 0, P, 0, 5000 },
            { "a", 0, R, 0, 5000 },
            { "a", 100, P, 0, 5000 }, /* 100 ms drain 1000 */
            { "a", 100, R, 0, 5000 },
            { NULL } } },
        { "delay=2: two pass at once, then delayed",
          "1r/s",
          4,
          2,
          { { "a", 0, P, 0, 0 },
            { "a", 0, P, 0, 1000 },
            { "a", 0, P, 0, 2000 },
            { "a", 0, D, 1000, 3000 },
            { "a", 0, D, 2000, 4000 },
            { "a", 0, R, 0, 4000 },
            { NULL } } },
        { "30r/m",
          "30r/m",
          1,
          LIMITER_NODELAY,
          { { "a", 0, P, 0, 0 },
            { "a", 0, P, 0, 1000 },
            { "a", 0, R, 0, 1000 },
            { "a", 1000, R, 0, 1000 }, /* 1000 + 1000 - 500 > 1000; last stays 0 */
            { "a", 2000, P, 0, 1000 },
            { "a", 3999, R, 0, 1000 },
            { "a", 4000, P, 0, 1000 },
            { NULL } } },
        { "1r/m drains 16 milli-requests a second, as nginx",
          "1r/m",
          1,
          LIMITER_NODELAY,
          { { "a", 0, P, 0, 0 },
            { "a", 0, P, 0, 1000 },
            { "a", 30000, R, 0, 1000 }, /* 1000 + 1000 - 480 > 1000 */
            { "a", 62499, R, 0, 1000 }, /* - 999: still over; idle a minute but not drained: kept */
            { "a", 62500, P, 0, 1000 }, /* drained to 0, then this one: kept (only an insert expires keys) */
            { NULL } } },
        { "clock going backwards",
          "1r/s",
          5,
          LIMITER_NODELAY,
          { { "a", 100000, P, 0, 0 },
            { "a", 100000, P, 0, 1000 },
            { "a", 99000, P, 0, 2000 },  /* 1 s back: no drain, last kept */
            { "a", 100500, P, 0, 2500 }, /* drained from 100000, not from 99000 */
            { "a", 90000, P, 0, 3500 },  /* 10.5 s back: still no drain */
            { "a", 101000, P, 0, 4000 },
            { "a", 31000, P, 0, 4999 }, /* 70 s back: a reset, counted as 1 ms; the key is kept (nginx) */
            { NULL } } },
        { "a big step back is a reset",
          "1r/m",
          5,
          LIMITER_NODELAY,
          { { "a", 100000, P, 0, 0 },
            { "a", 100000, P, 0, 1000 },
            { "a", 100000, P, 0, 2000 },
            { "a", 100000, P, 0, 3000 },
            { "a", 30000, P, 0, 4000 }, /* 70 s back: counted as 1 ms (drains 0), last = 30000 */
            { "a", 31000, P, 0, 4984 }, /* drained from the new last: 16 */
            { "a", 31000, R, 0, 4984 },
            { "a", 101000, P, 0, 4864 }, /* 70 s on drains 1120, not enough to expire it */
            { NULL } } },
};

Test(limiter, nginx_decisions_table) {
        for (size_t t = 0; t < sizeof(tables) / sizeof(tables[0]); t++) {
                const struct table *tb = &tables[t];
                uint32_t rate;

                cr_assert_eq(limiter_parse_rate(tb->rate, &rate), 0);
                /* A fresh zone per table, so no key carries over. */
                teardown();
                open_limiter(1 << 20, rate, tb->burst, tb->delay);
                for (size_t i = 0; tb->steps[i].key; i++) {
                        const struct step *s = &tb->steps[i];
                        struct limiter_decision d;

                        cr_assert_eq(limiter_decide(lim, s->key, strlen(s->key), s->t, &d), 0);
                        cr_assert_eq((int) d.verdict, s->verdict, "%s, step %zu: verdict %d", tb->name, i, d.verdict);
                        cr_assert_eq(d.delay_ms, s->delay_ms, "%s, step %zu: delay %lu", tb->name, i,
                                     (unsigned long) d.delay_ms);
                        cr_assert_eq(d.excess, s->excess, "%s, step %zu: excess %u", tb->name, i, d.excess);
                }
        }
}

Test(limiter, empty_key_not_accounted) {
        struct limiter_decision d;

        open_limiter(1 << 20, 1000, 0, 0);
        for (int i = 0; i < 5; i++) {
                cr_assert_eq(limiter_decide(lim, "", 0, 0, &d), 0);
                cr_assert_eq(d.verdict, LIMITER_PASS);
        }
        cr_assert_eq(lstats().nodes, 0);
}

/* An independent model of nginx's algorithm, for random sequences: per-key state and LRU order. */
struct model_key {
        int64_t excess, last;
        uint64_t used; /* order of last use: the smallest live one is the LRU tail */
        bool live;
};

/* Before a new key is inserted: up to two keys at the tail, idle a minute (either way) and drained, go. */
static void model_expire(struct model_key *keys, size_t n, int64_t now, int64_t rate) {
        for (int i = 0; i < 2; i++) {
                struct model_key *tail = NULL;
                int64_t age;

                for (size_t k = 0; k < n; k++)
                        if (keys[k].live && (!tail || keys[k].used < tail->used))
                                tail = &keys[k];
                if (!tail)
                        return;
                age = now >= tail->last ? now - tail->last : tail->last - now;
                if (age < 60000 || tail->excess - rate * age / 1000 > 0)
                        return;
                tail->live = false;
        }
}

static int model_decide(struct model_key *k, int64_t now, int64_t rate, int64_t burst, int64_t delay,
                        uint64_t *ret_delay) {
        int64_t ms, e;

        *ret_delay = 0;
        if (!k->live) {
                *k = (struct model_key){ .excess = 0, .last = now, .live = true };
                return P;
        }
        ms = now - k->last;
        if (ms < -60000)
                ms = 1;
        else if (ms < 0)
                ms = 0;
        e = k->excess - rate * ms / 1000 + 1000;
        if (e < 0)
                e = 0;
        if (e > burst * 1000)
                return R;
        k->excess = e;
        if (ms)
                k->last = now;
        if (delay < 0 || e <= delay * 1000)
                return P;
        *ret_delay = (uint64_t) ((e - delay * 1000) * 1000 / rate);
        return D;
}

/* Random keys, times mostly forward with steps back, against the model: the same verdicts. */
Test(limiter, random_sequences_match_model) {
        static const struct {
                const char *rate;
                uint32_t burst, delay;
        } cfgs[] = { { "1r/s", 0, 0 }, { "5r/s", 10, LIMITER_NODELAY }, { "7r/m", 3, 1 }, { "1000r/s", 120, 20 } };
        /* 40 keys come back often; the rest of them (new, or back after expiry) make the inserts that expire. */
        enum { KEYS = 2040, HOT = 40, STEPS = 4000 };
        uint64_t expired = 0;

        srandom(7);
        for (size_t c = 0; c < sizeof(cfgs) / sizeof(cfgs[0]); c++) {
                struct limiter_config cfg = { .burst = cfgs[c].burst, .delay = cfgs[c].delay };
                struct model_key model[KEYS] = {};
                int64_t now = 100000000; /* steps back never take it below 0 */
                uint64_t seq = 0;

                cr_assert_eq(limiter_parse_rate(cfgs[c].rate, &cfg.rate), 0);
                teardown();
                open_limiter(1 << 20, cfg.rate, cfg.burst, cfg.delay);
                for (int i = 0; i < STEPS; i++) {
                        long dice = random() % 100;
                        unsigned k = dice % 5 ? (unsigned) random() % HOT : HOT + (unsigned) random() % (KEYS - HOT);
                        struct limiter_decision d;
                        uint64_t mdelay;
                        char key[16];
                        int mv;

                        if (dice < 3)
                                now -= random() % 2000; /* small step back */
                        else if (dice < 4)
                                now -= 61000 + random() % 5000; /* a reset */
                        else
                                now += random() % (dice < 90 ? 50 : 3000);
                        snprintf(key, sizeof(key), "k%u", k);
                        if (!model[k].live)
                                model_expire(model, KEYS, now, cfg.rate);
                        mv = model_decide(&model[k], now, cfg.rate, cfg.burst,
                                          cfg.delay == LIMITER_NODELAY ? -1 : (int64_t) cfg.delay, &mdelay);
                        model[k].used = ++seq;
                        cr_assert_eq(limiter_decide(lim, key, strlen(key), (uint64_t) now, &d), 0);
                        cr_assert_eq((int) d.verdict, mv, "config %zu step %d key %s: %d, model %d", c, i, key,
                                     d.verdict, mv);
                        cr_assert_eq(d.delay_ms, mdelay, "config %zu step %d", c, i);
                }
                cr_assert_eq(limiter_check(lim, false), 0);
                expired += lstats().expired;
        }
        cr_assert_gt(expired, 0, "expiry was part of it");
}

/*
 * Two limits on one request, nginx's two phases against a model of nginx's handler: the
 * first limit is checked without account (a new key: nginx's node with last 0), the
 * second with account; only if both pass is the first accounted (last = now, no burst
 * check), and the delay is the larger one.
 */
struct model2 {
        int64_t excess, last;
        bool live, fresh;
};

static int64_t model2_excess(const struct model2 *k, int64_t now, int64_t rate, int64_t *ret_ms) {
        int64_t ms = now - k->last, e;

        if (k->fresh) {
                *ret_ms = 1;
                return 0;
        }
        if (ms < -60000)
                ms = 1;
        else if (ms < 0)
                ms = 0;
        *ret_ms = ms;
        e = k->excess - rate * ms / 1000 + 1000;
        return e < 0 ? 0 : e;
}

Test(limiter, two_limits_match_nginx_model) {
        struct limiter_config c1 = { .burst = 3, .delay = 1 }, c2 = { .burst = 2, .delay = LIMITER_NODELAY };
        struct shmz_zone *z2 = NULL;
        struct limiter *l2 = NULL;
        struct model2 m1[8] = {}, m2[3] = {};
        int64_t now = 1000000;
        unsigned rejects = 0, delays = 0, passes = 0;

        cr_assert_eq(limiter_parse_rate("2r/s", &c1.rate), 0);
        cr_assert_eq(limiter_parse_rate("1r/s", &c2.rate), 0);
        open_limiter(1 << 20, c1.rate, c1.burst, c1.delay);
        cr_assert_eq(zone_new_anonymous("limiter-test-2", 1 << 20, &z2), 0);
        cr_assert_eq(limiter_open(z2, &c2, &l2), 0);
        srandom(11);
        for (int i = 0; i < 3000; i++) {
                unsigned k1 = (unsigned) random() % 8, k2 = (unsigned) random() % 3;
                char key1[8], key2[8];
                struct limiter_decision d1, d2, a1;
                int64_t ms, e1, e2, want_delay = 0;
                int want;

                now += random() % 4 ? random() % 200 : random() % 3000;
                snprintf(key1, sizeof(key1), "a%u", k1);
                snprintf(key2, sizeof(key2), "b%u", k2);

                /* The model: lookup 1 without account. */
                if (!m1[k1].live)
                        m1[k1] = (struct model2){ .live = true, .fresh = true };
                e1 = model2_excess(&m1[k1], now, c1.rate, &ms);
                if (e1 > (int64_t) c1.burst * 1000)
                        want = R;
                else {
                        /* lookup 2 with account */
                        if (!m2[k2].live) {
                                m2[k2] = (struct model2){ .live = true, .last = now };
                                e2 = 0;
                                want = P;
                        } else {
                                e2 = model2_excess(&m2[k2], now, c2.rate, &ms);
                                if (e2 > (int64_t) c2.burst * 1000)
                                        want = R;
                                else {
                                        m2[k2].excess = e2;
                                        if (ms)
                                                m2[k2].last = now;
                                        want = P;
                                }
                        }
                        if (want == P) {
                                /* account 1 */
                                e1 = model2_excess(&m1[k1], now, c1.rate, &ms);
                                m1[k1] = (struct model2){ .live = true, .excess = e1, .last = now };
                                if (e1 > (int64_t) c1.delay * 1000)
                                        want_delay = (e1 - (int64_t) c1.delay * 1000) * 1000 / c1.rate;
                        }
                }

                cr_assert_eq(limiter_lookup(lim, &c1, key1, strlen(key1), (uint64_t) now, false, &d1), 0);
                if (d1.verdict == LIMITER_REJECT) {
                        cr_assert_eq(want, R, "step %d: first limit rejected, model %d", i, want);
                        rejects++;
                        continue;
                }
                cr_assert_eq(d1.verdict, LIMITER_PASS, "step %d: a lookup without account never delays", i);
                cr_assert_eq(limiter_lookup(l2, &c2, key2, strlen(key2), (uint64_t) now, true, &d2), 0);
                cr_assert_neq(d2.verdict, LIMITER_DELAY, "step %d: nodelay", i);
                if (d2.verdict == LIMITER_REJECT) {
                        cr_assert_eq(want, R, "step %d: second limit rejected, model %d", i, want);
                        rejects++;
                        continue;
                }
                cr_assert_eq(want, P, "step %d: passed both, model rejected", i);
                cr_assert_eq(limiter_account(lim, &c1, key1, strlen(key1), (uint64_t) now, &a1), 0);
                cr_assert_neq(a1.verdict, LIMITER_REJECT, "step %d", i);
                cr_assert_eq((int64_t) a1.delay_ms, want_delay, "step %d: delay %lu, model %ld", i,
                             (unsigned long) a1.delay_ms, (long) want_delay);
                a1.delay_ms ? delays++ : passes++;
        }
        cr_assert(rejects > 100 && delays > 30 && passes > 100, "all three happened: %u %u %u", rejects, delays,
                  passes);
        cr_assert_eq(limiter_check(lim, false), 0);
        cr_assert_eq(limiter_check(l2, false), 0);
        limiter_close(l2);
        shmz_zone_close(z2);
}

/* ---- expiry, eviction, the tree under churn -------------------------------------------------- */

Test(limiter, stale_keys_expire) {
        struct limiter_decision d;

        open_limiter(1 << 20, 16 /* 1r/m */, 5, 0);
        cr_assert_eq(limiter_decide(lim, "a", 1, 0, &d), 0);
        cr_assert_eq(limiter_decide(lim, "a", 1, 0, &d), 0); /* excess 1000: 62.5 s to drain */
        cr_assert_eq(limiter_decide(lim, "b", 1, 1, &d), 0);
        cr_assert_eq(limiter_decide(lim, "c", 1, 60000, &d), 0);
        cr_assert_eq(lstats().nodes, 3, "a idle a minute but not drained: kept");
        cr_assert_eq(lstats().expired, 0);
        cr_assert_eq(limiter_decide(lim, "d", 1, 62500, &d), 0);
        /* a drained now: expired; b (idle 62.5 s, excess 0) too; c is recent. */
        cr_assert_eq(lstats().expired, 2);
        cr_assert_eq(lstats().nodes, 2);
        cr_assert_eq(limiter_check(lim, false), 0);
}

/* Inserts and expiries in random order keep the tree sound and the allocator exact. */
Test(limiter, tree_churn_stays_sound) {
        struct limiter_decision d;
        uint64_t now = 0;

        open_limiter(4 << 20, 1000, 10, 0);
        srandom(11);
        for (int i = 0; i < 30000; i++) {
                uint32_t key = (uint32_t) random() % 20000;

                now += (uint64_t) (random() % 8);
                cr_assert_eq(limiter_decide(lim, &key, sizeof(key), now, &d), 0);
                if (i % 5000 == 0)
                        cr_assert_eq(limiter_check(lim, false), 0, "step %d", i);
        }
        struct limiter_stats st = lstats();
        cr_assert_gt(st.expired, 1000, "keys came and went (%lu expired)", (unsigned long) st.expired);
        cr_assert_eq(st.evicted, 0);
        cr_assert_eq(limiter_check(lim, false), 0);
        cr_assert_eq(used_blocks(), st.nodes + 1, "one block per key and the header");
}

static uint64_t keys_per_mib(size_t keylen) {
        struct limiter_decision d;
        uint8_t key[LIMITER_KEY_MAX] = {};
        uint64_t n;

        open_limiter(1 << 20, 1000, 10, 0);
        for (n = 0;; n++) {
                memcpy(key, &n, sizeof(n));
                cr_assert_eq(limiter_decide(lim, key, keylen, 0, &d), 0);
                if (lstats().evicted > 0)
                        break;
        }
        teardown();
        return n;
}

/* How many keys 1 MiB holds (nginx documents about 8 000 to 16 000 for its own states). */
Test(limiter, memory_per_key) {
        static const size_t lens[] = { 4, 16, LIMITER_KEY_MAX };
        static const char *const what[] = { "IPv4", "IPv6", "64-byte header" };

        for (int i = 0; i < 3; i++) {
                uint64_t n = keys_per_mib(lens[i]);

                printf("limiter: %s key: node %zu bytes, %lu keys per MiB\n", what[i], limiter_node_bytes(lens[i]),
                       (unsigned long) n);
                cr_log_info("%s key: node %zu bytes, %lu keys per MiB", what[i], limiter_node_bytes(lens[i]),
                            (unsigned long) n);
                if (lens[i] == 4)
                        cr_assert_gt(n, 16000, "an IPv4 key costs less than nginx's 64-bit state");
        }
}

/* A million distinct keys through a small zone: the oldest go, decisions never fail. */
Test(limiter, million_keys_evict) {
        struct limiter_decision d;
        uint32_t key;

        open_limiter(2 << 20, 1000, 0, 0);
        for (key = 0; key < 1000000; key++) {
                int r = limiter_decide(lim, &key, sizeof(key), 1000, &d);
                if (r != 0 || d.verdict != LIMITER_PASS)
                        cr_assert_fail("key %u: %d, verdict %d", key, r, d.verdict);
        }
        struct limiter_stats st = lstats();
        cr_log_info("1M keys: %lu held, %lu evicted", (unsigned long) st.nodes, (unsigned long) st.evicted);
        cr_assert_eq(st.nodes + st.evicted, 1000000);
        cr_assert_gt(st.nodes, 30000);
        cr_assert_eq(st.nomem, 0);
        /* The newest keys keep their state, the oldest lost it. */
        key = 999999;
        cr_assert_eq(limiter_decide(lim, &key, sizeof(key), 1000, &d), 0);
        cr_assert_eq(d.verdict, LIMITER_REJECT);
        key = 0;
        cr_assert_eq(limiter_decide(lim, &key, sizeof(key), 1000, &d), 0);
        cr_assert_eq(d.verdict, LIMITER_PASS, "evicted: a fresh key again");
        cr_assert_eq(limiter_check(lim, false), 0);
        cr_assert_eq(used_blocks(), st.nodes + 1);
}

Test(limiter, long_keys_are_folded) {
        char a[200], b[200];
        struct limiter_decision d;

        open_limiter(1 << 20, 1000, 0, 0);
        memset(a, 'x', sizeof(a));
        memcpy(b, a, sizeof(b));
        b[150] = 'y'; /* past the stored prefix: told apart by the hash */
        cr_assert_eq(limiter_decide(lim, a, sizeof(a), 0, &d), 0);
        cr_assert_eq(limiter_decide(lim, b, sizeof(b), 0, &d), 0);
        cr_assert_eq(d.verdict, LIMITER_PASS);
        cr_assert_eq(limiter_decide(lim, a, sizeof(a), 0, &d), 0);
        cr_assert_eq(d.verdict, LIMITER_REJECT);
        cr_assert_eq(lstats().nodes, 2);
}

/* ---- several processes ----------------------------------------------------------------------- */

struct hammer {
        _Atomic uint64_t accepted;
        _Atomic uint64_t first, last; /* ms of the first decision and of the last accepted one */
        _Atomic int go;
};

/*
 * Four processes hammer one key for 2 s on the real clock: together they get
 * what one bucket allows, burst + rate x time, plus the key's free first request.
 */
Test(limiter, four_processes_one_key) {
        enum { NPROC = 4, RATE = 200, BURST = 20, RUN_MS = 2000 };
        struct hammer *h;
        pid_t pids[NPROC];

        open_limiter(1 << 20, RATE * 1000, BURST, LIMITER_NODELAY);
        h = shmz_alloc(zone, sizeof(*h));
        cr_assert_not_null(h);
        memset(h, 0, sizeof(*h));
        atomic_store(&h->first, UINT64_MAX);
        for (int i = 0; i < NPROC; i++) {
                pids[i] = fork();
                cr_assert_geq(pids[i], 0);
                if (pids[i] == 0) {
                        uint64_t end, now, first = UINT64_MAX, last = 0, acc = 0;

                        while (!atomic_load(&h->go))
                                ;
                        end = mono_ms() + RUN_MS;
                        while ((now = mono_ms()) < end) {
                                struct limiter_decision d;

                                if (limiter_decide(lim, "client", 6, now, &d) != 0)
                                        _exit(1);
                                if (first == UINT64_MAX)
                                        first = now;
                                if (d.verdict == LIMITER_PASS) {
                                        acc++;
                                        last = now;
                                }
                        }
                        atomic_fetch_add(&h->accepted, acc);
                        for (uint64_t f = atomic_load(&h->first); first < f;)
                                if (atomic_compare_exchange_weak(&h->first, &f, first))
                                        break;
                        for (uint64_t l = atomic_load(&h->last); last > l;)
                                if (atomic_compare_exchange_weak(&h->last, &l, last))
                                        break;
                        _exit(0);
                }
        }
        atomic_store(&h->go, 1);
        for (int i = 0; i < NPROC; i++) {
                int status;
                cr_assert_eq(waitpid(pids[i], &status, 0), pids[i]);
                cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
        }
        double t = (double) (atomic_load(&h->last) - atomic_load(&h->first)) / 1000.0;
        double want = BURST + RATE * t;
        uint64_t got = atomic_load(&h->accepted);
        struct limiter_stats st = lstats();
        printf("limiter: 4 processes, %lu decisions in %.3f s: %lu accepted, burst + rate x time = %.1f\n",
               (unsigned long) st.decisions, t, (unsigned long) got, want);
        cr_assert_geq((double) got, want - 1.0, "%lu accepted, want %.1f", (unsigned long) got, want);
        cr_assert_leq((double) got, want + 1.0 + 1.0 /* the first request of a key is free */,
                      "%lu accepted, want %.1f", (unsigned long) got, want);
        cr_assert_gt(st.decisions, got * 4, "they really hammered");
}

/* ---- deaths ---------------------------------------------------------------------------------- */

/*
 * The contract the limiter relies on: an allocation that meets a dead lock
 * holder repairs the allocator but leaves the death to be seen by the next
 * shmz_mutex_lock(), until somebody calls shmz_mutex_consistent().
 */
Test(limiter, allocator_does_not_swallow_owner_death) {
        struct shmz_mutex *m;
        pid_t pid;
        int status;
        void *p;

        cr_assert_eq(zone_new_anonymous("limiter-contract", 1 << 20, &zone), 0);
        m = shmz_zone_mutex(zone);
        p = shmz_alloc(zone, 64); /* formats the allocator */
        cr_assert_not_null(p);
        pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
                if (shmz_mutex_lock(m) != 0)
                        _exit(1);
                _exit(0); /* dies holding it */
        }
        cr_assert_eq(waitpid(pid, &status, 0), pid);
        cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);

        for (int i = 0; i < 3; i++) {
                void *q = shmz_alloc(zone, 100);
                cr_assert_not_null(q, "the allocator works on");
                shmz_free(zone, q);
        }
        cr_assert_eq(shmz_zone_check(zone), 0);
        cr_assert_eq(shmz_mutex_lock(m), SHMZ_OWNER_DEAD, "the death is still reported");
        cr_assert_eq(shmz_mutex_consistent(m), 0);
        cr_assert_eq(shmz_mutex_unlock(m), 0);
        cr_assert_eq(shmz_mutex_lock(m), 0, "acknowledged once, gone");
        cr_assert_eq(shmz_mutex_unlock(m), 0);
        shmz_free(zone, p);
}

/* A script of decisions that inserts, moves, expires and evicts. */
static int crash_script(struct limiter *l) {
        struct limiter_decision d;
        uint64_t t = 1000;

        for (uint32_t round = 0; round < 3; round++) {
                for (uint32_t k = 0; k < 6; k++) {
                        uint32_t key = round * 4 + k; /* overlapping: some keys are seen again */
                        if (limiter_decide(l, &key, sizeof(key), t, &d) != 0)
                                return 1;
                        t += 10;
                }
                t += 70000; /* the next round expires the idle ones */
        }
        return 0;
}

/*
 * A child runs the script and SIGKILLs itself at its k-th crash point inside a
 * mutation of the tree or list, for every k. The next decision sees
 * SHMZ_OWNER_DEAD, rebuilds, and everything is sound and exact again.
 */
Test(limiter, killed_at_every_step_of_an_update) {
        unsigned k, completed = 0;

        open_limiter(1 << 20, 1000, 5, 0);
        for (k = 1; k < 2000; k++) {
                struct limiter_stats before = lstats(), after;
                struct limiter_decision d;
                uint32_t probe = 0xdead;
                int status;
                pid_t pid = fork();

                cr_assert_geq(pid, 0);
                if (pid == 0) {
                        limiter_test_crash_countdown = k;
                        _exit(crash_script(lim));
                }
                cr_assert_eq(waitpid(pid, &status, 0), pid);
                if (WIFEXITED(status)) {
                        cr_assert_eq(WEXITSTATUS(status), 0);
                        completed = k;
                        break; /* the script ran out of crash points */
                }
                cr_assert(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
                cr_assert_eq(limiter_decide(lim, &probe, sizeof(probe), 500000, &d), 0, "step %u", k);
                after = lstats();
                cr_assert_eq(after.recoveries, before.recoveries + 1, "step %u: the death was seen", k);
                cr_assert_eq(limiter_check(lim, false), 0, "step %u", k);
                cr_assert_eq(used_blocks(), after.nodes + 1, "step %u: a node leaked or vanished", k);
        }
        cr_assert_gt(completed, 50, "the script passes many crash points");
        cr_log_info("killed at each of %u steps; %lu rebuilds", completed - 1, (unsigned long) lstats().rebuilds);
}

struct churn {
        _Atomic uint64_t progress[2];
        _Atomic int stop;
};

/* Worker 1 pauses between decisions, so that worker 0 (the victim) holds the lock most of the time. */
static void churn_worker(struct churn *c, int slot, unsigned seed) {
        uint64_t t = mono_ms();

        srandom(seed);
        while (!atomic_load(&c->stop)) {
                struct limiter_decision d;
                uint32_t key = (uint32_t) random() % 50000; /* more than the zone holds: evictions too */

                if (limiter_decide(lim, &key, sizeof(key), t + (uint64_t) (random() % 100), &d) != 0)
                        _exit(1);
                atomic_fetch_add(&c->progress[slot], 1);
                if (slot == 1)
                        for (volatile int spin = 0; spin < 20000; spin++)
                                ;
        }
        _exit(0);
}

static void wait_progress(struct churn *c, int slot, uint64_t from, int round) {
        uint64_t deadline = mono_ms() + 10000;

        while (atomic_load(&c->progress[slot]) < from + 50) {
                if (mono_ms() > deadline)
                        cr_assert_fail("round %d: worker %d wedged", round, slot);
                sched_yield();
        }
}

/*
 * Two workers churn one small zone; one of them dies in the middle of an update
 * 100 times and is started again: at a random step of a tree or list mutation
 * (the limiter's crash hook), at a random step inside the allocator (its hook),
 * or SIGKILLed from outside at a random moment. The other never wedges, every
 * death under the lock is seen (SHMZ_OWNER_DEAD) and repaired, and the
 * structures and the allocator stay sound and exact.
 */
Test(limiter, worker_killed_100_times_never_wedges_others) {
        struct churn *c;
        pid_t victim, other;
        unsigned hooked = 0;
        int status;

        open_limiter(256 << 10, 1000, 3, 0);
        c = shmz_alloc(zone, sizeof(*c));
        cr_assert_not_null(c);
        memset(c, 0, sizeof(*c));
        other = fork();
        cr_assert_geq(other, 0);
        if (other == 0)
                churn_worker(c, 1, 1);
        srandom(99);
        for (int round = 0; round < 100; round++) {
                uint64_t base = atomic_load(&c->progress[0]);
                int how = round % 3;
                unsigned step = 1 + (unsigned) (random() % 400);

                hooked += how != 2;
                victim = fork();
                cr_assert_geq(victim, 0);
                if (victim == 0) {
                        if (how == 0)
                                limiter_test_crash_countdown = step;
                        else if (how == 1)
                                slab_test_crash_countdown = step;
                        churn_worker(c, 0, (unsigned) round + 1000);
                }
                if (how == 2) {
                        wait_progress(c, 0, base, round);       /* it is in its loop */
                        usleep((useconds_t) (random() % 2000)); /* a random moment, not a synchronisation */
                        kill(victim, SIGKILL);
                }
                cr_assert_eq(waitpid(victim, &status, 0), victim);
                cr_assert(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL, "round %d: worker exited with %d", round,
                          WEXITSTATUS(status));
                wait_progress(c, 1, atomic_load(&c->progress[1]), round);
        }
        atomic_store(&c->stop, 1);
        cr_assert_eq(waitpid(other, &status, 0), other);
        cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "the survivor never failed a decision");

        struct limiter_stats st = lstats();
        cr_log_info("100 kills: %lu recoveries, %lu rebuilds, %lu evicted", (unsigned long) st.recoveries,
                    (unsigned long) st.rebuilds, (unsigned long) st.evicted);
        printf("limiter: 100 kills: %lu deaths under the lock seen, %lu rebuilds\n", (unsigned long) st.recoveries,
               (unsigned long) st.rebuilds);
        cr_assert_geq(st.recoveries, hooked, "every death in an update was seen");
        cr_assert_gt(st.evicted, 0);
        cr_assert_eq(limiter_check(lim, false), 0);
        cr_assert_eq(shmz_zone_check(zone), 0);
        /*
         * Only a SIGKILL between an allocation's return and the intent record
         * (a few instructions) could leak a node.
         */
        uint64_t used = used_blocks();
        cr_assert_geq(used, st.nodes + 2 /* header, churn record */);
        cr_assert_leq(used, st.nodes + 2 + 100 - hooked, "%lu blocks for %lu keys", (unsigned long) used,
                      (unsigned long) st.nodes);
}

static uint32_t fnv(const void *p, size_t n) {
        const uint8_t *k = p;
        uint32_t h = 2166136261u;

        for (size_t i = 0; i < n; i++)
                h = (h ^ k[i]) * 16777619u;
        return h;
}

/*
 * A co-writer's scribbles on the links of nodes (left, right, parent, prev,
 * next: words 0, 1, 4, 5 and 6 of a node, whose hash is word 2, its key
 * length byte 13 and its key at byte 40) are found, counted and repaired;
 * nothing crashes or hangs.
 */
Test(limiter, scribbled_links_are_repaired) {
        enum { KEYS = 500 };
        struct limiter_decision d;
        uint32_t *node[KEYS] = {};
        uint8_t *base;
        uint64_t size;

        open_limiter(1 << 20, 1000, 5, 0);
        for (uint32_t k = 0; k < KEYS; k++)
                cr_assert_eq(limiter_decide(lim, &k, sizeof(k), 0, &d), 0);
        base = shmz_zone_base(zone);
        size = shmz_zone_size(zone);
        for (uint64_t off = 0; off + 48 <= size; off += 8) {
                uint32_t k;

                memcpy(&k, base + off + 40, 4);
                if (base[off + 13] == 4 && k < KEYS && fnv(&k, 4) == *(uint32_t *) (base + off + 8))
                        node[k] = (uint32_t *) (base + off);
        }
        for (uint32_t k = 0; k < KEYS; k++)
                cr_assert_not_null(node[k], "node of key %u found", k);

        srandom(5);
        for (int round = 0; round < 300; round++) {
                uint32_t key = (uint32_t) random() % KEYS;

                static const unsigned links[] = { 0, 1, 4, 5, 6 };
                node[random() % KEYS][links[random() % 5]] = (uint32_t) random() % (uint32_t) (size / 8 + 4096);
                cr_assert_eq(limiter_decide(lim, &key, sizeof(key), (uint64_t) round, &d), 0, "round %d", round);
                cr_assert_geq(limiter_check(lim, true), 0, "round %d", round);
        }
        cr_assert_eq(limiter_check(lim, false), 0);
        cr_assert_gt(lstats().corruptions + lstats().rebuilds, 0);
        printf("limiter: 300 scribbles: %lu corruptions found, %lu rebuilds, %lu keys left\n",
               (unsigned long) lstats().corruptions, (unsigned long) lstats().rebuilds, (unsigned long) lstats().nodes);
}

/*
 * Anything a co-writer may write: random words anywhere in the nodes (links,
 * hash, excess, colour, key length, time, key) and in the limiter's header
 * (root, list ends, busy, intent, counts). Decisions never crash, hang or
 * fail, and a repair always brings the structures back to sound.
 */
Test(limiter, scribbles_anywhere_in_nodes_and_header) {
        enum { KEYS = 2000 };
        struct limiter_decision d;
        uint8_t *base, *hdr;
        uint64_t size, lo = UINT64_MAX, hi = 0;

        open_limiter(1 << 20, 1000, 5, 0);
        for (uint32_t k = 0; k < KEYS; k++)
                cr_assert_eq(limiter_decide(lim, &k, sizeof(k), 0, &d), 0);
        base = shmz_zone_base(zone);
        size = shmz_zone_size(zone);
        hdr = shmz_zone_root(zone);
        cr_assert_not_null(hdr);
        /* Where the nodes live: the span of 48-byte slots holding our keys. */
        for (uint64_t off = 0; off + 48 <= size; off += 8) {
                uint32_t k;

                memcpy(&k, base + off + 40, 4);
                if (base[off + 13] == 4 && k < KEYS && fnv(&k, 4) == *(uint32_t *) (base + off + 8)) {
                        lo = off < lo ? off : lo;
                        hi = off + 48 > hi ? off + 48 : hi;
                }
        }
        cr_assert_lt(lo, hi);

        srandom(17);
        for (int round = 0; round < 2000; round++) {
                uint32_t key = (uint32_t) random() % (KEYS + 500), v = (uint32_t) random();
                uint64_t at;

                if (random() % 4 == 0)
                        at = (uint64_t) (hdr - base) + 4 * (uint64_t) (random() % 14); /* header words */
                else
                        at = lo + 4 * (uint64_t) (random() % ((hi - lo) / 4));
                if (random() % 2)
                        v %= (uint32_t) (size / 8 + 4096); /* plausible references */
                memcpy(base + at, &v, 4);
                cr_assert_eq(limiter_decide(lim, &key, sizeof(key), (uint64_t) round * 10, &d), 0, "round %d", round);
                if (round % 10 == 0)
                        cr_assert_geq(limiter_check(lim, true), 0, "round %d", round);
        }
        cr_assert_geq(limiter_check(lim, true), 0);
        cr_assert_eq(limiter_check(lim, false), 0);
        printf("limiter: 2000 scribbles anywhere: %lu corruptions found, %lu rebuilds, %lu keys left\n",
               (unsigned long) lstats().corruptions, (unsigned long) lstats().rebuilds, (unsigned long) lstats().nodes);
}

/*
 * A process that dies while rebuilding after another's death leaves the list
 * walkable: the next one rebuilds again and no key is lost or leaked.
 */
Test(limiter, death_during_rebuild_loses_nothing) {
        struct limiter_decision d;
        unsigned died_rebuilding = 0;

        open_limiter(1 << 20, 1000, 5, 0);
        for (uint32_t k = 0; k < 200; k++)
                cr_assert_eq(limiter_decide(lim, &k, sizeof(k), 0, &d), 0);
        for (unsigned round = 0; round < 30; round++) {
                uint32_t key = 1000 + round, probe = 7;
                int status;
                pid_t pid;

                /* Dies at its first step inside an insert: the next locker must rebuild. */
                pid = fork();
                cr_assert_geq(pid, 0);
                if (pid == 0) {
                        limiter_test_crash_countdown = 1;
                        (void) limiter_decide(lim, &key, sizeof(key), 0, &d);
                        _exit(1);
                }
                cr_assert_eq(waitpid(pid, &status, 0), pid);
                cr_assert(WIFSIGNALED(status), "round %u", round);
                /* Dies somewhere in that rebuild (or, past its last step, finishes). */
                pid = fork();
                cr_assert_geq(pid, 0);
                if (pid == 0) {
                        limiter_test_crash_countdown = 1 + round * 13;
                        (void) limiter_decide(lim, &probe, sizeof(probe), 0, &d);
                        _exit(0);
                }
                cr_assert_eq(waitpid(pid, &status, 0), pid);
                died_rebuilding += WIFSIGNALED(status);
                cr_assert_eq(limiter_decide(lim, &probe, sizeof(probe), 0, &d), 0);
                cr_assert_eq(limiter_check(lim, false), 0, "round %u", round);
                struct limiter_stats st = lstats();
                cr_assert_eq(st.nodes, 200, "round %u: %lu keys", round, (unsigned long) st.nodes);
                cr_assert_eq(used_blocks(), st.nodes + 1, "round %u", round);
        }
        cr_assert_geq(died_rebuilding, 10, "%u deaths inside a rebuild", died_rebuilding);
}
