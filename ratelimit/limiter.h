/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/*
 * nginx's limit_req on a shmzone zone: a leaky bucket per key, shared by every
 * process that opens the zone. The example server and the nginx module use it;
 * not part of libshmzone.
 *
 * Semantics (nginx's, as documented): the rate is kept in milli-requests per
 * second (1r/s = 1000, 30r/m = 500, 1r/m = 16: the division truncates as nginx's
 * does), each key has an `excess` in milli-requests and the time `last` it was
 * last accounted. A request at `now` (ms):
 *
 *   ms = now - last; if ms < -60000, ms = 1 (the clock was reset: start over);
 *   else if ms < 0, ms = 0 (small steps back: no drain, `last` kept);
 *   excess = max(0, excess - rate * ms / 1000 + 1000);
 *   excess > burst * 1000: REJECT, the state is left as it was;
 *   else excess is stored, and `last` = now if ms != 0;
 *   with nodelay it passes now; else it waits (excess - delay * 1000) * 1000 / rate
 *   ms if excess > delay * 1000 (delay = 0 unless delay= is given).
 *
 * A key seen for the first time gets excess 0 and passes at once. An empty key
 * is not accounted (passes), as in nginx. Keys longer than LIMITER_KEY_MAX are
 * folded to their first 56 bytes and a 64-bit hash of the whole.
 *
 * Several limits on one request (nginx: several limit_req in a location) go in
 * nginx's two phases: limiter_lookup() without account for each but the last
 * (the verdict the request would get, nothing stored), with account for the
 * last, then limiter_account() on the earlier ones if none rejected (stored
 * with the time of that call, `last` = now whatever the step; no burst check).
 *
 * State lives in a red-black tree keyed by the key, plus an LRU list, in the
 * zone, under the zone lock, as offsets. A decision that inserts a new key
 * first expires up to two keys at the tail idle for a minute whose excess has
 * drained (nginx expires only then, too: a key kept past its minute drains to
 * at most 1000 on its next request, a fresh one starts at 0); when the zone is
 * full, the least recently used key is evicted. Nothing holds a reference to a
 * key outside a decision, so nothing can block eviction (unlike nginx's `count`).
 *
 * After a process died holding the zone lock (SHMZ_OWNER_DEAD) the next
 * decision validates the tree and list, rebuilds the tree from the list if a
 * mutation was under way or anything is inconsistent, and only then calls
 * shmz_mutex_consistent(). Every value read from the zone is checked before
 * use and every walk is bounded: a co-writer can make the limiter forget or
 * rebuild, not crash or hang it.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <shmzone.h>

#define LIMITER_TAG "ratelimit-v1" /* the zone's tag, or its prefix (limiter_tag): what its bytes mean */
#define LIMITER_KEY_MAX 64u
#define LIMITER_NODELAY UINT32_MAX
#define LIMITER_BURST_MAX 1000000u
#define LIMITER_IDLE_MS 60000u /* keys idle this long, drained, may be expired */

struct limiter_config {
        uint32_t rate;  /* milli-requests per second (limiter_parse_rate) */
        uint32_t burst; /* requests */
        uint32_t delay; /* requests passed without delay (nginx delay=), LIMITER_NODELAY: nodelay */
};

enum limiter_verdict {
        LIMITER_PASS,
        LIMITER_DELAY,  /* pass after delay_ms */
        LIMITER_REJECT, /* 503 */
};

struct limiter_decision {
        enum limiter_verdict verdict;
        uint64_t delay_ms;
        uint32_t excess; /* milli-requests after this request (before it, on REJECT) */
};

struct limiter_stats {
        uint64_t nodes;       /* keys held */
        uint64_t decisions;   /* accounted requests */
        uint64_t passed;      /* at once */
        uint64_t delayed;     /* passed after a delay */
        uint64_t rejected;    /* over the burst */
        uint64_t expired;     /* idle, drained keys removed */
        uint64_t evicted;     /* keys removed because the zone was full */
        uint64_t recoveries;  /* SHMZ_OWNER_DEAD handled */
        uint64_t rebuilds;    /* tree rebuilt from the LRU list */
        uint64_t corruptions; /* inconsistencies found outside a death */
        uint64_t nomem;       /* decisions that found no memory even after evicting */
};

struct limiter;

/* "1r/s", "30r/m" (nginx's syntax) -> milli-requests per second. 0 or -EINVAL/-ERANGE. */
int limiter_parse_rate(const char *s, uint32_t *ret_rate);

/*
 * Attaches to the limiter in z (opened writable, with tag LIMITER_TAG), creating
 * it if the zone has none yet. Every process may use its own config; the zone holds only
 * per-key state. -EBADMSG if the zone's root is something else.
 */
int limiter_open(struct shmz_zone *z, const struct limiter_config *cfg, struct limiter **ret);
void limiter_close(struct limiter *l); /* NULL is fine; does not close z */

/* One request for key at now_ms (any monotonic millisecond clock every user shares). */
int limiter_decide(struct limiter *l, const void *key, size_t keylen, uint64_t now_ms, struct limiter_decision *ret);

/*
 * The same with the limits given here (NULL: those of limiter_open; the rate drains,
 * burst and delay decide). account false: nginx's check of a limit that is not a
 * request's last: PASS or REJECT (never DELAY), nothing stored but the key's place
 * in the LRU list; a new key is inserted as nginx does, to be accounted as drained.
 */
int limiter_lookup(struct limiter *l, const struct limiter_config *cfg, const void *key, size_t keylen, uint64_t now_ms,
                   bool account, struct limiter_decision *ret);

/*
 * nginx's second phase for a limit limiter_lookup(account false) passed: stores the
 * request at now_ms; PASS or DELAY (delay_ms), never REJECT. A key gone meanwhile
 * (evicted) is inserted afresh.
 */
int limiter_account(struct limiter *l, const struct limiter_config *cfg, const void *key, size_t keylen,
                    uint64_t now_ms, struct limiter_decision *ret);

/*
 * The zone lock is waited for at most ns (0, the default: for ever); past it a
 * decision fails with -ETIMEDOUT. A lock word a co-writer scribbled can name a
 * live thread that never releases it.
 */
void limiter_set_lock_timeout(struct limiter *l, uint64_t ns);

/*
 * The tag of a zone of keys made by key_expr (nginx's key, "$binary_remote_addr"):
 * "ratelimit-v1:" and the expression, or a hash of it if that would not fit in a tag.
 * Two users of one zone agree on what its keys are, or cannot open it.
 */
void limiter_tag(const char *key_expr, char ret[SHMZ_TAG_BUF]);

int limiter_stats(struct limiter *l, struct limiter_stats *ret);

/* Bytes of one key's node for a key of keylen bytes (before the allocator rounds it to its class). */
size_t limiter_node_bytes(size_t keylen);

/*
 * Validates the tree and the list (takes the lock): 0, or -EUCLEAN with
 * repair false; with repair, rebuilds and returns 1 if it had to.
 */
int limiter_check(struct limiter *l, bool repair);

/* Tests: SIGKILL ourselves at the n-th step of a mutation of the tree or list (0 = never). */
extern unsigned limiter_test_crash_countdown;
