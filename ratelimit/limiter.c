/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The limiter's shared state: a header (the zone's root object) and one node
 * per key, allocated with shmz_alloc_locked() under the zone lock. Links are
 * 32-bit references, zone offset / 8, 0 = none: they keep nodes small and mean
 * the same at every mapping address.
 *
 * Crash consistency: each mutation of the tree or the list names its node in
 * the header (intent) and sets busy. The list is updated so that, walked from
 * its head along `next`, it holds every node except at most the intent node,
 * at every step. A process that finds busy set after a death rebuilds the tree
 * from that walk and settles the intent node (freed unless the walk met it).
 */
#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
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

unsigned limiter_test_crash_countdown = 0;
#define CRASH_POINT()                                                                                                  \
        do {                                                                                                           \
                __asm__ __volatile__("" ::: "memory");                                                                 \
                if (_unlikely_(limiter_test_crash_countdown) && --limiter_test_crash_countdown == 0)                   \
                        (void) kill(getpid(), SIGKILL);                                                                \
        } while (0)

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)

/* ---- references ------------------------------------------------------------------------ */

/* The node at ref if its fixed part lies inside the zone, else NULL. */
static struct lim_node *node_try(struct limiter *l, uint32_t ref) {
        uint64_t off = (uint64_t) ref * 8;

        if (ref == NIL || off < ZONE_HEADER || off + sizeof(struct lim_node) > l->zend)
                return NULL;
        return (struct lim_node *) (l->zbase + off);
}

/* Do keylen bytes of n's key lie inside the zone? */
static bool key_inside(const struct limiter *l, const struct lim_node *n, uint8_t keylen) {
        return keylen <= LIMITER_KEY_MAX && (uint64_t) (n->key - l->zbase) + keylen <= l->zend;
}

/* For links the tree code follows: a bad one is noted and resolves to the scratch node. */
static struct lim_node *N(struct limiter *l, uint32_t ref) {
        struct lim_node *n = node_try(l, ref);

        if (_unlikely_(!n)) {
                l->corrupt = true;
                return &l->scratch.n;
        }
        return n;
}

static uint32_t ref_of(struct limiter *l, const struct lim_node *n) {
        return (uint32_t) (((const uint8_t *) n - l->zbase) / 8);
}

static uint32_t key_hash(const uint8_t *k, size_t n) {
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
static int key_cmp(struct limiter *l, uint32_t hash, const uint8_t *key, uint8_t keylen, const struct lim_node *n) {
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

/* ---- red-black tree (links checked by N(), loops bounded) ------------------------------ */

static bool is_red(struct limiter *l, uint32_t ref) {
        return ref != NIL && LOAD(N(l, ref)->color) == RED;
}

static void set_child(struct limiter *l, uint32_t parent, uint32_t old, uint32_t new) {
        if (parent == NIL)
                l->sh->root = new;
        else if (LOAD(N(l, parent)->left) == old)
                N(l, parent)->left = new;
        else
                N(l, parent)->right = new;
}

/* n's link on side d: 0 left, 1 right (the layout keeps two named links; the tree's code is written once for d). */
static uint32_t *link_of(struct lim_node *n, unsigned d) {
        return d ? &n->right : &n->left;
}

/* x goes down to side d, its child on the other side takes its place (d = 0: a left rotation). */
static void rotate(struct limiter *l, uint32_t x, unsigned d) {
        struct lim_node *xn = N(l, x);
        uint32_t y = *link_of(xn, !d), yc, xp;
        struct lim_node *yn;

        if (y == NIL) {
                l->corrupt = true;
                return;
        }
        yn = N(l, y);
        yc = *link_of(yn, d);
        *link_of(xn, !d) = yc;
        if (yc != NIL)
                N(l, yc)->parent = x;
        xp = xn->parent;
        yn->parent = xp;
        set_child(l, xp, x, y);
        *link_of(yn, d) = x;
        xn->parent = y;
}

/* The node with this key, or NIL; ret_parent and ret_left: where it would go. */
static uint32_t tree_find(struct limiter *l, uint32_t hash, const uint8_t *key, uint8_t keylen, uint32_t *ret_parent,
                          bool *ret_left) {
        uint32_t cur = LOAD(l->sh->root), parent = NIL;
        bool left = false;

        for (unsigned depth = 0; cur != NIL; depth++) {
                struct lim_node *n = node_try(l, cur);
                int c;

                if (!n || depth >= DEPTH_MAX) {
                        l->corrupt = true;
                        return NIL;
                }
                c = key_cmp(l, hash, key, keylen, n);
                if (c == 0)
                        return cur;
                parent = cur;
                left = c < 0;
                cur = left ? LOAD(n->left) : LOAD(n->right);
        }
        if (ret_parent)
                *ret_parent = parent;
        if (ret_left)
                *ret_left = left;
        return NIL;
}

static void tree_link(struct limiter *l, uint32_t z, uint32_t parent, bool left) {
        struct lim_node *zn = N(l, z);

        zn->left = zn->right = NIL;
        zn->parent = parent;
        zn->color = RED;
        if (parent == NIL)
                l->sh->root = z;
        else if (left)
                N(l, parent)->left = z;
        else
                N(l, parent)->right = z;
        CRASH_POINT();

        for (unsigned steps = 0; steps < DEPTH_MAX; steps++) {
                uint32_t p = N(l, z)->parent, g, u;
                unsigned d;

                if (p == NIL || !is_red(l, p))
                        break;
                g = N(l, p)->parent;
                if (g == NIL) {
                        l->corrupt = true; /* a red root */
                        break;
                }
                d = N(l, g)->left == p ? 0 : 1; /* p is g's child on side d */
                u = *link_of(N(l, g), !d);
                if (is_red(l, u)) {
                        N(l, p)->color = BLACK;
                        N(l, u)->color = BLACK;
                        N(l, g)->color = RED;
                        z = g;
                        continue;
                }
                if (*link_of(N(l, p), !d) == z) {
                        z = p;
                        rotate(l, z, d);
                        p = N(l, z)->parent;
                }
                N(l, p)->color = BLACK;
                N(l, g)->color = RED;
                rotate(l, g, !d);
                CRASH_POINT();
        }
        if (l->sh->root != NIL)
                N(l, l->sh->root)->color = BLACK;
}

static void tree_erase_fixup(struct limiter *l, uint32_t x, uint32_t xp) {
        for (unsigned steps = 0; steps < DEPTH_MAX && x != l->sh->root && !is_red(l, x); steps++) {
                uint32_t w;
                unsigned d;

                if (xp == NIL) {
                        l->corrupt = true;
                        return;
                }
                d = N(l, xp)->left == x ? 0 : 1; /* x is xp's child on side d, w its sibling */
                w = *link_of(N(l, xp), !d);
                if (w == NIL) {
                        l->corrupt = true;
                        return;
                }
                if (is_red(l, w)) {
                        N(l, w)->color = BLACK;
                        N(l, xp)->color = RED;
                        rotate(l, xp, d);
                        w = *link_of(N(l, xp), !d);
                        if (w == NIL) {
                                l->corrupt = true;
                                return;
                        }
                }
                if (!is_red(l, N(l, w)->left) && !is_red(l, N(l, w)->right)) {
                        N(l, w)->color = RED;
                        x = xp;
                        xp = N(l, x)->parent;
                        continue;
                }
                if (!is_red(l, *link_of(N(l, w), !d))) {
                        N(l, *link_of(N(l, w), d))->color = BLACK;
                        N(l, w)->color = RED;
                        rotate(l, w, !d);
                        w = *link_of(N(l, xp), !d);
                }
                N(l, w)->color = N(l, xp)->color;
                N(l, xp)->color = BLACK;
                if (*link_of(N(l, w), !d) != NIL)
                        N(l, *link_of(N(l, w), !d))->color = BLACK;
                rotate(l, xp, d);
                x = l->sh->root;
                break;
        }
        if (x != NIL)
                N(l, x)->color = BLACK;
}

static void tree_erase(struct limiter *l, uint32_t z) {
        struct lim_node *zn = N(l, z);
        uint32_t y = z, x, xp;
        uint8_t ycolor;

        if (zn->left != NIL && zn->right != NIL) {
                /* Successor: leftmost of the right subtree. */
                y = zn->right;
                for (unsigned d = 0; N(l, y)->left != NIL; d++) {
                        if (d >= DEPTH_MAX) {
                                l->corrupt = true;
                                return;
                        }
                        y = N(l, y)->left;
                }
        }
        x = N(l, y)->left != NIL ? N(l, y)->left : N(l, y)->right;
        xp = N(l, y)->parent;
        ycolor = N(l, y)->color;
        if (x != NIL)
                N(l, x)->parent = xp;
        set_child(l, xp, y, x);
        CRASH_POINT();
        if (y != z) {
                /* y takes z's place, links and colour. */
                struct lim_node *yn = N(l, y);

                if (xp == z)
                        xp = y;
                yn->left = zn->left;
                yn->right = zn->right;
                yn->parent = zn->parent;
                yn->color = zn->color;
                if (yn->left != NIL)
                        N(l, yn->left)->parent = y;
                if (yn->right != NIL)
                        N(l, yn->right)->parent = y;
                set_child(l, zn->parent, z, y);
                CRASH_POINT();
        }
        if (ycolor == BLACK)
                tree_erase_fixup(l, x, xp);
}

/* ---- LRU list: walked from the head, it always holds every node but the intent node ---- */

static void lru_unlink(struct limiter *l, uint32_t x) {
        struct lim_node *xn = N(l, x);
        uint32_t p = xn->prev, n = xn->next;

        if (p != NIL)
                N(l, p)->next = n;
        else
                l->sh->head = n;
        CRASH_POINT();
        if (n != NIL)
                N(l, n)->prev = p;
        else
                l->sh->tail = p;
}

static void lru_push_head(struct limiter *l, uint32_t x) {
        struct lim_node *xn = N(l, x);
        uint32_t h = l->sh->head;

        xn->prev = NIL;
        xn->next = h;
        CRASH_POINT();
        if (h != NIL)
                N(l, h)->prev = x;
        else
                l->sh->tail = x;
        CRASH_POINT();
        l->sh->head = x;
}

static void op_begin(struct limiter *l, int op, uint32_t x) {
        l->sh->intent = x;
        l->sh->intent_op = (uint32_t) op;
        __atomic_store_n(&l->sh->busy, 1, __ATOMIC_RELEASE);
        CRASH_POINT();
}

static void op_end(struct limiter *l) {
        CRASH_POINT();
        __atomic_store_n(&l->sh->busy, 0, __ATOMIC_RELEASE);
        l->sh->intent = NIL;
        l->sh->intent_op = OP_NONE;
}

/* Removes x from tree and list and frees it. */
static void node_delete(struct limiter *l, uint32_t x) {
        op_begin(l, OP_DELETE, x);
        tree_erase(l, x);
        lru_unlink(l, x);
        if (l->sh->nodes > 0)
                l->sh->nodes--;
        (void) shmz_free_checked_locked(l->z, N(l, x));
        op_end(l);
}

/* ---- validation and rebuild ------------------------------------------------------------- */

/* A new limiter's header. */
static void shared_reset(struct limiter *l) {
        struct lim_shared *sh = l->sh;

        memset(sh, 0, sizeof(*sh));
        sh->version = LIM_VERSION;
        __atomic_store_n(&sh->magic, LIM_MAGIC, __ATOMIC_RELEASE);
}

/* A node fit to be kept: inside the zone, a sane key length. */
static struct lim_node *node_sane(struct limiter *l, uint32_t ref) {
        struct lim_node *n = node_try(l, ref);
        uint8_t kl;

        if (!n)
                return NULL;
        kl = LOAD(n->keylen);
        return kl >= 1 && key_inside(l, n, kl) ? n : NULL;
}

/*
 * Rebuilds the tree and the back links from the list walked from its head,
 * then settles the intent node. Nodes past a broken link are lost (leaked),
 * which a death cannot cause, only a co-writer.
 */
static void rebuild(struct limiter *l) {
        struct lim_shared *sh = l->sh;
        uint32_t intent = LOAD(sh->busy) ? LOAD(sh->intent) : NIL, op = LOAD(sh->intent_op);
        uint32_t cur = LOAD(sh->head), tail = NIL;
        uint64_t count = 0;
        bool met_intent = false;

        /*
         * Dying here, the next one starts over: busy stays set, and the list
         * keeps its forward links (only nodes dropped from it are unlinked, one
         * store each), so that walk meets the same nodes again.
         */
        sh->busy = 1;
        sh->root = NIL;
        l->corrupt = false;
        for (uint64_t steps = 0; cur != NIL && steps < l->max_nodes; steps++) {
                struct lim_node *n = node_sane(l, cur);
                uint32_t next, parent = NIL, found = NIL;
                bool left = false, drop = false;

                if (!n)
                        break;
                next = LOAD(n->next);
                if (cur == intent) {
                        met_intent = true;
                        drop = op == OP_DELETE; /* its removal stands: freed below */
                }
                if (!drop) {
                        found = tree_find(l, LOAD(n->hash), n->key, LOAD(n->keylen), &parent, &left);
                        if (found == cur || l->corrupt)
                                break;       /* a cycle */
                        drop = found != NIL; /* two nodes of one key: keep the newer, nearer the head */
                }
                if (drop) {
                        if (tail != NIL)
                                N(l, tail)->next = next;
                        else
                                sh->head = next;
                        if (found != NIL) {
                                if (cur == intent)
                                        met_intent = false; /* freed below */
                                else
                                        (void) shmz_free_checked_locked(l->z, n);
                        }
                        cur = next;
                        continue;
                }
                n->prev = tail;
                tree_link(l, cur, parent, left);
                tail = cur;
                count++;
                cur = next;
        }
        /* Whatever follows a bad link or closes a cycle is cut off (lost: only a co-writer does that). */
        if (tail != NIL)
                N(l, tail)->next = NIL;
        else
                sh->head = NIL;
        sh->tail = tail;
        sh->nodes = count;
        if (intent != NIL && (!met_intent || op == OP_DELETE)) {
                struct lim_node *n = node_try(l, intent);
                /* -EALREADY if the dead process's free was finished by the allocator. */
                if (n)
                        (void) shmz_free_checked_locked(l->z, n);
        }
        sh->rebuilds++;
        sh->intent = NIL;
        sh->intent_op = OP_NONE;
        __atomic_store_n(&sh->busy, 0, __ATOMIC_RELEASE);
}

/* Tree nodes (bounded in-order walk with parent links checked), or -1 if the tree is unsound. */
static int64_t tree_count(struct limiter *l) {
        uint32_t stack[DEPTH_MAX], cur = LOAD(l->sh->root), parent_of_cur = NIL;
        unsigned sp = 0;
        int64_t n = 0;

        if (cur != NIL && !node_try(l, cur))
                return -1;
        if (cur != NIL && LOAD(N(l, cur)->parent) != NIL)
                return -1;
        for (;;) {
                while (cur != NIL) {
                        struct lim_node *cn = node_try(l, cur);

                        if (!cn || sp >= DEPTH_MAX || LOAD(cn->parent) != parent_of_cur)
                                return -1;
                        stack[sp++] = cur;
                        parent_of_cur = cur;
                        cur = LOAD(cn->left);
                }
                if (sp == 0)
                        return n;
                cur = stack[--sp];
                if ((uint64_t) ++n > l->max_nodes)
                        return -1;
                parent_of_cur = cur;
                cur = LOAD(N(l, cur)->right);
        }
}

/* 0 if the list and the tree hold the same nodes, soundly linked; -EUCLEAN otherwise. */
static int validate(struct limiter *l) {
        struct lim_shared *sh = l->sh;
        uint32_t cur = LOAD(sh->head), prev = NIL;
        uint64_t count = 0;

        if (LOAD(sh->magic) != LIM_MAGIC || LOAD(sh->busy))
                return -EUCLEAN;
        l->corrupt = false;
        while (cur != NIL) {
                struct lim_node *n = node_sane(l, cur);

                if (!n || count >= l->max_nodes || LOAD(n->prev) != prev)
                        return -EUCLEAN;
                if (tree_find(l, LOAD(n->hash), n->key, LOAD(n->keylen), NULL, NULL) != cur || l->corrupt)
                        return -EUCLEAN;
                count++;
                prev = cur;
                cur = LOAD(n->next);
        }
        if (prev != LOAD(sh->tail) || count != LOAD(sh->nodes) || tree_count(l) != (int64_t) count)
                return -EUCLEAN;
        return 0;
}

/* With the lock held after SHMZ_OWNER_DEAD, or after finding something wrong. */
static void recover(struct limiter *l, bool owner_dead) {
        if (owner_dead)
                l->sh->recoveries++;
        if (LOAD(l->sh->magic) != LIM_MAGIC || LOAD(l->sh->version) != LIM_VERSION) {
                /* Only a co-writer does that: the list from the head is still the best guess at the keys. */
                l->sh->version = LIM_VERSION;
                l->sh->magic = LIM_MAGIC;
                l->sh->corruptions++;
                rebuild(l);
                return;
        }
        if (LOAD(l->sh->busy) || validate(l) < 0) {
                if (!owner_dead && !LOAD(l->sh->busy))
                        l->sh->corruptions++;
                rebuild(l);
        }
}

static int lim_lock(struct limiter *l) {
        int r = l->lock_timeout_ns ? shmz_mutex_timedlock(l->m, l->lock_timeout_ns) : shmz_mutex_lock(l->m);

        if (r < 0)
                return r;
        l->corrupt = false;
        if (r == SHMZ_OWNER_DEAD) {
                recover(l, true);
                (void) shmz_mutex_consistent(l->m);
        } else if (_unlikely_(LOAD(l->sh->magic) != LIM_MAGIC || LOAD(l->sh->busy)))
                recover(l, false); /* busy with a live lock: a co-writer's doing */
        return 0;
}

static void lim_unlock(struct limiter *l) {
        if (_unlikely_(l->corrupt)) {
                l->sh->corruptions++;
                rebuild(l);
        }
        (void) shmz_mutex_unlock(l->m);
}

/* ---- decisions -------------------------------------------------------------------------- */

/* Milliseconds to drain, nginx's way: small steps back count as 0, big ones as a reset. */
static int64_t elapsed_ms(uint64_t now, uint64_t last) {
        int64_t ms = (int64_t) (now - last);

        if (ms < -(int64_t) LIMITER_IDLE_MS)
                return 1;
        return ms < 0 ? 0 : ms;
}

/* What rate drains in ms milliseconds, in milli-requests (saturating). */
static uint64_t drain(uint32_t rate, uint64_t ms) {
        if (rate != 0 && ms > UINT64_MAX / rate)
                return UINT64_MAX;
        return (uint64_t) rate * ms / 1000;
}

/* Removes up to two keys from the tail that have been idle a minute and drained. */
static void expire(struct limiter *l, const struct limiter_config *cfg, uint64_t now) {
        for (int i = 0; i < 2; i++) {
                uint32_t t = LOAD(l->sh->tail);
                struct lim_node *n;
                uint64_t last, age;

                if (t == NIL || !(n = node_sane(l, t)))
                        return;
                last = LOAD(n->last);
                age = now >= last ? now - last : last - now;
                /* A fresh key is drained by definition; its minute keeps it for the account that follows. */
                if (age < LIMITER_IDLE_MS ||
                    (!(LOAD(n->flags) & NODE_FRESH) && drain(cfg->rate, age) < LOAD(n->excess)))
                        return;
                node_delete(l, t);
                l->sh->expired++;
        }
}

static struct lim_node *node_new(struct limiter *l, size_t keylen) {
        size_t size = limiter_node_bytes(keylen);

        for (unsigned i = 0;; i++) {
                uint32_t t;
                void *p = shmz_alloc_locked(l->z, size);

                if (p)
                        return p;
                t = LOAD(l->sh->tail);
                if (i >= EVICT_MAX || t == NIL || l->corrupt)
                        return NULL;
                /* Full: the least recently used key goes, whatever it holds (nothing can pin it). */
                node_delete(l, t);
                l->sh->evicted++;
        }
}

static void fold_key(const void *key, size_t keylen, uint8_t out[LIMITER_KEY_MAX]) {
        uint64_t h = 14695981039346656037ULL; /* FNV-1a 64 */
        const uint8_t *k = key;

        for (size_t i = 0; i < keylen; i++)
                h = (h ^ k[i]) * 1099511628211ULL;
        memcpy(out, key, LIMITER_KEY_MAX - 8);
        memcpy(out + LIMITER_KEY_MAX - 8, &h, 8);
}

static int config_check(const struct limiter_config *cfg) {
        if (!cfg || cfg->rate == 0 || cfg->burst > LIMITER_BURST_MAX)
                return -EINVAL;
        if (cfg->delay != LIMITER_NODELAY && cfg->delay > LIMITER_BURST_MAX)
                return -EINVAL;
        return 0;
}

enum decide_mode {
        MODE_DECIDE,  /* nginx's lookup with account: a request's last (or only) limit */
        MODE_LOOKUP,  /* lookup without account: check only */
        MODE_ACCOUNT, /* the second phase of a MODE_LOOKUP that passed */
};

/* A new node for key, in tree and list (keys expired first, as nginx does before it allocates). */
static int node_insert(struct limiter *l, const struct limiter_config *cfg, uint32_t hash, const void *key,
                       size_t keylen, uint64_t now, uint8_t flags) {
        uint32_t ref, parent = NIL;
        bool left = false;
        struct lim_node *n;

        expire(l, cfg, now);
        n = node_new(l, keylen);
        if (!n) {
                l->sh->nomem++;
                return -ENOMEM;
        }
        ref = ref_of(l, n);
        op_begin(l, OP_INSERT, ref);
        n->hash = hash;
        n->keylen = (uint8_t) keylen;
        n->flags = flags;
        n->reserved = 0;
        memcpy(n->key, key, keylen);
        n->excess = 0;
        n->last = now;
        /* Expiry and evictions may have reshaped the tree: find the place now. */
        if (tree_find(l, hash, key, (uint8_t) keylen, &parent, &left) == NIL && !l->corrupt)
                tree_link(l, ref, parent, left);
        lru_push_head(l, ref);
        l->sh->nodes++;
        op_end(l);
        return 0;
}

/* nginx's excess after one more request at now: excess - drain + 1000, and only then clamped at 0. */
static uint64_t excess_after(const struct limiter_config *cfg, const struct lim_node *n, uint64_t now,
                             int64_t *ret_ms) {
        uint32_t excess = LOAD(n->excess);
        int64_t ms = elapsed_ms(now, LOAD(n->last));
        uint64_t dr = drain(cfg->rate, (uint64_t) ms);

        *ret_ms = ms;
        if (LOAD(n->flags) & NODE_FRESH) {
                *ret_ms = 1; /* nginx's last 0: an age that drains everything, and last = now after */
                return 0;
        }
        return (uint64_t) excess + 1000 > dr ? (uint64_t) excess + 1000 - dr : 0;
}

static int decide(struct limiter *l, const struct limiter_config *cfg, const void *key, size_t keylen, uint64_t now,
                  enum decide_mode mode, struct limiter_decision *ret) {
        uint8_t folded[LIMITER_KEY_MAX];
        struct limiter_decision d = { .verdict = LIMITER_PASS };
        uint32_t hash, ref;
        int r;

        assert_return(l, -EINVAL);
        assert_return(key || keylen == 0, -EINVAL);
        assert_return(ret, -EINVAL);
        if (!cfg)
                cfg = &l->cfg;
        else if (config_check(cfg) < 0)
                return -EINVAL;
        if (keylen == 0) {
                *ret = d; /* nginx: an empty key is not accounted */
                return 0;
        }
        if (keylen > LIMITER_KEY_MAX) {
                fold_key(key, keylen, folded);
                key = folded;
                keylen = LIMITER_KEY_MAX;
        }
        hash = key_hash(key, keylen);

        r = lim_lock(l);
        if (r < 0)
                return r;
        ref = tree_find(l, hash, key, (uint8_t) keylen, NULL, NULL);
        if (ref != NIL) {
                struct lim_node *n = N(l, ref);
                int64_t ms;
                uint64_t e = excess_after(cfg, n, now, &ms);

                /* Active keys stay away from the tail, rejected ones too (the second phase does not move). */
                if (mode != MODE_ACCOUNT && LOAD(l->sh->head) != ref) {
                        op_begin(l, OP_MOVE, ref);
                        lru_unlink(l, ref);
                        lru_push_head(l, ref);
                        op_end(l);
                }
                if (mode != MODE_ACCOUNT && e > (uint64_t) cfg->burst * 1000) {
                        d.verdict = LIMITER_REJECT;
                        d.excess = LOAD(n->excess);
                } else if (mode == MODE_LOOKUP) {
                        d.excess = (uint32_t) e; /* what it would be: nothing stored */
                } else {
                        n->excess = (uint32_t) e;
                        if (ms != 0 || mode == MODE_ACCOUNT)
                                n->last = now;
                        n->flags = 0;
                        d.excess = (uint32_t) e;
                }
        } else if (!l->corrupt) {
                r = node_insert(l, cfg, hash, key, keylen, now, mode == MODE_LOOKUP ? NODE_FRESH : 0);
                if (r < 0) {
                        lim_unlock(l);
                        return r;
                }
        }

        if (mode != MODE_LOOKUP && d.verdict != LIMITER_REJECT && cfg->delay != LIMITER_NODELAY &&
            d.excess > (uint64_t) cfg->delay * 1000) {
                d.verdict = LIMITER_DELAY;
                d.delay_ms = (d.excess - (uint64_t) cfg->delay * 1000) * 1000 / cfg->rate;
        }
        /* A request is counted once, at its last limit's lookup, or at its rejection. */
        if (mode == MODE_DECIDE || d.verdict == LIMITER_REJECT) {
                l->sh->decisions++;
                if (d.verdict == LIMITER_PASS)
                        l->sh->passed++;
                else if (d.verdict == LIMITER_DELAY)
                        l->sh->delayed++;
                else
                        l->sh->rejected++;
        }
        lim_unlock(l);
        *ret = d;
        return 0;
}

int limiter_decide(struct limiter *l, const void *key, size_t keylen, uint64_t now, struct limiter_decision *ret) {
        return decide(l, NULL, key, keylen, now, MODE_DECIDE, ret);
}

int limiter_lookup(struct limiter *l, const struct limiter_config *cfg, const void *key, size_t keylen, uint64_t now,
                   bool account, struct limiter_decision *ret) {
        return decide(l, cfg, key, keylen, now, account ? MODE_DECIDE : MODE_LOOKUP, ret);
}

int limiter_account(struct limiter *l, const struct limiter_config *cfg, const void *key, size_t keylen, uint64_t now,
                    struct limiter_decision *ret) {
        return decide(l, cfg, key, keylen, now, MODE_ACCOUNT, ret);
}

void limiter_set_lock_timeout(struct limiter *l, uint64_t ns) {
        if (l)
                l->lock_timeout_ns = ns;
}

void limiter_tag(const char *key_expr, char ret[SHMZ_TAG_BUF]) {
        size_t n = key_expr ? strlen(key_expr) : 0;

        if (sizeof(LIMITER_TAG) + n < SHMZ_TAG_BUF) {
                snprintf(ret, SHMZ_TAG_BUF, "%s:%s", LIMITER_TAG, key_expr ? key_expr : "");
                return;
        }
        /* Too long for a tag: a hash names it (FNV-1a 64; only agreement matters, not secrecy). */
        uint64_t h = 14695981039346656037ULL;
        for (size_t i = 0; i < n; i++)
                h = (h ^ (uint8_t) key_expr[i]) * 1099511628211ULL;
        snprintf(ret, SHMZ_TAG_BUF, "%s:#%016llx", LIMITER_TAG, (unsigned long long) h);
}

/* ---- setup and figures ------------------------------------------------------------------ */

size_t limiter_node_bytes(size_t keylen) {
        if (keylen > LIMITER_KEY_MAX)
                keylen = LIMITER_KEY_MAX;
        return ALIGN_TO(sizeof(struct lim_node) + keylen, (size_t) 8);
}

int limiter_parse_rate(const char *s, uint32_t *ret_rate) {
        unsigned long long n;
        char *end;
        unsigned scale;

        assert_return(s, -EINVAL);
        assert_return(ret_rate, -EINVAL);
        if (*s < '0' || *s > '9')
                return -EINVAL;
        errno = 0;
        n = strtoull(s, &end, 10);
        if (errno != 0)
                return -ERANGE;
        if (strcmp(end, "r/s") == 0)
                scale = 1;
        else if (strcmp(end, "r/m") == 0)
                scale = 60;
        else
                return -EINVAL;
        if (n == 0)
                return -EINVAL;
        if (n > UINT32_MAX / 1000)
                return -ERANGE;
        if (n * 1000 / scale == 0)
                return -ERANGE; /* nginx would divide by zero */
        *ret_rate = (uint32_t) (n * 1000 / scale);
        return 0;
}

int limiter_open(struct shmz_zone *z, const struct limiter_config *cfg, struct limiter **ret) {
        _cleanup_free_ struct limiter *l = NULL;
        struct lim_shared *sh;
        void *base;
        int r, locked;

        assert_return(z, -EINVAL);
        assert_return(ret, -EINVAL);
        r = config_check(cfg);
        if (r < 0)
                return r;
        base = shmz_zone_base(z);
        if (!base || shmz_zone_size(z) < 4 * 4096)
                return -EINVAL;

        l = calloc(1, sizeof(*l));
        if (!l)
                return -ENOMEM;
        l->z = z;
        l->m = shmz_zone_mutex(z);
        l->cfg = *cfg;
        l->zbase = (uint8_t *) base - shmz_offset(z, base);
        l->zend = shmz_offset(z, base) + shmz_zone_size(z);
        if (l->zend / 8 > UINT32_MAX)
                return -EFBIG; /* references are 32-bit units of 8 bytes: zones up to 32 GiB */
        l->max_nodes = shmz_zone_size(z) / sizeof(struct lim_node) + 1;

        locked = shmz_mutex_lock(l->m);
        if (locked < 0)
                return locked;
        sh = shmz_zone_root(z);
        if (!sh) {
                sh = shmz_alloc_locked(z, sizeof(*sh));
                if (!sh) {
                        r = -errno;
                        goto out;
                }
                l->sh = sh;
                shared_reset(l);
                r = shmz_zone_set_root(z, sh);
                if (r < 0)
                        goto out;
        } else if (shmz_offset(z, sh) + sizeof(*sh) > l->zend || LOAD(sh->magic) != LIM_MAGIC) {
                r = -EBADMSG;
                goto out;
        }
        l->sh = sh;
        if (locked == SHMZ_OWNER_DEAD) {
                recover(l, true);
                (void) shmz_mutex_consistent(l->m);
        }
        r = 0;
out:
        if (r < 0 && locked == SHMZ_OWNER_DEAD)
                (void) shmz_mutex_consistent(l->m); /* we repaired nothing, but the allocator did its part */
        (void) shmz_mutex_unlock(l->m);
        if (r < 0)
                return r;
        *ret = TAKE_PTR(l);
        return 0;
}

void limiter_close(struct limiter *l) {
        free(l);
}

int limiter_stats(struct limiter *l, struct limiter_stats *ret) {
        struct lim_shared *sh;
        int r;

        assert_return(l, -EINVAL);
        assert_return(ret, -EINVAL);
        r = lim_lock(l);
        if (r < 0)
                return r;
        sh = l->sh;
        *ret = (struct limiter_stats){
                .nodes = sh->nodes,
                .decisions = sh->decisions,
                .passed = sh->passed,
                .delayed = sh->delayed,
                .rejected = sh->rejected,
                .expired = sh->expired,
                .evicted = sh->evicted,
                .recoveries = sh->recoveries,
                .rebuilds = sh->rebuilds,
                .corruptions = sh->corruptions,
                .nomem = sh->nomem,
        };
        lim_unlock(l);
        return 0;
}

int limiter_check(struct limiter *l, bool repair) {
        int r;

        assert_return(l, -EINVAL);
        r = lim_lock(l);
        if (r < 0)
                return r;
        r = validate(l);
        if (r < 0)
                l->sh->corruptions++;
        if (r < 0 && repair) {
                rebuild(l);
                r = validate(l) == 0 ? 1 : -EUCLEAN;
        }
        l->corrupt = false;
        lim_unlock(l);
        return r;
}
