/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Small internal helpers shared by the library, the daemon and the tests (never installed). */

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#define _public_ __attribute__((visibility("default")))
#define _cleanup_(f) __attribute__((cleanup(f)))
#define _unused_ __attribute__((unused))
#define _likely_(x) __builtin_expect(!!(x), 1)
#define _unlikely_(x) __builtin_expect(!!(x), 0)
#define _printf_(a, b) __attribute__((format(printf, a, b)))

#define ELEMENTSOF(x) (sizeof(x) / sizeof((x)[0]))
#define ALIGN_TO(x, a) (((x) + (a) -1) & ~((__typeof__(x)) (a) -1))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

/* Hand a pointer or fd out of a cleanup variable. */
#define TAKE_PTR(p)                                                                                                    \
        ({                                                                                                             \
                __typeof__(p) _p = (p);                                                                                \
                (p) = NULL;                                                                                            \
                _p;                                                                                                    \
        })
#define TAKE_FD(fd)                                                                                                    \
        ({                                                                                                             \
                int _fd = (fd);                                                                                        \
                (fd) = -EBADF;                                                                                         \
                _fd;                                                                                                   \
        })

/* Returns 0 or -errno for libc calls that return -1 and set errno. */
#define RET_NERRNO(expr)                                                                                               \
        ({                                                                                                             \
                __typeof__(expr) _r = (expr);                                                                          \
                _r < 0 ? -errno : _r;                                                                                  \
        })

#define assert_return(expr, r)                                                                                         \
        do {                                                                                                           \
                if (_unlikely_(!(expr)))                                                                               \
                        return (r);                                                                                    \
        } while (0)

/* One pause in a spin-wait: lets the sibling hyperthread run and saves power; a compiler
 * barrier where the architecture has no such instruction. */
static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#elif defined(__aarch64__)
        __asm__ __volatile__("yield" ::: "memory");
#else
        __asm__ __volatile__("" ::: "memory");
#endif
}

static inline int negative_errno(void) {
        return errno > 0 ? -errno : -EIO;
}

static inline void freep(void *p) {
        free(*(void **) p);
}
#define _cleanup_free_ _cleanup_(freep)

static inline int safe_close(int fd) {
        if (fd >= 0) {
                int saved = errno;
                (void) close(fd);
                errno = saved;
        }
        return -EBADF;
}

static inline void closep(int *fd) {
        safe_close(*fd);
}
#define _cleanup_close_ _cleanup_(closep)

static inline bool streq(const char *a, const char *b) {
        return strcmp(a, b) == 0;
}

/* A string field of a fixed-size wire struct: true if NUL-terminated within its buffer. */
static inline bool buf_is_cstr(const char *buf, size_t size) {
        return memchr(buf, 0, size) != NULL;
}

/* Names of zones (and later ports): [A-Za-z0-9._-], 1..SHMZ_NAME_MAX bytes, not "." or "..". */
bool name_is_valid(const char *name);
/*
 * Binary search of items (pointers to structs sorted by the NUL-terminated name at name_offset
 * in each): the index of name, or where it would go; *ret_found says which.
 */
size_t sorted_name_index(void *const *items, size_t n, size_t name_offset, const char *name, bool *ret_found);
/* Tags: printable ASCII, at most SHMZ_TAG_MAX bytes. */
bool tag_is_valid(const char *tag);

/* Copies a valid string into a zeroed fixed-size buffer. */
static inline void strncpy_buf(char *dst, size_t size, const char *src) {
        size_t n = strnlen(src, size - 1);
        memcpy(dst, src, n);
        memset(dst + n, 0, size - n);
}

/* Parses "123", "10K", "64M", "1G", "2T" (powers of 1024) into bytes. */
int parse_size(const char *s, uint64_t *ret);

/* Hands a figures struct to a caller whose copy of it may be older (shorter) or newer (longer) than ours. */
static inline void copy_sized(void *dst, size_t dst_size, const void *src, size_t src_size) {
        memcpy(dst, src, MIN(dst_size, src_size));
        if (dst_size > src_size)
                memset((char *) dst + src_size, 0, dst_size - src_size);
}

uint64_t now_nsec(int clock);
uint64_t now_usec(int clock);

/* mkdir -p: the directories leading to path, and with last also path itself. */
int mkdir_parents(const char *path, mode_t mode, bool last);
