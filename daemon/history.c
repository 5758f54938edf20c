/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "history.h"
#include "log.h"
#include "util.h"

#define HISTORY_MAGIC UINT64_C(0x315453484d5a4853) /* "SHZMHST1" */
#define ENTRY_MAGIC UINT32_C(0x5a48534d)
#define ENTRY_SIZE 512u
/* Entries beyond what the fd store can hold (FileDescriptorStoreMax=) are never needed; a bound for a bad record. */
#define MAX_ENTRIES 65536u

/* Entry 0 of the record. */
struct history_head {
        uint64_t magic;
        uint32_t entry_size;
        uint32_t reserved;
        uint64_t next_ino, next_generation;
        uint64_t sum; /* of the above */
};

struct history_entry {
        uint32_t magic;  /* ENTRY_MAGIC, or 0: free */
        uint32_t layout; /* 0: ends at tag (an older daemon's); ENTRY_LAYOUT_CREATOR: creator_pid follows */
        uint64_t sum;    /* of what follows, up to the end of the layout's fields */
        uint64_t ino, generation;
        uint64_t created_usec, mtime_usec, ctime_usec;
        char name[SHMZ_NAME_BUF];
        char tag[SHMZ_TAG_BUF];
        uint32_t creator_pid;
};
#define ENTRY_LAYOUT_CREATOR 1u

_Static_assert(sizeof(struct history_entry) <= ENTRY_SIZE, "entry fits");
_Static_assert(4096 % ENTRY_SIZE == 0, "entries never cross a page");

struct history {
        int fd;
        struct history_head head;
        /* Names by slot (slot 1..n-1; "" free), a copy of what the record holds, to find slots without reading it. */
        char (*names)[SHMZ_NAME_BUF];
        size_t n; /* slots, head included */
};

/* An older daemon's entries stay readable: their sum ends at tag, and what follows them reads as 0. */
static uint64_t entry_sum(const struct history_entry *e) {
        size_t end = e->layout == ENTRY_LAYOUT_CREATOR ? sizeof(*e) : offsetof(struct history_entry, creator_pid);

        return checksum64((const char *) e + offsetof(struct history_entry, ino),
                          end - offsetof(struct history_entry, ino), ENTRY_MAGIC);
}

static bool entry_checks(const struct history_entry *e) {
        return e->magic == ENTRY_MAGIC && (e->layout == 0 || e->layout == ENTRY_LAYOUT_CREATOR) &&
               e->sum == entry_sum(e);
}

static uint64_t head_sum(const struct history_head *h) {
        return checksum64(h, offsetof(struct history_head, sum), HISTORY_MAGIC);
}

static int write_head(struct history *h) {
        h->head.sum = head_sum(&h->head);
        return pwrite(h->fd, &h->head, sizeof(h->head), 0) == (ssize_t) sizeof(h->head) ? 0 : -EIO;
}

static int grow(struct history *h, size_t n) {
        char(*v)[SHMZ_NAME_BUF];

        if (n > MAX_ENTRIES)
                return -E2BIG;
        v = realloc(h->names, n * sizeof(*v));
        if (!v)
                return -ENOMEM;
        memset(v + h->n, 0, (n - h->n) * sizeof(*v));
        h->names = v;
        h->n = n;
        return 0;
}

/* Reads what a previous daemon left: 0, or -EBADMSG if it is not a record of ours. */
static int load(struct history *h) {
        struct history_entry e;
        struct stat st;
        size_t n;

        if (fstat(h->fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_size < (off_t) ENTRY_SIZE ||
            st.st_size % ENTRY_SIZE != 0 || (uint64_t) st.st_size / ENTRY_SIZE > MAX_ENTRIES)
                return -EBADMSG;
        if (pread(h->fd, &h->head, sizeof(h->head), 0) != (ssize_t) sizeof(h->head) || h->head.magic != HISTORY_MAGIC ||
            h->head.entry_size != ENTRY_SIZE || h->head.sum != head_sum(&h->head))
                return -EBADMSG;
        n = (size_t) st.st_size / ENTRY_SIZE;
        if (grow(h, n) < 0)
                return -ENOMEM;
        for (size_t i = 1; i < n; i++) {
                if (pread(h->fd, &e, sizeof(e), (off_t) (i * ENTRY_SIZE)) != (ssize_t) sizeof(e))
                        return -EBADMSG;
                /* An entry that does not check is a free slot: its zone, if any, gets new numbers. */
                if (entry_checks(&e) && buf_is_cstr(e.name, sizeof(e.name)) && name_is_valid(e.name))
                        strncpy_buf(h->names[i], sizeof(h->names[i]), e.name);
                else if (e.magic != 0)
                        log_warning("History record: entry %zu does not check; ignored.", i);
        }
        return 0;
}

struct history *history_open(int fd, bool *ret_new) {
        struct history *h = calloc(1, sizeof(*h));
        int r;

        if (!h) {
                safe_close(fd);
                return NULL;
        }
        h->fd = fd;
        *ret_new = false;
        if (fd >= 0) {
                r = load(h);
                if (r == 0)
                        return h;
                log_warning("The stored history record does not check; zones get new inode numbers and generations.");
                safe_close(h->fd);
                free(h->names);
                h->names = NULL;
                h->n = 0;
        }
        *ret_new = true;
        /* Only we hold it: no seals, owner read-write. */
        h->fd = memfd_create("shmzone-history", MFD_CLOEXEC);
        if (h->fd < 0 || fchmod(h->fd, 0600) < 0 || ftruncate(h->fd, ENTRY_SIZE) < 0 || grow(h, 1) < 0) {
                history_free(h);
                return NULL;
        }
        h->head = (struct history_head){ .magic = HISTORY_MAGIC, .entry_size = ENTRY_SIZE };
        if (write_head(h) < 0) {
                history_free(h);
                return NULL;
        }
        return h;
}

void history_free(struct history *h) {
        if (!h)
                return;
        safe_close(h->fd);
        free(h->names);
        free(h);
}

int history_fd(struct history *h) {
        return h->fd;
}

static size_t slot_of(struct history *h, const char *name) {
        for (size_t i = 1; i < h->n; i++)
                if (streq(h->names[i], name))
                        return i;
        return 0;
}

int history_lookup(struct history *h, const char *name, struct zone_history *ret) {
        struct history_entry e;
        size_t i = slot_of(h, name);

        if (i == 0 || pread(h->fd, &e, sizeof(e), (off_t) (i * ENTRY_SIZE)) != (ssize_t) sizeof(e) ||
            !entry_checks(&e) || !buf_is_cstr(e.tag, sizeof(e.tag)) || !tag_is_valid(e.tag))
                return -ENOENT;
        *ret = (struct zone_history){
                .ino = e.ino,
                .generation = e.generation,
                .created_usec = e.created_usec,
                .mtime_usec = e.mtime_usec,
                .ctime_usec = e.ctime_usec,
                .creator_pid = e.layout == ENTRY_LAYOUT_CREATOR ? e.creator_pid : 0,
        };
        strncpy_buf(ret->tag, sizeof(ret->tag), e.tag);
        return 0;
}

void history_next(struct history *h, uint64_t *ret_ino, uint64_t *ret_generation) {
        *ret_ino = h->head.next_ino;
        *ret_generation = h->head.next_generation;
}

int history_put(struct history *h, const struct zone_identity *id) {
        struct history_entry e = {
                .magic = ENTRY_MAGIC,
                .layout = ENTRY_LAYOUT_CREATOR,
                .ino = id->hist.ino,
                .generation = id->hist.generation,
                .created_usec = id->hist.created_usec,
                .mtime_usec = id->hist.mtime_usec,
                .ctime_usec = id->hist.ctime_usec,
                .creator_pid = id->hist.creator_pid,
        };
        size_t i = slot_of(h, id->name);
        int r;

        if (i == 0)
                i = slot_of(h, "");
        if (i == 0) {
                i = h->n;
                r = grow(h, h->n + 1);
                if (r < 0)
                        return r;
                if (ftruncate(h->fd, (off_t) (h->n * ENTRY_SIZE)) < 0)
                        return -errno;
        }
        strncpy_buf(e.name, sizeof(e.name), id->name);
        strncpy_buf(e.tag, sizeof(e.tag), id->hist.tag);
        e.sum = entry_sum(&e);
        /* One write within a page: whole or not at all, even if we are killed. */
        if (pwrite(h->fd, &e, sizeof(e), (off_t) (i * ENTRY_SIZE)) != (ssize_t) sizeof(e))
                return -EIO;
        strncpy_buf(h->names[i], sizeof(h->names[i]), id->name);
        if (id->hist.ino >= h->head.next_ino || id->hist.generation >= h->head.next_generation) {
                h->head.next_ino = MAX(h->head.next_ino, id->hist.ino + 1);
                h->head.next_generation = MAX(h->head.next_generation, id->hist.generation + 1);
                return write_head(h);
        }
        return 0;
}

void history_drop(struct history *h, const char *name) {
        static const uint32_t zero = 0;
        size_t i = slot_of(h, name);

        if (i == 0)
                return;
        (void) pwrite(h->fd, &zero, sizeof(zero), (off_t) (i * ENTRY_SIZE));
        h->names[i][0] = 0;
}

void history_retain(struct history *h, bool (*keep)(const char *name, void *userdata), void *userdata) {
        for (size_t i = 1; i < h->n; i++)
                if (h->names[i][0] && !keep(h->names[i], userdata))
                        history_drop(h, h->names[i]);
}
