/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The allocator against a hostile co-user of its zone: each input is a script
 * of allocations, frees, checks and writes into the allocator's own state
 * (the header's alloc[] area, the page descriptors, the pages), run on a zone
 * restored to a freshly formatted copy first.
 *
 * The zone sits in the middle of a large PROT_NONE reservation, so any access
 * the allocator makes outside it faults, however far off (the zone is mmapped
 * memory: AddressSanitizer does not watch it). Every block returned must lie
 * in the page area with the promised alignment, whatever the metadata says.
 * Scripts that never wrote the metadata must also see a sound allocator:
 * blocks that do not overlap, frees that succeed, checks that pass.
 *
 * Script: a byte per operation, its low 3 bits the operation, the high 5 a
 * parameter, then its operands.
 */
#include <sys/mman.h>

#include "fuzz-util.h"
#include "mutex.h"
#include "shmzone.h"
#include "slab.h"
#include "zone.h"

#define ZONE_SIZE (1u << 20)
/* Guard on either side: more than any page or descriptor index that slips a check could reach in a 1 MiB zone. */
#define GUARD_SIZE (UINT64_C(1) << 32)
#define MAX_OPS 256u
/* Every block of a script fits: a block we lost track of would make a legitimate free look stray. */
#define MAX_LIVE MAX_OPS

enum {
        OP_ALLOC_SMALL, /* param, u8: size of a small class */
        OP_ALLOC_LARGE, /* u16: size in 16-byte units, up to more than the zone */
        OP_FREE,        /* u8: which live block */
        OP_FREE_STRAY,  /* u32: any address near the zone */
        OP_POKE_META,   /* u16 offset, u8 value: alloc state and descriptors */
        OP_POKE_META32, /* u16 offset (4-aligned), u32 value; param bit 0: only the low 10 bits (page indexes) */
        OP_POKE_PAGE,   /* u32 offset, u64 value (8-aligned): bitmaps at the end of spans, or anything */
        OP_CHECK,       /* param % 4: check, check+repair (locked), stats, alloc with the lock held */
};

struct block {
        uint8_t *p;
        size_t n;
};

static struct shmz_zone *zone;
static uint8_t *pristine;
static uint64_t meta_len; /* bytes from the header's alloc[] to the end of the descriptors */

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv) {
        const struct slab_state *st;
        uint8_t *reserve, *map;
        void *p;

        if (zone_new_anonymous("fuzz-slab", ZONE_SIZE, &zone) < 0)
                abort();
        /* Moved into the middle of the reservation: mremap(MREMAP_FIXED) replaces that part of it atomically. */
        reserve = mmap(NULL, zone->map_size + 2 * GUARD_SIZE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (reserve == MAP_FAILED)
                abort();
        map = mremap(zone->hdr, zone->map_size, zone->map_size, MREMAP_MAYMOVE | MREMAP_FIXED, reserve + GUARD_SIZE);
        if (map == MAP_FAILED)
                abort();
        zone->hdr = (struct shmz_zone_header *) map;

        /* Formatted by its first use. */
        p = shmz_alloc(zone, 8);
        if (!p || shmz_free_checked(zone, p) < 0 || shmz_zone_check(zone) != 0)
                abort();
        st = (const struct slab_state *) zone->hdr->alloc;
        meta_len = st->pages_off - offsetof(struct shmz_zone_header, alloc);

        pristine = malloc(zone->map_size);
        if (!pristine)
                abort();
        memcpy(pristine, zone->hdr, zone->map_size);
        return 0;
}

static const struct slab_state *state(void) {
        return (const struct slab_state *) zone->hdr->alloc;
}

/* A block just returned for n bytes: inside the page area as the state describes it, aligned as promised. */
static void check_block(const uint8_t *p, size_t n) {
        const uint8_t *base = zone_bytes(zone);
        uint64_t off = (uint64_t) (p - base), pages_off = state()->pages_off,
                 end = pages_off + (uint64_t) state()->npages * SLAB_PAGE_SIZE;
        int c = slab_class_of(n);

        fuzz_assert(p >= base && off >= pages_off && off <= end && n <= end - off,
                    "block of %zu bytes at offset %#llx, pages %#llx..%#llx", n, (unsigned long long) off,
                    (unsigned long long) pages_off, (unsigned long long) end);
        fuzz_assert(end <= zone->map_size, "page area ends at %#llx, zone at %#llx", (unsigned long long) end,
                    (unsigned long long) zone->map_size);
        if (c < 0)
                fuzz_assert(off % SLAB_PAGE_SIZE == 0, "large block at %#llx", (unsigned long long) off);
        else
                fuzz_assert(off % (slab_class_size((unsigned) c) % 16 == 0 ? 16 : 8) == 0, "%zu-byte block at %#llx", n,
                            (unsigned long long) off);
}

static void check_disjoint(const struct block *live, size_t n_live, const struct block *b) {
        for (size_t i = 0; i < n_live; i++)
                fuzz_assert(b->p + b->n <= live[i].p || live[i].p + live[i].n <= b->p,
                            "block %p+%zu overlaps live block %p+%zu", (void *) b->p, b->n, (void *) live[i].p,
                            live[i].n);
}

static void add_block(struct block *live, size_t *n_live, bool poked, void *p, size_t n) {
        struct block b = { .p = p, .n = n };

        check_block(p, n);
        if (!poked)
                check_disjoint(live, *n_live, &b);
        /* The owner writes its block: that must never disturb the allocator (a span's bitmap lives past its slots). */
        if (n <= SHMZ_ALLOC_MAX_CLASS)
                memset(p, 0xff, n);
        else if (n > 0) {
                b.p[0] = 0xff;
                b.p[n - 1] = 0xff;
        }
        fuzz_assert(*n_live < MAX_LIVE, "more live blocks than operations");
        live[(*n_live)++] = b;
}

/* The layout slab_get() accepts: with it, the descriptors are there to rebuild from. */
static bool layout_sound(void) {
        const struct slab_state *st = state();
        uint64_t pages_off = (SLAB_DESC_OFF + (uint64_t) st->npages * sizeof(struct pdesc) + SLAB_PAGE_SIZE - 1) &
                             ~(uint64_t) (SLAB_PAGE_SIZE - 1);

        return st->magic == SLAB_MAGIC && st->npages != 0 && st->npages != SLAB_NONE && st->pages_off == pages_off &&
               pages_off + (uint64_t) st->npages * SLAB_PAGE_SIZE <= zone->map_size;
}

static void drop_block(struct block *live, size_t *n_live, size_t i) {
        live[i] = live[--*n_live];
}

static void *alloc_locked(size_t n) {
        struct shmz_mutex *m = shmz_zone_mutex(zone);
        int r = shmz_mutex_lock(m);
        void *p;

        fuzz_assert(r >= 0, "lock: %s", strerror(-r));
        p = shmz_alloc_locked(zone, n);
        (void) shmz_mutex_unlock(m);
        return p;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct cursor in = { .p = data, .n = size };
        struct block live[MAX_LIVE];
        size_t n_live = 0;
        bool poked = false; /* the script wrote the allocator's state: it may lie from here on */
        uint8_t *base = zone_bytes(zone);

        memcpy(base, pristine, zone->map_size);

        for (unsigned k = 0; k < MAX_OPS && in.n > 0; k++) {
                uint8_t op = take_u8(&in), param = op >> 3;
                size_t n;
                void *p;
                int r;

                switch (op & 7) {
                case OP_ALLOC_SMALL:
                case OP_ALLOC_LARGE:
                case OP_CHECK:
                        if ((op & 7) == OP_CHECK && param % 4 != 3) {
                                struct shmz_alloc_stats st;
                                struct shmz_mutex *m;

                                if (param % 4 == 0) {
                                        r = shmz_zone_check(zone);
                                        fuzz_assert(poked || r == 0, "check of an untouched allocator: %d", r);
                                } else if (param % 4 == 1) {
                                        m = shmz_zone_mutex(zone);
                                        fuzz_assert(shmz_mutex_lock(m) >= 0, "lock");
                                        r = shmz_zone_check_locked(zone, SHMZ_CHECK_REPAIR);
                                        (void) shmz_mutex_unlock(m);
                                        fuzz_assert(poked || r == 0, "check of an untouched allocator: %d", r);
                                        /* A repair gives unowned pages back: blocks we hold may now be anybody's. */
                                        if (r != 0)
                                                poked = true;
                                } else {
                                        r = shmz_zone_alloc_stats(zone, &st);
                                        fuzz_assert(poked || r == 0, "stats: %d", r);
                                        if (!poked)
                                                fuzz_assert(st.pages_free + st.pages_slab + st.pages_large ==
                                                                    st.pages_total,
                                                            "pages do not add up");
                                }
                                break;
                        }
                        if ((op & 7) == OP_ALLOC_LARGE)
                                n = (size_t) take_u16(&in) * 16;
                        else
                                n = ((size_t) (param & 0x1f) << 8 | take_u8(&in)) % (SHMZ_ALLOC_MAX_CLASS + 1);
                        errno = 0;
                        p = (op & 7) == OP_CHECK ? alloc_locked(n) : shmz_alloc(zone, n);
                        if (p)
                                add_block(live, &n_live, poked, p, n);
                        else
                                fuzz_assert(poked || errno == ENOMEM, "alloc(%zu) of an untouched allocator: %s", n,
                                            strerror(errno));
                        break;

                case OP_FREE: {
                        size_t i;

                        if (n_live == 0)
                                break;
                        i = take_u8(&in) % n_live;
                        r = shmz_free_checked(zone, live[i].p);
                        fuzz_assert(poked || r == 0, "free of a live block: %s", strerror(-r));
                        drop_block(live, &n_live, i);
                        break;
                }

                case OP_FREE_STRAY: {
                        /* From half a zone before it to half a zone past it: the checks must reject without touching.
                         */
                        uint64_t span = 2 * zone->map_size;
                        int64_t off = (int64_t) (take_u32(&in) % span) - (int64_t) (zone->map_size / 2);
                        uint8_t *q = base + off;

                        r = shmz_free_checked(zone, q);
                        if (r == 0 && !poked) {
                                /* Only a block we hold may be freed, and only by its start. */
                                size_t i;

                                for (i = 0; i < n_live && live[i].p != q; i++)
                                        ;
                                fuzz_assert(i < n_live, "stray free of offset %lld succeeded", (long long) off);
                                drop_block(live, &n_live, i);
                        }
                        break;
                }

                case OP_POKE_META: {
                        uint64_t off = offsetof(struct shmz_zone_header, alloc) + take_u16(&in) % meta_len;

                        base[off] = take_u8(&in);
                        poked = true;
                        break;
                }

                case OP_POKE_META32: {
                        uint64_t off = offsetof(struct shmz_zone_header, alloc) + (take_u16(&in) % meta_len & ~3ull);
                        uint32_t v = take_u32(&in);

                        if (param & 1)
                                v &= 0x3ff;
                        memcpy(base + off, &v, sizeof(v));
                        poked = true;
                        break;
                }

                case OP_POKE_PAGE: {
                        uint64_t pages_off = offsetof(struct shmz_zone_header, alloc) + meta_len;
                        uint64_t off = pages_off + (take_u32(&in) % (zone->map_size - pages_off) & ~7ull);
                        uint64_t v = take_u64(&in);

                        memcpy(base + off, &v, sizeof(v));
                        poked = true;
                        break;
                }
                }
        }

        /*
         * Whatever the script did to lists, counters and descriptors, they are
         * rebuilt from the descriptors into an allocator that checks clean; only
         * a layout that is gone (magic, page count) leaves nothing to rebuild from.
         */
        if (poked) {
                struct shmz_mutex *m = shmz_zone_mutex(zone);
                bool sound = layout_sound();
                int r;

                fuzz_assert(shmz_mutex_lock(m) >= 0, "lock");
                r = shmz_zone_check_locked(zone, SHMZ_CHECK_REPAIR);
                (void) shmz_mutex_unlock(m);
                fuzz_assert(sound ? r == 0 || r == 1 : r == -EUCLEAN, "check+repair: %d (layout %s)", r,
                            sound ? "sound" : "gone");
                if (r == 1)
                        fuzz_assert(shmz_zone_check(zone) == 0, "repaired allocator does not check clean");
        } else
                fuzz_assert(shmz_zone_check(zone) == 0, "untouched allocator does not check clean");
        return 0;
}
