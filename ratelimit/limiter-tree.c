/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The limiter's index: a red-black tree by key and the LRU list, both over
 * 32-bit references checked by N(), every loop bounded. Each step that could
 * be the last (a crash) is a CRASH_POINT(): the list walked from its head holds
 * every node but the intent node at each of them (see limiter.c).
 */
#include "limiter-internal.h"

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
uint32_t tree_find(struct limiter *l, uint32_t hash, const uint8_t *key, uint8_t keylen, uint32_t *ret_parent,
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

void tree_link(struct limiter *l, uint32_t z, uint32_t parent, bool left) {
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

void lru_unlink(struct limiter *l, uint32_t x) {
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

void lru_push_head(struct limiter *l, uint32_t x) {
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

void op_begin(struct limiter *l, int op, uint32_t x) {
        l->sh->intent = x;
        l->sh->intent_op = (uint32_t) op;
        __atomic_store_n(&l->sh->busy, 1, __ATOMIC_RELEASE);
        CRASH_POINT();
}

void op_end(struct limiter *l) {
        CRASH_POINT();
        __atomic_store_n(&l->sh->busy, 0, __ATOMIC_RELEASE);
        l->sh->intent = NIL;
        l->sh->intent_op = OP_NONE;
}

void node_delete(struct limiter *l, uint32_t x) {
        op_begin(l, OP_DELETE, x);
        tree_erase(l, x);
        lru_unlink(l, x);
        if (l->sh->nodes > 0)
                l->sh->nodes--;
        (void) shmz_free_checked_locked(l->z, N(l, x));
        op_end(l);
}
