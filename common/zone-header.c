/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <time.h>
#include <unistd.h>

#include "util.h"
#include "zone-header.h"

uint64_t zone_map_size(uint64_t size) {
        uint64_t page = (uint64_t) sysconf(_SC_PAGESIZE);

        if (size > UINT64_MAX / 2)
                return 0;
        return ALIGN_TO(size + SHMZ_ZONE_HEADER_SIZE, page);
}

void zone_header_init(struct shmz_zone_header *h, const char *name, const char *tag, uint64_t map_size, uint32_t uid,
                      uint32_t gid, uint32_t mode, uint64_t generation) {
        memset(h, 0, sizeof(*h));
        h->magic = SHMZ_ZONE_MAGIC;
        h->abi_version = SHMZ_ABI_VERSION;
        h->header_size = SHMZ_ZONE_HEADER_SIZE;
        h->map_size = map_size;
        h->size = map_size - SHMZ_ZONE_HEADER_SIZE;
        h->generation = generation;
        h->created_usec = now_usec(CLOCK_REALTIME);
        h->uid = uid;
        h->gid = gid;
        h->mode = mode;
        strncpy_buf(h->name, sizeof(h->name), name);
        strncpy_buf(h->tag, sizeof(h->tag), tag ?: "");
}

int zone_header_check(const struct shmz_zone_header *shared, uint64_t map_size, const char *name) {
        struct shmz_zone_header h;

        /* Another process may write the header at any time: check a copy, read once. */
        if (map_size < SHMZ_ZONE_HEADER_SIZE)
                return -EBADMSG;
        memcpy(&h, (const void *) shared, sizeof(h));
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (h.magic != SHMZ_ZONE_MAGIC || h.abi_version != SHMZ_ABI_VERSION || h.header_size != SHMZ_ZONE_HEADER_SIZE)
                return -EBADMSG;
        if (h.map_size != map_size || h.size != map_size - SHMZ_ZONE_HEADER_SIZE)
                return -EBADMSG;
        if (!buf_is_cstr(h.name, sizeof(h.name)) || !buf_is_cstr(h.tag, sizeof(h.tag)))
                return -EBADMSG;
        if (name && strncmp(h.name, name, sizeof(h.name)) != 0)
                return -EBADMSG;
        return 0;
}
