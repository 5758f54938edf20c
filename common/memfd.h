/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>

/* The seals of every memfd shmzone hands out (zones, segments, channels): its size is fixed for good. */
#define MEMFD_SEALS (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)

/*
 * A close-on-exec memfd of size bytes, sealed MEMFD_SEALS (its contents stay
 * writable). With owner_only its inode is mode 0400: a memfd's inode is 0777,
 * and anyone holding a read-only fd could reopen /proc/self/fd/N for writing.
 */
int memfd_new_sealed(const char *name, uint64_t size, bool owner_only, int *ret_fd);
