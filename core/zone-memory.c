/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * A zone's memory: the memfd, sealed against shrinking and growing and owner
 * read-only, the self-describing header written into it, and the one
 * read-only mapping the FUSE view replies from.
 */
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>

#include "memfd.h"
#include "registry-internal.h"
#include "zone-header.h"

void zone_destroy(struct zone *z) {
        if (z->view_map)
                (void) munmap(z->view_map, z->map_size);
        safe_close(z->fd);
        holders_free(z);
        free(z);
}

/* Makes the memfd of z at its size: sealed so that nobody can shrink it under the others. */
int zone_memory_make(struct zone *z, uint64_t size) {
        _cleanup_close_ int fd = -EBADF;
        struct shmz_zone_header h;
        char memfd_name[16 + SHMZ_NAME_BUF];
        uint64_t map_size = zone_map_size(size);
        int r;

        if (size == 0 || map_size == 0)
                return -EINVAL;
        (void) snprintf(memfd_name, sizeof(memfd_name), "shmzone:%s", z->name);
        /* Owner-read only: only the daemon's uid (which hands out the writable fds anyway) can reopen it. */
        r = memfd_new_sealed(memfd_name, map_size, true, &fd);
        if (r < 0)
                return r;
        zone_header_init(&h, z->name, z->tag, map_size, z->uid, z->gid, z->mode, z->generation);
        h.created_usec = z->created_usec;
        if (pwrite(fd, &h, sizeof(h), 0) != (ssize_t) sizeof(h))
                return -EIO;
        z->size = map_size - SHMZ_ZONE_HEADER_SIZE;
        z->map_size = map_size;
        /* zone_fd() reads it without the lock (FUSE reads of a zone that was pending a moment ago): sizes first. */
        __atomic_store_n(&z->fd, TAKE_FD(fd), __ATOMIC_RELEASE);
        return 0;
}

/*
 * The header's copy of the ACL follows the registry's, so that the zone stays
 * self-describing. The registry's copy is the one that counts: clients with
 * write access can scribble on the header.
 */
void zone_memory_sync_acl(struct zone *z) {
        uint32_t acl[3] = { z->uid, z->gid, z->mode };

        if (z->fd >= 0)
                (void) pwrite(z->fd, acl, sizeof(acl), offsetof(struct shmz_zone_header, uid));
}

int zone_memory_reopen(struct zone *z, bool rdonly) {
        char path[64];
        int nfd;

        if (!rdonly) {
                nfd = fcntl(z->fd, F_DUPFD_CLOEXEC, 3);
                return nfd < 0 ? -errno : nfd;
        }
        /*
         * A new open file description, read-only: the client cannot mprotect its
         * way to writing, nor reopen it writable (the inode is ours, mode 0400).
         */
        (void) snprintf(path, sizeof(path), "/proc/self/fd/%d", z->fd);
        nfd = open(path, O_RDONLY | O_CLOEXEC);
        return nfd < 0 ? -errno : nfd;
}

void zone_memory_sync_tag(struct zone *z) {
        struct shmz_zone_header h;

        if (z->fd < 0)
                return;
        /* Keep the self-describing header in step. */
        strncpy_buf(h.tag, sizeof(h.tag), z->tag);
        (void) pwrite(z->fd, h.tag, sizeof(h.tag), offsetof(struct shmz_zone_header, tag));
}

int zone_fd(struct zone *z) {
        return __atomic_load_n(&z->fd, __ATOMIC_ACQUIRE);
}

int zone_view_map(struct zone *z, const void **ret) {
        void *m = __atomic_load_n(&z->view_map, __ATOMIC_ACQUIRE), *expected = NULL;
        int fd = zone_fd(z);

        if (m) {
                *ret = m;
                return 0;
        }
        if (fd < 0)
                return -EAGAIN;
        /* Sealed against shrinking: the mapping can never SIGBUS. */
        m = mmap(NULL, z->map_size, PROT_READ, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED)
                return -errno;
        /* Two first readers at once: one mapping stays. */
        if (!__atomic_compare_exchange_n(&z->view_map, &expected, m, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                (void) munmap(m, z->map_size);
                m = expected;
        }
        *ret = m;
        return 0;
}
