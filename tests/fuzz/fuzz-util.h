/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* What the fuzz targets share: a cursor over the input, and how an oracle reports a finding. */

#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct cursor {
        const uint8_t *p;
        size_t n;
};

/* Past the end of the input everything reads as 0: scripts stay short without the fuzzer padding them. */
static inline uint8_t take_u8(struct cursor *c) {
        uint8_t v = 0;

        if (c->n > 0) {
                v = c->p[0];
                c->p++;
                c->n--;
        }
        return v;
}

static inline uint16_t take_u16(struct cursor *c) {
        uint16_t lo = take_u8(c);

        return (uint16_t) (lo | take_u8(c) << 8);
}

static inline uint32_t take_u32(struct cursor *c) {
        uint32_t lo = take_u16(c);

        return lo | (uint32_t) take_u16(c) << 16;
}

static inline uint64_t take_u64(struct cursor *c) {
        uint64_t lo = take_u32(c);

        return lo | (uint64_t) take_u32(c) << 32;
}

/* Up to n bytes (fewer at the end of the input); returns how many. */
static inline size_t take_bytes(struct cursor *c, void *dst, size_t n) {
        if (n > c->n)
                n = c->n;
        memcpy(dst, c->p, n);
        c->p += n;
        c->n -= n;
        return n;
}

/*
 * An oracle found something the sanitizers would not: say what, then abort so
 * that libFuzzer saves the input as a crash.
 */
#define fuzz_fail(...)                                                                                                 \
        do {                                                                                                           \
                fprintf(stderr, "%s:%d: ", __FILE__, __LINE__);                                                        \
                fprintf(stderr, __VA_ARGS__);                                                                          \
                fputc('\n', stderr);                                                                                   \
                abort();                                                                                               \
        } while (0)

#define fuzz_assert(expr, ...)                                                                                         \
        do {                                                                                                           \
                if (!(expr)) {                                                                                         \
                        fprintf(stderr, "%s:%d: '%s' does not hold: ", __FILE__, __LINE__, #expr);                     \
                        fprintf(stderr, __VA_ARGS__);                                                                  \
                        fputc('\n', stderr);                                                                           \
                        abort();                                                                                       \
                }                                                                                                      \
        } while (0)

/* Open fds of this process, for leak checks around one input. */
static inline int count_fds(void) {
        DIR *d = opendir("/proc/self/fd");
        struct dirent *de;
        int n = 0;

        if (!d)
                return -1;
        while ((de = readdir(d)))
                if (de->d_name[0] != '.')
                        n++;
        closedir(d);
        return n - 1; /* the directory's own fd */
}
