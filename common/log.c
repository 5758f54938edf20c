/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <stdarg.h>
#include <stdio.h>

#include "log.h"

int log_max_level = LOG_INFO;

int log_internal(int level, int error, const char *file, int line, const char *fmt, ...) {
        char buf[1024];
        va_list ap;
        int e = error < 0 ? -error : error;

        if (level > log_max_level)
                return -e;
        /* %m in fmt refers to the error passed, not to whatever errno holds now. */
        errno = e;
        va_start(ap, fmt);
        (void) vsnprintf(buf, sizeof(buf), fmt, ap);
        va_end(ap);
        if (log_max_level >= LOG_DEBUG)
                (void) fprintf(stderr, "<%d>%s (%s:%d)\n", level, buf, file, line);
        else
                (void) fprintf(stderr, "<%d>%s\n", level, buf);
        return -e;
}
