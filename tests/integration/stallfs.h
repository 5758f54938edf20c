/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/*
 * A FUSE filesystem that a hostile user could mount (any user can, through
 * fusermount3), for tests: one file, "file", whose READs never get an answer,
 * and whose FLUSHes (all but one thread's) never get one either, until
 * stallfs_release() answers them all with EIO. It runs in a thread of the
 * test process.
 */

#include <stdbool.h>
#include <sys/types.h>

struct stallfs;

/* Mounts at dir (created if missing); 0 or -errno. */
int stallfs_start(const char *dir, struct stallfs **ret);
/*
 * Mounts at dir, stalls every flush but the calling thread's, and opens its
 * file (read-only): the fd, whose close() by any other thread never returns,
 * or -errno.
 */
int stallfs_start_with_stalling_fd(const char *dir, struct stallfs **ret);
/*
 * From now on FLUSHes are left unanswered, except those of thread `except`
 * (FUSE names the calling thread, not its process).
 */
void stallfs_stall_flushes(struct stallfs *s, pid_t except);
/* How many requests wait unanswered. */
unsigned stallfs_stalled(struct stallfs *s);
/* Answers every stalled request with EIO and stalls nothing more. */
void stallfs_release(struct stallfs *s);
/* Releases, unmounts, stops the thread. NULL is fine. */
void stallfs_stop(struct stallfs *s);
