/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <errno.h>
#include <syslog.h>

#include "util.h"

/*
 * The daemon logs to stderr with "<N>" priority prefixes, which journald turns
 * into levels. log_*_errno() return -|error| so that callers can log and
 * return in one statement; %m prints that error.
 */
extern int log_max_level;

int log_internal(int level, int error, const char *file, int line, const char *fmt, ...) _printf_(5, 6);

/* The value is computed here, not only in log_internal(), so that the compiler and the static
 * analyzer see that log_*_errno(e, ...) is negative for any e != 0. */
#define log_full_errno(level, error, ...)                                                                              \
        ({                                                                                                             \
                int _e = (error);                                                                                      \
                (void) log_internal(level, _e, __FILE__, __LINE__, __VA_ARGS__);                                       \
                _e < 0 ? _e : -_e;                                                                                     \
        })
#define log_debug(...) log_full_errno(LOG_DEBUG, 0, __VA_ARGS__)
#define log_info(...) log_full_errno(LOG_INFO, 0, __VA_ARGS__)
#define log_notice(...) log_full_errno(LOG_NOTICE, 0, __VA_ARGS__)
#define log_warning(...) log_full_errno(LOG_WARNING, 0, __VA_ARGS__)
#define log_error(...) log_full_errno(LOG_ERR, 0, __VA_ARGS__)
#define log_debug_errno(e, ...) log_full_errno(LOG_DEBUG, e, __VA_ARGS__)
#define log_warning_errno(e, ...) log_full_errno(LOG_WARNING, e, __VA_ARGS__)
#define log_error_errno(e, ...) log_full_errno(LOG_ERR, e, __VA_ARGS__)
#define log_oom() log_full_errno(LOG_ERR, ENOMEM, "Out of memory.")
