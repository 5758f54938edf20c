/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <fcntl.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>

#include "client.h"
#include "memfd.h"
#include "util.h"
#include "zone.h"

static int zone_new(void *map, uint64_t map_size, bool rdonly, const char *name, struct shmz_zone **ret) {
        struct shmz_zone *z;

        z = calloc(1, sizeof(*z));
        if (!z)
                return -ENOMEM;
        z->hdr = map;
        z->map_size = map_size;
        z->size = map_size - SHMZ_ZONE_HEADER_SIZE;
        z->rdonly = rdonly;
        z->fd = -EBADF;
        strncpy_buf(z->name, sizeof(z->name), name);
        *ret = z;
        return 0;
}

int zone_map_fd(int fd, bool rdonly, const char *name, struct shmz_zone **ret) {
        /* The header's fields that are checked; the lock and allocator state after them are not read here. */
        const size_t checked = offsetof(struct shmz_zone_header, reserved0);
        struct shmz_zone_header h = {};
        struct stat st;
        ssize_t n;
        void *map;
        int r;

        if (fstat(fd, &st) < 0)
                return -errno;
        if (!S_ISREG(st.st_mode) || st.st_size < (off_t) SHMZ_ZONE_HEADER_SIZE)
                return -EBADMSG;
        /*
         * The header is checked on a copy read from the fd, not through the
         * mapping: reading it there would fault its page in (and, by fault-around,
         * the pages after it), which costs more than the read, and the mapping
         * would have more to tear down at munmap(). The caller faults in what it uses.
         */
        do
                n = pread(fd, &h, checked, 0);
        while (n < 0 && errno == EINTR);
        if (n < 0)
                return -errno;
        if ((size_t) n != checked)
                return -EBADMSG;
        r = zone_header_check(&h, (uint64_t) st.st_size, name);
        if (r < 0)
                return r;
        map = mmap(NULL, (size_t) st.st_size, rdonly ? PROT_READ : PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (map == MAP_FAILED)
                return -errno;
        r = zone_new(map, (uint64_t) st.st_size, rdonly, name ?: h.name, ret);
        if (r < 0)
                (void) munmap(map, (size_t) st.st_size);
        return r;
}

int zone_new_anonymous(const char *name, uint64_t size, struct shmz_zone **ret) {
        _cleanup_close_ int fd = -EBADF;
        uint64_t map_size = zone_map_size(size);
        struct shmz_zone *z;
        void *map;
        int r;

        if (!name_is_valid(name) || size == 0 || map_size == 0)
                return -EINVAL;
        r = memfd_new_sealed("shmzone:anonymous", map_size, false, &fd);
        if (r < 0)
                return r;
        map = mmap(NULL, map_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (map == MAP_FAILED)
                return -errno;
        zone_header_init(map, name, "", map_size, getuid(), getgid(), 0600, 1);
        r = zone_new(map, map_size, false, name, &z);
        if (r < 0) {
                (void) munmap(map, map_size);
                return r;
        }
        *ret = z;
        return 0;
}

_public_ void shmz_zone_close(struct shmz_zone *z) {
        if (!z)
                return;
        if (z->client) {
                struct shmz_msg_zone_close req;

                /* Out of the client's links first: no revive counts it again once its handle is read. */
                client_link_del(z->client, &z->link);
                client_links_lock(z->client);
                req = (struct shmz_msg_zone_close){ .handle = z->handle };
                client_links_unlock(z->client);

                /*
                 * Best effort: the daemon also drops the attachment when the connection
                 * ends. It ends right here when this zone held its last reference (the
                 * caller disconnected already; nobody else can take one): no message then.
                 */
                if (z->handle != 0 && !client_is_last_ref(z->client))
                        (void) client_send_oneway(z->client, SHMZ_MSG_ZONE_CLOSE, &req, sizeof(req));
                client_unref(z->client);
        }
        (void) munmap(z->hdr, z->map_size);
        safe_close(z->fd);
        free(z);
}

_public_ void *shmz_zone_base(struct shmz_zone *z) {
        return z ? zone_bytes(z) + SHMZ_ZONE_HEADER_SIZE : NULL;
}

_public_ uint64_t shmz_zone_size(const struct shmz_zone *z) {
        return z ? z->size : 0;
}

_public_ int shmz_zone_existed(const struct shmz_zone *z) {
        return z && z->existed;
}

_public_ const char *shmz_zone_name(const struct shmz_zone *z) {
        return z ? z->name : NULL;
}
