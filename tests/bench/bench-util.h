/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Timing and medians shared by the C benchmarks. */

#include <stdlib.h>
#include <time.h>

static inline double now_ns(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double) ts.tv_sec * 1e9 + (double) ts.tv_nsec;
}

static inline int cmp_double(const void *a, const void *b) {
        double x = *(const double *) a, y = *(const double *) b;

        return x < y ? -1 : x > y;
}

/* Sorts v in place. */
static inline double median(double *v, size_t n) {
        qsort(v, n, sizeof(*v), cmp_double);
        return v[n / 2];
}
