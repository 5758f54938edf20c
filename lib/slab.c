/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The allocator inside a zone.
 *
 * Layout of the zone's usable area (offsets from the start of the mapping, so
 * every process agrees whatever address it mapped the zone at):
 *
 *   4096                 page descriptors, 32 bytes per page
 *   pages_off            pages of SLAB_PAGE_SIZE, page-aligned, up to map_size
 *
 * and struct slab_state in the header's alloc[] area: list heads, figures and an
 * intent record. Pages form runs: free runs (head descriptor FREE with its
 * length, last descriptor FREE_TAIL pointing back, so that a freed neighbour
 * coalesces in O(1)), large blocks (LARGE + CONT pages) and spans of one size
 * class (SLAB + CONT). Free runs sit in 96 bins: one per length below 64 pages,
 * then one per power of two, with a bitmap of non-empty bins, so a request finds
 * a run that fits with one ctz instead of walking a list.
 *
 * A span's free slots are a bitmap (1 = free): in the SLAB descriptor when the
 * span has at most 64 slots, else at the end of the span with a summary word in
 * the descriptor; either way two ctz find a slot. Each class keeps a list of its
 * spans with free slots and keeps one empty span instead of giving it back, so
 * one object allocated and freed at a span boundary does not churn pages.
 *
 * The descriptors and bitmaps are the truth; lists and counters are derived
 * from them and can be rebuilt (slab_repair). Every mutation sets `busy` and
 * records the block it is about in `intent_off` before it changes anything, so
 * that after a death in the middle the survivor rebuilds and then finishes the
 * free or takes back the half-made allocation. Everything read from the zone is
 * checked before use: a corrupt allocator gives errors, not stray writes.
 */
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>

#include "mutex.h"
#include "slab.h"
#include "util.h"
#include "zone.h"

struct class_info {
        uint32_t size;
        uint32_t npages;   /* pages per span */
        uint32_t nslots;   /* slots per span */
        uint32_t nwords;   /* 0: bitmap in the descriptor; else words at the end of the span */
        uint32_t bits_off; /* offset of those words in the span */
        uint32_t recip;    /* ceil(2^32 / size): rel / size = rel * recip >> 32 while rel * size < 2^32 */
};

static struct class_info classes[SLAB_NCLASSES];
/* Class of n bytes, 1 <= n <= 1024, by (n - 1) / 8: every class boundary up to 1024 is a multiple of 8. */
static uint8_t small_class[128];

/* A checked view of one zone's allocator, valid while the lock is held. */
struct slab {
        uint8_t *base;
        struct slab_state *st;
        struct pdesc *d;
        uint8_t *pages;
        uint32_t npages;
};

#define barrier() __asm__ __volatile__("" ::: "memory")

/*
 * Other processes may write the zone at any moment, hostile ones included.
 * Each value is read from it once, into a local that is checked and then the
 * only thing used: a second read could see something else than what was
 * checked. Relaxed atomic loads are plain loads that the compiler may not
 * repeat or split.
 */
#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)

/* A descriptor as one snapshot, every field read once. */
static inline struct pdesc pd_load(const struct pdesc *d) {
        return (struct pdesc){
                .type = LOAD(d->type),
                .cls = LOAD(d->cls),
                .nfree = LOAD(d->nfree),
                .npages = LOAD(d->npages),
                .next = LOAD(d->next),
                .prev = LOAD(d->prev),
                .head = LOAD(d->head),
                .bits = LOAD(d->bits),
        };
}

/*
 * The fields of a block's head descriptor that alloc and free use, each read
 * once; list links are left unread (atomic loads are never dropped as unused).
 */
static inline struct pdesc pd_load_block(const struct pdesc *d) {
        return (struct pdesc){
                .type = LOAD(d->type),
                .cls = LOAD(d->cls),
                .nfree = LOAD(d->nfree),
                .npages = LOAD(d->npages),
                .head = LOAD(d->head),
                .bits = LOAD(d->bits),
                .next = SLAB_NONE,
                .prev = SLAB_NONE,
        };
}

/* Tests: SIGKILL ourselves at the n-th step of an allocator operation (0 = never). */
unsigned slab_test_crash_countdown = 0;
#define CRASH_POINT()                                                                                                  \
        do {                                                                                                           \
                barrier();                                                                                             \
                if (_unlikely_(slab_test_crash_countdown) && --slab_test_crash_countdown == 0)                         \
                        (void) kill(getpid(), SIGKILL);                                                                \
        } while (0)

/* Tests: a co-writer's hand in the middle of an operation (NULL = off). */
void (*slab_test_race)(const char *where, uint32_t pg) = NULL;
#define RACE_POINT(pg)                                                                                                 \
        do {                                                                                                           \
                if (_unlikely_(slab_test_race))                                                                        \
                        slab_test_race(__func__, pg);                                                                  \
        } while (0)

/* ---- size classes ---------------------------------------------------------------------- */

uint32_t slab_class_size(unsigned c) {
        uint32_t base;

        if (c >= SLAB_NCLASSES)
                return 0;
        if (c < 16)
                return 8 * (c + 1);
        /* Four classes per doubling above 128 bytes. */
        base = 128u << ((c - 16) / 4);
        return base + base / 4 * ((c - 16) % 4 + 1);
}

int slab_class_of(size_t n) {
        unsigned sh;
        size_t m;

        if (n > SHMZ_ALLOC_MAX_CLASS)
                return -1;
        if (n <= 128)
                return n == 0 ? 0 : (int) ((n - 1) >> 3);
        m = n - 1;
        sh = 63 - (unsigned) __builtin_clzll(m);
        return (int) (16 + (sh - 7) * 4 + ((m >> (sh - 2)) & 3));
}

/* slab_class_of() without its arithmetic for the common sizes. */
static inline int class_of(size_t n) {
        if (_likely_(n - 1 < 1024))
                return small_class[(n - 1) >> 3];
        return slab_class_of(n);
}

__attribute__((constructor)) static void classes_init(void) {
        for (unsigned i = 0; i < 128; i++)
                small_class[i] = (uint8_t) slab_class_of(i * 8 + 8);
        for (unsigned c = 0; c < SLAB_NCLASSES; c++) {
                struct class_info *ci = &classes[c];
                uint32_t size = slab_class_size(c);

                ci->size = size;
                /* free_off() divides by the size at every free: a multiplication is several times cheaper. */
                ci->recip = (uint32_t) ((UINT64_C(1) << 32) / size + ((UINT64_C(1) << 32) % size != 0));
                if (size < 64) {
                        /* More than 64 slots: the bitmap goes into the span's tail. */
                        uint32_t n = SLAB_PAGE_SIZE / size;
                        while (n * size + (n + 63) / 64 * 8 > SLAB_PAGE_SIZE)
                                n--;
                        ci->npages = 1;
                        ci->nslots = n;
                        ci->nwords = (n + 63) / 64;
                        ci->bits_off = SLAB_PAGE_SIZE - ci->nwords * 8;
                        continue;
                }
                /* At most 64 slots: pick the span length (in pages) that wastes the least. */
                uint64_t best_waste = UINT64_MAX, best_span = 1;
                for (uint32_t p = 1; p <= SLAB_MAX_SPAN_PAGES; p++) {
                        uint64_t bytes = (uint64_t) p * SLAB_PAGE_SIZE, n = MIN(64u, bytes / size);
                        uint64_t waste;

                        if (n == 0)
                                continue;
                        waste = bytes - n * size;
                        if (best_waste == UINT64_MAX || waste * best_span < best_waste * p) {
                                best_waste = waste;
                                best_span = p;
                                ci->npages = p;
                                ci->nslots = (uint32_t) n;
                        }
                        if (waste * 64 <= bytes)
                                break;
                }
                ci->nwords = 0;
                ci->bits_off = 0;
        }
}

/* ---- layout ---------------------------------------------------------------------------- */

static inline struct slab_state *state_of(struct shmz_zone *z) {
        return (struct slab_state *) z->hdr->alloc;
}

static uint64_t pages_off_for(uint32_t npages) {
        return ALIGN_TO((uint64_t) SLAB_DESC_OFF + (uint64_t) npages * sizeof(struct pdesc), (uint64_t) SLAB_PAGE_SIZE);
}

static uint32_t npages_for(uint64_t map_size) {
        uint64_t n;

        if (map_size <= SLAB_DESC_OFF)
                return 0;
        n = (map_size - SLAB_DESC_OFF) / (SLAB_PAGE_SIZE + sizeof(struct pdesc));
        if (n >= SLAB_NONE)
                n = SLAB_NONE - 1;
        while (n > 0 && pages_off_for((uint32_t) n) + n * SLAB_PAGE_SIZE > map_size)
                n--;
        return (uint32_t) n;
}

static inline bool formatted(struct shmz_zone *z) {
        return __atomic_load_n(&z->hdr->alloc_state, __ATOMIC_ACQUIRE) == SHMZ_ZONE_ALLOC_FORMATTED;
}

/*
 * Reads the layout once and checks it against what this process mapped. A
 * layout equal to the one this process checked last needs no arithmetic.
 */
static inline int slab_get(struct shmz_zone *z, struct slab *ret) {
        struct slab_state *st = state_of(z);
        uint32_t npages = __atomic_load_n(&st->npages, __ATOMIC_RELAXED);
        uint64_t pages_off = __atomic_load_n(&st->pages_off, __ATOMIC_RELAXED);

        if (_unlikely_(LOAD(st->magic) != SLAB_MAGIC))
                return -EUCLEAN;
        if (_unlikely_(npages != z->slab_npages || pages_off != z->slab_pages_off)) {
                if (npages == 0 || npages == SLAB_NONE || pages_off != pages_off_for(npages) ||
                    pages_off + (uint64_t) npages * SLAB_PAGE_SIZE > z->map_size)
                        return -EUCLEAN;
                z->slab_npages = npages;
                z->slab_pages_off = pages_off;
        }
        *ret = (struct slab){
                .base = zone_bytes(z),
                .st = st,
                .d = (struct pdesc *) (zone_bytes(z) + SLAB_DESC_OFF),
                .pages = zone_bytes(z) + pages_off,
                .npages = npages,
        };
        return 0;
}

static inline uint8_t *page_ptr(const struct slab *s, uint32_t pg) {
        return s->pages + ((uint64_t) pg << SLAB_PAGE_SHIFT);
}

static inline uint64_t page_zoff(const struct slab *s, uint32_t pg) {
        return (uint64_t) (page_ptr(s, pg) - s->base);
}

static void fault(struct slab *s, int err, uint64_t off) {
        s->st->faults++;
        s->st->last_fault = err;
        s->st->last_fault_off = off;
}

static inline void op_begin(struct slab_state *st) {
        st->intent_off = 0;
        st->busy = 1;
        barrier();
}

static inline void op_intent(struct slab_state *st, uint64_t off) {
        st->intent_off = off;
        CRASH_POINT();
}

static inline void op_end(struct slab_state *st) {
        CRASH_POINT();
        st->busy = 0;
        st->intent_off = 0;
}

/* ---- free runs ------------------------------------------------------------------------- */

static inline unsigned bin_of(uint32_t np) {
        if (np < SLAB_EXACT_BINS)
                return np;
        return SLAB_EXACT_BINS + (31 - (unsigned) __builtin_clz(np)) - 6;
}

static inline void bin_mark(struct slab_state *st, unsigned b, bool on) {
        if (on)
                st->bin_mask[b / 64] |= UINT64_C(1) << (b % 64);
        else
                st->bin_mask[b / 64] &= ~(UINT64_C(1) << (b % 64));
}

/* List links of descriptors: false if one points outside the zone. pg < s->npages. */
static bool list_unlink(struct slab *s, uint32_t *head, uint32_t pg) {
        struct pdesc *d = &s->d[pg];
        uint32_t next = LOAD(d->next), prev = LOAD(d->prev);

        if ((next != SLAB_NONE && next >= s->npages) || (prev != SLAB_NONE && prev >= s->npages))
                return false;
        if (prev == SLAB_NONE) {
                if (LOAD(*head) != pg)
                        return false;
                *head = next;
        } else {
                if (LOAD(s->d[prev].next) != pg)
                        return false;
                s->d[prev].next = next;
        }
        if (next != SLAB_NONE)
                s->d[next].prev = prev;
        d->next = SLAB_NONE;
        d->prev = SLAB_NONE;
        CRASH_POINT();
        return true;
}

static bool list_push(struct slab *s, uint32_t *head, uint32_t pg) {
        uint32_t first = LOAD(*head);

        if (first != SLAB_NONE && first >= s->npages)
                return false;
        s->d[pg].next = first;
        s->d[pg].prev = SLAB_NONE;
        if (first != SLAB_NONE)
                s->d[first].prev = pg;
        *head = pg;
        CRASH_POINT();
        return true;
}

/* Makes [h, h+np) a free run; the caller checked that it lies in the zone. */
static bool run_link(struct slab *s, uint32_t h, uint32_t np) {
        struct pdesc *d = &s->d[h];
        unsigned b = bin_of(np);

        d->npages = np;
        d->head = h;
        if (np > 1)
                s->d[h + np - 1] =
                        (struct pdesc){ .type = SLAB_PD_FREE_TAIL, .head = h, .next = SLAB_NONE, .prev = SLAB_NONE };
        CRASH_POINT();
        d->type = SLAB_PD_FREE;
        if (!list_push(s, &s->st->bins[b], h))
                return false;
        bin_mark(s->st, b, true);
        s->st->free_pages += np;
        return true;
}

/* Takes the run at h off its bin; np is its length as the caller read and checked it. */
static bool run_unlink(struct slab *s, uint32_t h, uint32_t np) {
        unsigned b = bin_of(np);

        if (!list_unlink(s, &s->st->bins[b], h))
                return false;
        if (LOAD(s->st->bins[b]) == SLAB_NONE)
                bin_mark(s->st, b, false);
        s->st->free_pages -= np;
        return true;
}

/* Length of the free run that starts at h (< s->npages), read once and checked to fit the zone; 0 if none. */
static inline uint32_t run_len(const struct slab *s, uint32_t h) {
        uint32_t np;

        if (LOAD(s->d[h].type) != SLAB_PD_FREE)
                return 0;
        np = LOAD(s->d[h].npages);
        return np <= s->npages - h ? np : 0;
}

/* Gives pages [h, h+np) back, merging with free neighbours. */
static bool pages_free(struct slab *s, uint32_t h, uint32_t np) {
        uint32_t end;

        /* h and np come from descriptors in the zone: a range past the end would write past them. */
        if (np == 0 || h >= s->npages || np > s->npages - h)
                return false;
        end = h + np;

        if (h > 0) {
                struct pdesc *l = &s->d[h - 1];
                uint8_t lt = LOAD(l->type);
                uint32_t lh = lt == SLAB_PD_FREE ? h - 1 : lt == SLAB_PD_FREE_TAIL ? LOAD(l->head) : SLAB_NONE;
                uint32_t ln = lh < h ? run_len(s, lh) : 0;

                if (ln > 0 && ln == h - lh) {
                        if (!run_unlink(s, lh, ln))
                                return false;
                        s->d[h].type = SLAB_PD_FREE_CONT;
                        l->type = SLAB_PD_FREE_CONT;
                        h = lh;
                }
        }
        if (end < s->npages) {
                uint32_t rn = run_len(s, end);

                RACE_POINT(end);
                if (rn > 0) {
                        if (!run_unlink(s, end, rn))
                                return false;
                        s->d[end].type = SLAB_PD_FREE_CONT;
                        if (rn > 1)
                                s->d[end + rn - 1].type = SLAB_PD_FREE_CONT;
                        end += rn;
                }
        }
        return run_link(s, h, end - h);
}

static bool span_release(struct slab *s, unsigned c, uint32_t h);

/* A span of class c (< SLAB_NCLASSES) at pg, as its descriptor (snapshot d) must say before anything trusts it. */
static bool span_ok(const struct slab *s, uint32_t pg, unsigned c, const struct pdesc *d) {
        return pg < s->npages && d->type == SLAB_PD_SLAB && d->cls == c && d->npages == classes[c].npages &&
               d->npages <= s->npages - pg && d->nfree <= classes[c].nslots;
}

/* Gives every cached empty span back to the page pool. */
static bool reclaim_empty(struct slab *s) {
        bool any = false;

        for (unsigned c = 0; c < SLAB_NCLASSES; c++) {
                struct slab_class_state *cs = &s->st->cls[c];
                uint32_t pg = LOAD(cs->partial), steps = 0;

                while (LOAD(cs->empty) > 0 && pg != SLAB_NONE && pg < s->npages && steps++ < s->npages) {
                        struct pdesc d = pd_load(&s->d[pg]);

                        if (d.type == SLAB_PD_SLAB && d.nfree == classes[c].nslots) {
                                if (!span_ok(s, pg, c, &d)) {
                                        fault(s, -EUCLEAN, page_zoff(s, pg));
                                        return false;
                                }
                                if (!span_release(s, c, pg))
                                        return false;
                                cs->empty--;
                                any = true;
                        }
                        pg = d.next;
                }
        }
        return any;
}

/* Takes np pages off the free runs: the head page index (its type still FREE), SLAB_NONE if full, or -1 corrupt. */
static int64_t pages_alloc(struct slab *s, uint32_t np) {
        struct slab_state *st = s->st;
        unsigned b0 = np < SLAB_EXACT_BINS ? np : bin_of(np) + 1;
        uint32_t h = SLAB_NONE, n = 0;

        if (np == 0 || np > s->npages) /* a run of 0 pages would be handed out and stay free */
                return SLAB_NONE;
        for (int attempt = 0; attempt < 2 && h == SLAB_NONE; attempt++) {
                for (unsigned w = b0 / 64; w < 2 && h == SLAB_NONE; w++) {
                        uint64_t m = LOAD(st->bin_mask[w]);
                        if (w == b0 / 64)
                                m &= ~UINT64_C(0) << (b0 % 64);
                        if (m) {
                                unsigned b = w * 64 + (unsigned) __builtin_ctzll(m);
                                if (b >= SLAB_NBINS)
                                        return -1;
                                h = LOAD(st->bins[b]);
                                if (h >= s->npages)
                                        return -1;
                                n = run_len(s, h);
                                if (n == 0 || n < np)
                                        return -1;
                        }
                }
                if (h == SLAB_NONE && np >= SLAB_EXACT_BINS) {
                        /* Only this bin may hold runs both shorter and longer than np. */
                        uint32_t pg = LOAD(st->bins[bin_of(np)]), steps = 0;
                        while (pg != SLAB_NONE && steps++ < s->npages) {
                                uint32_t pn = pg < s->npages ? run_len(s, pg) : 0;

                                if (pn == 0)
                                        return -1;
                                if (pn >= np) {
                                        h = pg;
                                        n = pn;
                                        break;
                                }
                                pg = LOAD(s->d[pg].next);
                        }
                }
                if (h == SLAB_NONE && (attempt > 0 || !reclaim_empty(s)))
                        return SLAB_NONE;
        }

        RACE_POINT(h);
        if (!run_unlink(s, h, n))
                return -1;
        if (n > np && !run_link(s, h + np, n - np))
                return -1;
        s->d[h].npages = np;
        return h;
}

/* Marks pages (h, h+np) as belonging to the run headed by h. */
static void mark_cont(struct slab *s, uint32_t h, uint32_t np) {
        for (uint32_t i = 1; i < np; i++)
                s->d[h + i] = (struct pdesc){ .type = SLAB_PD_CONT, .head = h, .next = SLAB_NONE, .prev = SLAB_NONE };
        CRASH_POINT();
}

/* ---- spans ----------------------------------------------------------------------------- */

static inline uint64_t *span_words(const struct slab *s, uint32_t h, const struct class_info *ci) {
        return (uint64_t *) (page_ptr(s, h) + ci->bits_off);
}

static inline uint64_t low_bits(uint32_t n) {
        return n >= 64 ? ~UINT64_C(0) : (UINT64_C(1) << n) - 1;
}

static void span_fill_bitmap(struct slab *s, uint32_t h, const struct class_info *ci) {
        if (ci->nwords == 0) {
                s->d[h].bits = low_bits(ci->nslots);
                return;
        }
        uint64_t *w = span_words(s, h, ci);
        for (uint32_t i = 0; i < ci->nwords; i++)
                w[i] = low_bits(ci->nslots - i * 64);
        s->d[h].bits = low_bits(ci->nwords);
}

static int64_t span_new(struct slab *s, unsigned c) {
        const struct class_info *ci = &classes[c];
        int64_t r = pages_alloc(s, ci->npages);
        uint32_t h;

        if (r < 0 || r == SLAB_NONE)
                return r;
        h = (uint32_t) r;
        /* The bitmap before the type: a span that exists is never half-initialised. */
        span_fill_bitmap(s, h, ci);
        s->d[h].cls = (uint8_t) c;
        s->d[h].nfree = (uint16_t) ci->nslots;
        s->d[h].npages = ci->npages;
        s->d[h].head = h;
        mark_cont(s, h, ci->npages);
        barrier();
        s->d[h].type = SLAB_PD_SLAB;
        s->st->cls[c].spans++;
        s->st->cls[c].empty++;
        if (!list_push(s, &s->st->cls[c].partial, h))
                return -1;
        return h;
}

/* Unlinks an empty span and gives its pages back; the caller keeps `empty` right. */
static bool span_release(struct slab *s, unsigned c, uint32_t h) {
        struct slab_class_state *cs = &s->st->cls[c];

        if (!list_unlink(s, &cs->partial, h))
                return false;
        cs->spans--;
        s->d[h].type = SLAB_PD_FREE_CONT;
        return pages_free(s, h, classes[c].npages);
}

/* ---- allocation ------------------------------------------------------------------------ */

static inline __attribute__((always_inline)) void *alloc_small(struct slab *s, unsigned c) {
        const struct class_info *ci = &classes[c];
        struct slab_class_state *cs = &s->st->cls[c];
        uint32_t h = LOAD(cs->partial), slot;
        struct pdesc *d, pd;
        uint64_t off;

        cs->reqs++;
        if (h == SLAB_NONE) {
                int64_t r = span_new(s, c);
                if (r < 0)
                        return SLAB_MAP_CORRUPT;
                if (r == SLAB_NONE) {
                        cs->fails++;
                        return NULL;
                }
                h = (uint32_t) r;
        }
        if (h >= s->npages)
                return SLAB_MAP_CORRUPT;
        d = &s->d[h];
        pd = pd_load_block(d);
        if (!span_ok(s, h, c, &pd) || pd.nfree == 0 || pd.bits == 0)
                return SLAB_MAP_CORRUPT;

        if (ci->nwords == 0) {
                slot = (uint32_t) __builtin_ctzll(pd.bits);
                if (slot >= ci->nslots)
                        return SLAB_MAP_CORRUPT;
                off = page_zoff(s, h) + (uint64_t) slot * ci->size;
                op_intent(s->st, off);
                d->bits = pd.bits & (pd.bits - 1);
                CRASH_POINT();
        } else {
                unsigned w = (unsigned) __builtin_ctzll(pd.bits);
                uint64_t *words = span_words(s, h, ci), word;

                if (w >= ci->nwords)
                        return SLAB_MAP_CORRUPT;
                word = LOAD(words[w]);
                if (word == 0)
                        return SLAB_MAP_CORRUPT;
                slot = w * 64 + (unsigned) __builtin_ctzll(word);
                if (slot >= ci->nslots)
                        return SLAB_MAP_CORRUPT;
                off = page_zoff(s, h) + (uint64_t) slot * ci->size;
                op_intent(s->st, off);
                word &= word - 1;
                words[w] = word;
                CRASH_POINT();
                if (word == 0)
                        d->bits = pd.bits & ~(UINT64_C(1) << w);
        }
        if (pd.nfree == ci->nslots)
                cs->empty--;
        d->nfree = (uint16_t) (pd.nfree - 1);
        if (pd.nfree == 1 && !list_unlink(s, &cs->partial, h))
                return SLAB_MAP_CORRUPT;
        cs->used++;
        return s->base + off;
}

__attribute__((noinline)) static void *alloc_large(struct slab *s, size_t n) {
        /* Rounded up without adding first: n + SLAB_PAGE_SIZE - 1 wraps to 0 pages near SIZE_MAX. */
        uint64_t np64 = ((uint64_t) n >> SLAB_PAGE_SHIFT) + ((n & (SLAB_PAGE_SIZE - 1)) != 0);
        int64_t r;
        uint32_t h;

        s->st->large_reqs++;
        if (np64 > s->npages) {
                s->st->large_fails++;
                return NULL;
        }
        r = pages_alloc(s, (uint32_t) np64);
        if (r < 0)
                return SLAB_MAP_CORRUPT;
        if (r == SLAB_NONE) {
                s->st->large_fails++;
                return NULL;
        }
        h = (uint32_t) r;
        op_intent(s->st, page_zoff(s, h));
        mark_cont(s, h, (uint32_t) np64);
        s->d[h].head = h;
        barrier();
        s->d[h].type = SLAB_PD_LARGE;
        s->st->large_pages += np64;
        s->st->large_used++;
        return page_ptr(s, h);
}

/* ---- free ------------------------------------------------------------------------------ */

/* Frees the block at zone offset off: 0, -EINVAL, -EALREADY or -EUCLEAN. */
static inline __attribute__((always_inline)) int free_off(struct slab *s, uint64_t off) {
        uint64_t poff = (uint64_t) (s->pages - s->base);
        uint32_t pg, h, nfree;
        struct pdesc *d, pd;

        if (off < poff || off >= poff + ((uint64_t) s->npages << SLAB_PAGE_SHIFT))
                return -EINVAL;
        pg = (uint32_t) ((off - poff) >> SLAB_PAGE_SHIFT);
        h = pg;
        pd = pd_load_block(&s->d[pg]);
        switch (pd.type) {
        case SLAB_PD_SLAB:
        case SLAB_PD_LARGE:
                break;
        case SLAB_PD_CONT:
                h = pd.head;
                if (h >= pg)
                        return -EALREADY;
                pd = pd_load_block(&s->d[h]);
                if ((pd.type != SLAB_PD_SLAB && pd.type != SLAB_PD_LARGE) || pd.npages <= pg - h)
                        return -EALREADY; /* a stale page of a block freed earlier */
                break;
        case SLAB_PD_FREE:
        case SLAB_PD_FREE_TAIL:
        case SLAB_PD_FREE_CONT:
        case SLAB_PD_UNUSED:
                return -EALREADY;
        default:
                return -EUCLEAN;
        }
        d = &s->d[h];
        if (pd.npages == 0 || pd.npages > s->npages - h)
                return -EUCLEAN;

        if (pd.type == SLAB_PD_LARGE) {
                if (off != page_zoff(s, h))
                        return -EINVAL;
                op_intent(s->st, off);
                d->type = SLAB_PD_FREE_CONT;
                CRASH_POINT();
                s->st->large_pages -= pd.npages;
                s->st->large_used--;
                return pages_free(s, h, pd.npages) ? 0 : -EUCLEAN;
        }

        unsigned c = pd.cls;
        if (c >= SLAB_NCLASSES || pd.npages != classes[c].npages)
                return -EUCLEAN;
        const struct class_info *ci = &classes[c];
        struct slab_class_state *cs = &s->st->cls[c];
        /* rel < SLAB_MAX_SPAN_PAGES pages (2^16) and size <= 2^14: rel * size < 2^32 keeps the quotient exact. */
        uint32_t rel = (uint32_t) (off - page_zoff(s, h)), slot = (uint32_t) (((uint64_t) rel * ci->recip) >> 32);

        if (slot * ci->size != rel || slot >= ci->nslots)
                return -EINVAL;
        if (pd.nfree >= ci->nslots)
                return pd.nfree == ci->nslots ? -EALREADY : -EUCLEAN;

        if (ci->nwords == 0) {
                if (pd.bits & (UINT64_C(1) << slot))
                        return -EALREADY;
                op_intent(s->st, off);
                d->bits = pd.bits | UINT64_C(1) << slot;
                CRASH_POINT();
        } else {
                uint64_t *w = span_words(s, h, ci) + slot / 64, word = LOAD(*w);

                if (word & (UINT64_C(1) << (slot % 64)))
                        return -EALREADY;
                op_intent(s->st, off);
                *w = word | UINT64_C(1) << (slot % 64);
                CRASH_POINT();
                d->bits = pd.bits | UINT64_C(1) << (slot / 64);
        }
        cs->used--;
        nfree = pd.nfree + 1u;
        d->nfree = (uint16_t) nfree;
        if (nfree == 1 && !list_push(s, &cs->partial, h))
                return -EUCLEAN;
        if (nfree == ci->nslots) {
                /* Keep one empty span per class; a second one goes back to the pages. */
                if (LOAD(cs->empty) >= 1)
                        return span_release(s, c, h) ? 0 : -EUCLEAN;
                cs->empty++;
        }
        return 0;
}

/* ---- check and repair ------------------------------------------------------------------ */

/* The span at h, whose descriptor said `bits`: is its bitmap sound, and how many slots are free. */
static bool span_bitmap_ok(const struct slab *s, uint32_t h, const struct class_info *ci, uint64_t bits,
                           uint32_t *ret_free) {
        uint32_t nfree = 0;

        if (ci->nwords == 0) {
                if (bits & ~low_bits(ci->nslots))
                        return false;
                nfree = (uint32_t) __builtin_popcountll(bits);
        } else {
                const uint64_t *w = span_words(s, h, ci);
                uint64_t summary = 0;

                for (uint32_t i = 0; i < ci->nwords; i++) {
                        uint64_t wi = LOAD(w[i]);

                        if (wi & ~low_bits(ci->nslots - i * 64))
                                return false;
                        if (wi)
                                summary |= UINT64_C(1) << i;
                        nfree += (uint32_t) __builtin_popcountll(wi);
                }
                if (summary != bits)
                        return false;
        }
        *ret_free = nfree;
        return true;
}

static bool cont_ok(const struct slab *s, uint32_t h, uint32_t np) {
        for (uint32_t i = 1; i < np; i++)
                if (LOAD(s->d[h + i].type) != SLAB_PD_CONT || LOAD(s->d[h + i].head) != h)
                        return false;
        return true;
}

/* Number of inconsistencies; 0 = the allocator is sound. Reads only. */
static uint64_t slab_validate(struct slab *s) {
        struct slab_state *st = s->st;
        uint64_t bad = 0, free_pages = 0, large_pages = 0, large_used = 0;
        uint64_t spans[SLAB_NCLASSES] = {}, used[SLAB_NCLASSES] = {}, partial[SLAB_NCLASSES] = {},
                 empty[SLAB_NCLASSES] = {};
        uint64_t runs[SLAB_NBINS] = {};
        bool prev_free = false;

        if (LOAD(st->busy))
                bad++;
        for (uint32_t i = 0; i < s->npages;) {
                struct pdesc d = pd_load(&s->d[i]);
                uint32_t np = d.npages, nfree;

                if (np == 0 || np > s->npages - i) {
                        bad++;
                        i++;
                        prev_free = false;
                        continue;
                }
                switch (d.type) {
                case SLAB_PD_SLAB: {
                        unsigned c = d.cls;
                        if (c >= SLAB_NCLASSES || np != classes[c].npages || !cont_ok(s, i, np) ||
                            !span_bitmap_ok(s, i, &classes[c], d.bits, &nfree) || nfree != d.nfree) {
                                bad++;
                                break;
                        }
                        spans[c]++;
                        used[c] += classes[c].nslots - nfree;
                        partial[c] += nfree > 0;
                        empty[c] += nfree == classes[c].nslots;
                        break;
                }
                case SLAB_PD_LARGE:
                        if (!cont_ok(s, i, np))
                                bad++;
                        large_pages += np;
                        large_used++;
                        break;
                case SLAB_PD_FREE:
                        if (prev_free || (np > 1 && (LOAD(s->d[i + np - 1].type) != SLAB_PD_FREE_TAIL ||
                                                     LOAD(s->d[i + np - 1].head) != i)))
                                bad++;
                        runs[bin_of(np)]++;
                        free_pages += np;
                        break;
                default:
                        bad++;
                        np = 1;
                }
                prev_free = d.type == SLAB_PD_FREE;
                i += np;
        }

        /* Lists: bounded walks, every entry of the right kind, back links right, counts matching. */
        for (unsigned c = 0; c < SLAB_NCLASSES; c++) {
                uint32_t pg = LOAD(st->cls[c].partial), prev = SLAB_NONE;
                uint64_t n = 0;

                while (pg != SLAB_NONE && n <= s->npages) {
                        struct pdesc d;

                        if (pg >= s->npages) {
                                bad++;
                                break;
                        }
                        d = pd_load(&s->d[pg]);
                        if (d.type != SLAB_PD_SLAB || d.cls != c || d.nfree == 0 || d.prev != prev) {
                                bad++;
                                break;
                        }
                        n++;
                        prev = pg;
                        pg = d.next;
                }
                if (n != partial[c] || LOAD(st->cls[c].spans) != spans[c] || LOAD(st->cls[c].used) != used[c] ||
                    LOAD(st->cls[c].empty) != empty[c] || empty[c] > 1) {
                        bad++;
                }
        }
        for (unsigned b = 0; b < SLAB_NBINS; b++) {
                uint32_t pg = LOAD(st->bins[b]), prev = SLAB_NONE;
                uint64_t n = 0;

                while (pg != SLAB_NONE && n <= s->npages) {
                        uint32_t rn = pg < s->npages ? run_len(s, pg) : 0;

                        if (rn == 0 || bin_of(rn) != b || LOAD(s->d[pg].prev) != prev) {
                                bad++;
                                break;
                        }
                        n++;
                        prev = pg;
                        pg = LOAD(s->d[pg].next);
                }
                if (n != runs[b] || !!(LOAD(st->bin_mask[b / 64]) & (UINT64_C(1) << (b % 64))) != (n > 0))
                        bad++;
        }
        if (LOAD(st->free_pages) != free_pages || LOAD(st->large_pages) != large_pages ||
            LOAD(st->large_used) != large_used)
                bad++;
        return bad;
}

/*
 * Rebuilds lists and counters from the descriptors and bitmaps, then finishes
 * the operation a dead process left under way: the block it was about is freed
 * if it is allocated (a free rolls forward, an allocation nobody received rolls
 * back). Pages that no valid head claims become free.
 */
__attribute__((noinline, cold)) static void slab_repair(struct slab *s) {
        struct slab_state *st = s->st;
        uint64_t intent = LOAD(st->busy) ? LOAD(st->intent_off) : 0;
        uint32_t run = SLAB_NONE;

        st->busy = 1;
        st->intent_off = 0;
        st->free_pages = st->large_pages = st->large_used = 0;
        st->bin_mask[0] = st->bin_mask[1] = 0;
        for (unsigned b = 0; b < SLAB_NBINS; b++)
                st->bins[b] = SLAB_NONE;
        for (unsigned c = 0; c < SLAB_NCLASSES; c++) {
                st->cls[c].partial = SLAB_NONE;
                st->cls[c].empty = 0;
                st->cls[c].spans = 0;
                st->cls[c].used = 0;
        }

        for (uint32_t i = 0; i < s->npages;) {
                struct pdesc *d = &s->d[i];
                /* One read: the type that says "keep" must be the type that says what c indexes. */
                struct pdesc pd = pd_load(d);
                uint32_t np = pd.npages, nfree = 0;
                unsigned c = pd.cls;
                bool keep = false;

                if (np >= 1 && np <= s->npages - i) {
                        if (pd.type == SLAB_PD_LARGE)
                                keep = true;
                        else if (pd.type == SLAB_PD_SLAB && c < SLAB_NCLASSES && np == classes[c].npages)
                                keep = true;
                }
                RACE_POINT(i);
                if (keep && pd.type == SLAB_PD_SLAB) {
                        const struct class_info *ci = &classes[c];

                        /* Bits past the last slot are cleared; the summary word is recomputed. */
                        if (ci->nwords == 0) {
                                uint64_t bits = pd.bits & low_bits(ci->nslots);

                                d->bits = bits;
                                nfree = (uint32_t) __builtin_popcountll(bits);
                        } else {
                                uint64_t *w = span_words(s, i, ci), summary = 0;

                                for (uint32_t k = 0; k < ci->nwords; k++) {
                                        uint64_t wk = LOAD(w[k]) & low_bits(ci->nslots - k * 64);

                                        w[k] = wk;
                                        if (wk)
                                                summary |= UINT64_C(1) << k;
                                        nfree += (uint32_t) __builtin_popcountll(wk);
                                }
                                d->bits = summary;
                        }
                        d->nfree = (uint16_t) nfree;
                        /* A second empty span goes back to the pages, as free_off() would have done. */
                        if (nfree == ci->nslots && LOAD(st->cls[c].empty) >= 1)
                                keep = false;
                }
                if (!keep) {
                        /* Decided before any run is closed, so that neighbouring free pages stay one run. */
                        uint32_t n = pd.type == SLAB_PD_SLAB && np >= 1 && np <= s->npages - i ? np : 1;
                        if (run == SLAB_NONE)
                                run = i;
                        for (uint32_t k = 0; k < n; k++)
                                s->d[i + k].type = SLAB_PD_FREE_CONT;
                        i += n;
                        continue;
                }
                if (run != SLAB_NONE) {
                        (void) run_link(s, run, i - run);
                        run = SLAB_NONE;
                }
                mark_cont(s, i, np);
                d->head = i;
                d->next = SLAB_NONE;
                d->prev = SLAB_NONE;
                if (pd.type == SLAB_PD_LARGE) {
                        st->large_pages += np;
                        st->large_used++;
                } else {
                        st->cls[c].spans++;
                        st->cls[c].used += classes[c].nslots - nfree;
                        if (nfree == classes[c].nslots)
                                st->cls[c].empty++;
                        if (nfree > 0)
                                (void) list_push(s, &st->cls[c].partial, i);
                }
                i += np;
        }
        if (run != SLAB_NONE)
                (void) run_link(s, run, s->npages - run);

        if (intent != 0)
                (void) free_off(s, intent);
        st->repairs++;
        op_end(st);
}

/* ---- entry points ---------------------------------------------------------------------- */

__attribute__((noinline, cold)) static int slab_format(struct shmz_zone *z) {
        struct slab_state *st = state_of(z);
        uint32_t npages = npages_for(z->map_size);
        struct slab s;

        if (npages == 0)
                return -ENOSPC;
        memset(st, 0, sizeof(*st));
        /* The area may have been used raw before: descriptors must not carry old types. */
        memset(zone_bytes(z) + SLAB_DESC_OFF, 0, (size_t) npages * sizeof(struct pdesc));
        st->version = SLAB_VERSION;
        st->npages = npages;
        st->pages_off = pages_off_for(npages);
        for (unsigned b = 0; b < SLAB_NBINS; b++)
                st->bins[b] = SLAB_NONE;
        for (unsigned c = 0; c < SLAB_NCLASSES; c++)
                st->cls[c].partial = SLAB_NONE;
        st->magic = SLAB_MAGIC;
        if (slab_get(z, &s) < 0)
                return -EUCLEAN;
        (void) run_link(&s, 0, npages);
        __atomic_store_n(&z->hdr->alloc_state, SHMZ_ZONE_ALLOC_FORMATTED, __ATOMIC_RELEASE);
        return 0;
}

/* With the zone lock held: a usable allocator, formatted and repaired if need be. */
static inline __attribute__((always_inline)) int slab_enter(struct shmz_zone *z, struct slab *ret) {
        int r;

        if (_unlikely_(!formatted(z))) {
                r = slab_format(z);
                if (r < 0)
                        return r;
        }
        r = slab_get(z, ret);
        if (_unlikely_(r < 0)) {
                fault(&(struct slab){ .st = state_of(z) }, r, 0);
                return r;
        }
        if (_unlikely_(LOAD(ret->st->busy)))
                slab_repair(ret); /* somebody died in the middle of an operation */
        return 0;
}

/*
 * Takes the zone lock: 0, SHMZ_OWNER_DEAD or -errno. After a dead holder the
 * allocator repairs its own state, but the death is not ours to acknowledge:
 * the lock may guard the caller's structures too, so zone_unlock() leaves it
 * inconsistent and the next shmz_mutex_lock() still gets SHMZ_OWNER_DEAD until
 * somebody calls shmz_mutex_consistent(). A death passed on like that was seen
 * already: only an operation left under way (busy) needs the allocator's repair,
 * not a full validation at every call.
 */
static int zone_lock(struct shmz_zone *z) {
        struct shmz_mutex *m = &z->hdr->lock;
        int r;

        r = shmz_mutex_lock(m);
        if (_unlikely_(r == SHMZ_OWNER_DEAD)) {
                struct slab s;

                if (formatted(z) && slab_get(z, &s) >= 0 &&
                    (LOAD(s.st->busy) || (mutex_last_lock_found_death() && slab_validate(&s) > 0)))
                        slab_repair(&s);
        }
        return r;
}

static void zone_unlock(struct shmz_zone *z, int locked) {
        if (_unlikely_(locked == SHMZ_OWNER_DEAD))
                (void) mutex_unlock_pass_death(&z->hdr->lock);
        else
                (void) shmz_mutex_unlock(&z->hdr->lock);
}

/*
 * Metadata that lied to an allocation (op under way): count it, rebuild from
 * the descriptors, try once more. NULL with errno set on failure.
 */
__attribute__((noinline, cold)) static void *alloc_after_fault(struct slab *s, size_t n) {
        int c = class_of(n);
        void *p;

        fault(s, -EUCLEAN, s->st->intent_off);
        slab_repair(s);
        op_begin(s->st);
        p = c >= 0 ? alloc_small(s, (unsigned) c) : alloc_large(s, n);
        if (p == SLAB_MAP_CORRUPT) {
                fault(s, -EUCLEAN, s->st->intent_off);
                slab_repair(s);
                errno = EUCLEAN;
                return NULL;
        }
        op_end(s->st);
        if (!p)
                errno = ENOMEM;
        return p;
}

_public_ void *shmz_alloc_locked(struct shmz_zone *z, size_t n) {
        struct slab s;
        void *p;
        int r, c;

        if (!z) {
                errno = EINVAL;
                return NULL;
        }
        if (z->rdonly) {
                errno = EROFS;
                return NULL;
        }
        r = slab_enter(z, &s);
        if (_unlikely_(r < 0)) {
                errno = -r;
                return NULL;
        }
        c = class_of(n);
        op_begin(s.st);
        p = c >= 0 ? alloc_small(&s, (unsigned) c) : alloc_large(&s, n);
        if (_unlikely_(p == SLAB_MAP_CORRUPT))
                return alloc_after_fault(&s, n);
        op_end(s.st);
        if (_unlikely_(!p))
                errno = ENOMEM;
        return p;
}

_public_ int shmz_free_checked_locked(struct shmz_zone *z, void *p) {
        struct slab s;
        uint64_t off;
        int r;

        assert_return(z, -EINVAL);
        if (!p)
                return 0;
        if (z->rdonly)
                return -EROFS;
        r = slab_enter(z, &s);
        if (r < 0)
                return r;
        off = (uintptr_t) p - (uintptr_t) s.base;
        if ((uintptr_t) p < (uintptr_t) s.base || off >= z->map_size) {
                fault(&s, -EINVAL, 0);
                return -EINVAL;
        }
        op_begin(s.st);
        r = free_off(&s, off);
        op_end(s.st);
        if (r < 0) {
                fault(&s, r, off);
                if (r == -EUCLEAN)
                        slab_repair(&s);
        }
        return r;
}

_public_ void shmz_free_locked(struct shmz_zone *z, void *p) {
        (void) shmz_free_checked_locked(z, p);
}

_public_ void *shmz_alloc(struct shmz_zone *z, size_t n) {
        void *p;
        int r, err;

        if (!z || z->rdonly) {
                errno = z ? EROFS : EINVAL;
                return NULL;
        }
        r = zone_lock(z);
        if (r < 0) {
                errno = -r;
                return NULL;
        }
        p = shmz_alloc_locked(z, n);
        err = errno;
        zone_unlock(z, r);
        errno = err;
        return p;
}

_public_ void *shmz_calloc(struct shmz_zone *z, size_t n) {
        void *p = shmz_alloc(z, n);

        /* Recycled blocks keep old bytes; fresh pages of a memfd are zero but not worth tracking. */
        if (p)
                memset(p, 0, n);
        return p;
}

_public_ int shmz_free_checked(struct shmz_zone *z, void *p) {
        int r, locked;

        assert_return(z, -EINVAL);
        if (!p)
                return 0;
        if (z->rdonly)
                return -EROFS;
        locked = zone_lock(z);
        if (locked < 0)
                return locked;
        r = shmz_free_checked_locked(z, p);
        zone_unlock(z, locked);
        return r;
}

_public_ void shmz_free(struct shmz_zone *z, void *p) {
        (void) shmz_free_checked(z, p);
}

_public_ int shmz_zone_check_locked(struct shmz_zone *z, unsigned flags) {
        struct slab s;
        int r;

        assert_return(z, -EINVAL);
        if (!formatted(z))
                return 0;
        r = slab_get(z, &s);
        if (r < 0)
                return r; /* the layout itself is gone: nothing to rebuild from */
        if (slab_validate(&s) == 0)
                return 0;
        if (!(flags & SHMZ_CHECK_REPAIR))
                return -EUCLEAN;
        if (z->rdonly)
                return -EROFS;
        slab_repair(&s);
        return slab_validate(&s) == 0 ? 1 : -EUCLEAN;
}

_public_ int shmz_zone_check(struct shmz_zone *z) {
        int r, locked;

        assert_return(z, -EINVAL);
        if (z->rdonly)
                return shmz_zone_check_locked(z, 0); /* cannot lock: a snapshot, may race */
        locked = zone_lock(z);
        if (locked < 0)
                return locked;
        r = shmz_zone_check_locked(z, 0);
        zone_unlock(z, locked);
        return r;
}

static int alloc_stats(struct shmz_zone *z, struct shmz_alloc_stats *ret) {
        struct slab s;
        int locked = -1, r = 0;

        assert_return(z, -EINVAL);
        assert_return(ret, -EINVAL);
        memset(ret, 0, sizeof(*ret));
        ret->page_size = SLAB_PAGE_SIZE;
        ret->nclasses = SLAB_NCLASSES;
        for (unsigned c = 0; c < SLAB_NCLASSES; c++)
                ret->classes[c].size = classes[c].size;
        if (!formatted(z))
                return 0;
        if (!z->rdonly) {
                locked = zone_lock(z);
                if (locked < 0)
                        return locked;
        }
        r = slab_get(z, &s);
        if (r < 0)
                goto out;

        struct slab_state *st = s.st;
        ret->pages_total = s.npages;
        ret->pages_free = st->free_pages;
        ret->pages_large = st->large_pages;
        ret->large_used = st->large_used;
        ret->large_reqs = st->large_reqs;
        ret->large_fails = st->large_fails;
        ret->faults = st->faults;
        ret->repairs = st->repairs;
        ret->last_fault = st->last_fault;
        ret->last_fault_offset = st->last_fault_off;
        for (unsigned c = 0; c < SLAB_NCLASSES; c++) {
                ret->classes[c].total = st->cls[c].spans * classes[c].nslots;
                ret->classes[c].used = st->cls[c].used;
                ret->classes[c].reqs = st->cls[c].reqs;
                ret->classes[c].fails = st->cls[c].fails;
                ret->pages_slab += st->cls[c].spans * classes[c].npages;
        }
        /* The largest run lives in the highest non-empty bin; only the top bins are not exact. */
        for (int b = SLAB_NBINS - 1; b >= 0; b--) {
                uint32_t pg = LOAD(st->bins[b]), steps = 0, best = 0;

                if (!(LOAD(st->bin_mask[b / 64]) & (UINT64_C(1) << (b % 64))))
                        continue;
                while (pg != SLAB_NONE && pg < s.npages && steps++ < s.npages) {
                        uint32_t np = LOAD(s.d[pg].npages); /* MIN and MAX would read it up to four times */

                        best = MAX(best, MIN(np, s.npages));
                        pg = LOAD(s.d[pg].next);
                }
                ret->largest_free_run = best;
                break;
        }
out:
        if (locked >= 0)
                zone_unlock(z, locked);
        return r;
}

_public_ int shmz_zone_alloc_stats_sized(struct shmz_zone *z, struct shmz_alloc_stats *ret, size_t ret_size) {
        struct shmz_alloc_stats st;
        int r;

        assert_return(ret, -EINVAL);
        r = alloc_stats(z, &st);
        if (r >= 0)
                copy_sized(ret, ret_size, &st, sizeof(st));
        return r;
}

_public_ struct shmz_mutex *shmz_zone_mutex(struct shmz_zone *z) {
        return z ? &z->hdr->lock : NULL;
}

_public_ uint64_t shmz_offset(const struct shmz_zone *z, const void *p) {
        uintptr_t base, q = (uintptr_t) p;

        if (!z || !p)
                return 0;
        base = (uintptr_t) z->hdr;
        if (q < base + SHMZ_ZONE_HEADER_SIZE || q - base >= z->map_size)
                return 0;
        return q - base;
}

_public_ void *shmz_pointer(struct shmz_zone *z, uint64_t off) {
        if (!z || off < SHMZ_ZONE_HEADER_SIZE || off >= z->map_size)
                return NULL;
        return zone_bytes(z) + off;
}

_public_ void *shmz_zone_root(struct shmz_zone *z) {
        if (!z)
                return NULL;
        return shmz_pointer(z, __atomic_load_n(&z->hdr->root, __ATOMIC_ACQUIRE));
}

_public_ int shmz_zone_set_root(struct shmz_zone *z, void *p) {
        uint64_t off;

        assert_return(z, -EINVAL);
        if (z->rdonly)
                return -EROFS;
        off = shmz_offset(z, p);
        if (p && off == 0)
                return -EINVAL;
        /* Release: whoever reads the offset also sees the object it leads to. */
        __atomic_store_n(&z->hdr->root, off, __ATOMIC_RELEASE);
        return 0;
}
