/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <ctype.h>
#include <inttypes.h>
#include <sys/stat.h>
#include <time.h>

#include "shmzone-abi.h"
#include "util.h"

bool name_is_valid(const char *name) {
        size_t n = 0;

        if (!name)
                return false;
        for (const char *p = name; *p; p++, n++) {
                if (n >= SHMZ_NAME_MAX)
                        return false;
                if (!(isascii((unsigned char) *p) && (isalnum((unsigned char) *p) || strchr("._-", *p))))
                        return false;
        }
        return n > 0 && !streq(name, ".") && !streq(name, "..");
}

bool tag_is_valid(const char *tag) {
        size_t n = 0;

        if (!tag)
                return false;
        for (const char *p = tag; *p; p++, n++)
                if (n >= SHMZ_TAG_MAX || *p < 0x20 || *p > 0x7e)
                        return false;
        return true;
}

int parse_size(const char *s, uint64_t *ret) {
        unsigned shift = 0;
        uint64_t v;
        char *end;

        if (!s || !isdigit((unsigned char) *s))
                return -EINVAL;
        errno = 0;
        v = strtoull(s, &end, 10);
        if (errno != 0)
                return -ERANGE;
        switch (*end) {
        case 'K':
        case 'k':
                shift = 10;
                end++;
                break;
        case 'M':
        case 'm':
                shift = 20;
                end++;
                break;
        case 'G':
        case 'g':
                shift = 30;
                end++;
                break;
        case 'T':
        case 't':
                shift = 40;
                end++;
                break;
        default:
                break;
        }
        if (*end != 0)
                return -EINVAL;
        if (shift > 0 && v > (UINT64_MAX >> shift))
                return -ERANGE;
        *ret = v << shift;
        return 0;
}

uint64_t now_nsec(int clock) {
        struct timespec ts;

        (void) clock_gettime(clock, &ts);
        return (uint64_t) ts.tv_sec * UINT64_C(1000000000) + (uint64_t) ts.tv_nsec;
}

uint64_t now_usec(int clock) {
        return now_nsec(clock) / 1000u;
}

int mkdir_parents(const char *path, mode_t mode, bool last) {
        _cleanup_free_ char *p = strdup(path);

        if (!p)
                return -ENOMEM;
        for (char *s = p + 1; *s; s++) {
                if (*s != '/')
                        continue;
                *s = 0;
                if (mkdir(p, mode) < 0 && errno != EEXIST)
                        return -errno;
                *s = '/';
        }
        if (last && mkdir(p, mode) < 0 && errno != EEXIST)
                return -errno;
        return 0;
}

size_t sorted_name_index(void *const *items, size_t n, size_t name_offset, const char *name, bool *ret_found) {
        size_t lo = 0, hi = n;

        while (lo < hi) {
                size_t mid = lo + (hi - lo) / 2;
                int c = strcmp((const char *) items[mid] + name_offset, name);

                if (c == 0) {
                        *ret_found = true;
                        return mid;
                }
                if (c < 0)
                        lo = mid + 1;
                else
                        hi = mid;
        }
        *ret_found = false;
        return lo;
}

static inline uint64_t mix64(uint64_t h) {
        h ^= h >> 33;
        h *= UINT64_C(0xff51afd7ed558ccd);
        h ^= h >> 33;
        h *= UINT64_C(0xc4ceb9fe1a85ec53);
        return h ^ (h >> 33);
}

uint64_t checksum64(const void *p, size_t n, uint64_t seed) {
        const unsigned char *b = p;
        uint64_t h = seed ^ (n * UINT64_C(0x9e3779b97f4a7c15)), w;
        size_t i = 0;

        for (; i + 8 <= n; i += 8) {
                memcpy(&w, b + i, 8);
                h = (h ^ w) * UINT64_C(0x9e3779b97f4a7c15);
                h ^= h >> 29;
        }
        w = 0;
        memcpy(&w, b + i, n - i);
        return mix64(h ^ w);
}
