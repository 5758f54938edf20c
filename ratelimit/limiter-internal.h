/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The limiter's shared layout and the helpers limiter.c and limiter-tree.c share (see limiter.c). */

#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <unistd.h>

#include "limiter.h"
#include "util.h"

#define LIM_MAGIC 0x4d494c52u /* "RLIM" */
#define LIM_VERSION 1u
#define NIL 0u
#define DEPTH_MAX 128u /* a red-black tree of 2^32 nodes is at most 64 deep */
#define EVICT_MAX 64u  /* forced evictions per decision before giving up */
#define ZONE_HEADER SHMZ_ZONE_HEADER_SIZE

enum { OP_NONE, OP_INSERT, OP_MOVE, OP_DELETE };
enum { RED = 0, BLACK = 1 };
/* Inserted by a lookup without account: nginx's node with last 0, so drained whenever it is next accounted. */
#define NODE_FRESH 0x1u

struct lim_shared {
        uint32_t magic, version;
        uint32_t root;       /* tree */
        uint32_t head, tail; /* LRU: head = most recently used; next goes towards the tail */
        uint32_t busy;       /* a mutation is under way, or its process died in it */
        uint32_t intent;     /* the node it is about */
        uint32_t intent_op;  /* OP_* */
        uint64_t nodes;
        uint64_t decisions, passed, delayed, rejected, expired, evicted;
        uint64_t recoveries, rebuilds, corruptions, nomem;
};

/* What a lookup reads at each level comes first: one cache line whatever the slot's alignment. */
struct lim_node {
        uint32_t left, right;
        uint32_t hash;
        uint8_t color;
        uint8_t keylen; /* 1..LIMITER_KEY_MAX */
        uint8_t flags;  /* NODE_FRESH */
        uint8_t reserved;
        uint32_t parent;
        uint32_t prev, next; /* LRU */
        uint32_t excess;     /* milli-requests */
        uint64_t last;       /* ms */
        uint8_t key[];
};
_Static_assert(sizeof(struct lim_node) == 40, "node header size");

struct limiter {
        struct shmz_zone *z;
        struct shmz_mutex *m;
        struct lim_shared *sh;
        uint8_t *zbase; /* zone offset 0 */
        uint64_t zend;  /* first offset past the zone */
        uint64_t max_nodes;
        struct limiter_config cfg;
        uint64_t lock_timeout_ns; /* 0: wait for ever */
        bool corrupt;             /* a link read in this critical section led outside the zone */
        union {
                struct lim_node n;
                uint8_t bytes[sizeof(struct lim_node) + LIMITER_KEY_MAX];
        } scratch; /* what a bad link resolves to: writes land here, in our own memory */
};

#define CRASH_POINT()                                                                                                  \
        do {                                                                                                           \
                __asm__ __volatile__("" ::: "memory");                                                                 \
                if (_unlikely_(limiter_test_crash_countdown) && --limiter_test_crash_countdown == 0)                   \
                        (void) kill(getpid(), SIGKILL);                                                                \
        } while (0)

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)

/* ---- references ------------------------------------------------------------------------ */

/* The node at ref if its fixed part lies inside the zone, else NULL. */
static inline struct lim_node *node_try(struct limiter *l, uint32_t ref) {
        uint64_t off = (uint64_t) ref * 8;

        if (ref == NIL || off < ZONE_HEADER || off + sizeof(struct lim_node) > l->zend)
                return NULL;
        return (struct lim_node *) (l->zbase + off);
}

/* Do keylen bytes of n's key lie inside the zone? */
static inline bool key_inside(const struct limiter *l, const struct lim_node *n, uint8_t keylen) {
        return keylen <= LIMITER_KEY_MAX && (uint64_t) (n->key - l->zbase) + keylen <= l->zend;
}

/* For links the tree code follows: a bad one is noted and resolves to the scratch node. */
static inline struct lim_node *N(struct limiter *l, uint32_t ref) {
        struct lim_node *n = node_try(l, ref);

        if (_unlikely_(!n)) {
                l->corrupt = true;
                return &l->scratch.n;
        }
        return n;
}

static inline uint32_t ref_of(struct limiter *l, const struct lim_node *n) {
        return (uint32_t) (((const uint8_t *) n - l->zbase) / 8);
}

static inline uint32_t key_hash(const uint8_t *k, size_t n) {
        uint32_t h = 2166136261u; /* FNV-1a */

        for (size_t i = 0; i < n; i++)
                h = (h ^ k[i]) * 16777619u;
        return h;
}

/*
 * <0, 0, >0: the key (hash, keylen, bytes) against node n. The node's length is
 * read once; its bytes are compared only if ours (checked) has the same length
 * and they lie inside the zone, else it is corrupt.
 */
static inline int key_cmp(struct limiter *l, uint32_t hash, const uint8_t *key, uint8_t keylen,
                          const struct lim_node *n) {
        uint32_t nh = LOAD(n->hash);
        uint8_t nl = LOAD(n->keylen);

        if (hash != nh)
                return hash < nh ? -1 : 1;
        if (keylen != nl)
                return keylen < nl ? -1 : 1;
        if (!key_inside(l, n, keylen)) {
                l->corrupt = true;
                return -1;
        }
        return memcmp(key, n->key, keylen);
}

/* limiter-tree.c: the tree by key and the LRU list, each change named in the header first (op_begin()). */
uint32_t tree_find(struct limiter *l, uint32_t hash, const uint8_t *key, uint8_t keylen, uint32_t *ret_parent,
                   bool *ret_left);
void tree_link(struct limiter *l, uint32_t z, uint32_t parent, bool left);
void lru_unlink(struct limiter *l, uint32_t x);
void lru_push_head(struct limiter *l, uint32_t x);
void op_begin(struct limiter *l, int op, uint32_t x);
void op_end(struct limiter *l);
/* Removes x from tree and list and frees it. */
void node_delete(struct limiter *l, uint32_t x);
