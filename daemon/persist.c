/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "memfd.h"
#include "persist.h"
#include "util.h"
#include "zone-header.h"
#include "zone.h"

#define PERSIST_MAGIC UINT64_C(0x3154535044484d53) /* "SMHDPST1" */
#define PERSIST_VERSION 1u
#define PERSIST_HEADER_SIZE 512u
/* Bytes are copied and summed in chunks of this size, the same when written and read. */
#define CHUNK (UINT64_C(1) << 20)

struct persist_header {
        uint64_t magic;
        uint32_t version;
        uint32_t header_size;
        uint64_t map_size; /* bytes that follow the header: the whole memfd */
        uint64_t size;     /* usable bytes */
        uint64_t ino, generation;
        uint64_t created_usec, mtime_usec, ctime_usec;
        uint64_t written_usec;
        uint32_t uid, gid, mode;
        uint32_t reserved;
        char name[SHMZ_NAME_BUF];
        char tag[SHMZ_TAG_BUF];
        uint64_t data_sum;
        uint64_t header_sum; /* of everything before it */
};

_Static_assert(sizeof(struct persist_header) <= PERSIST_HEADER_SIZE, "header fits");

static uint64_t header_sum(const struct persist_header *h) {
        return checksum64(h, offsetof(struct persist_header, header_sum), PERSIST_MAGIC);
}

static void path_of(char *buf, size_t size, const char *dir, const char *prefix, const char *name, const char *suffix) {
        (void) snprintf(buf, size, "%s/%s%s.zone%s", dir, prefix, name, suffix);
}

bool persist_exists(const char *dir, const char *name) {
        char path[PATH_MAX];

        path_of(path, sizeof(path), dir, "", name, "");
        return access(path, F_OK) == 0;
}

static int full_write(int fd, const void *buf, size_t n, off_t off) {
        const char *p = buf;

        while (n > 0) {
                ssize_t k = pwrite(fd, p, n, off);

                if (k < 0 && errno == EINTR)
                        continue;
                if (k <= 0)
                        return k < 0 ? -errno : -EIO;
                p += k;
                n -= (size_t) k;
                off += k;
        }
        return 0;
}

/* n bytes at off, or -EIO if fewer are there. */
static int full_read(int fd, void *buf, size_t n, off_t off) {
        char *p = buf;

        while (n > 0) {
                ssize_t k = pread(fd, p, n, off);

                if (k < 0 && errno == EINTR)
                        continue;
                if (k < 0)
                        return -errno;
                if (k == 0)
                        return -EIO;
                p += k;
                n -= (size_t) k;
                off += k;
        }
        return 0;
}

static int fsync_dir(const char *dir) {
        _cleanup_close_ int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

        if (fd < 0 || fsync(fd) < 0)
                return -errno;
        return 0;
}

int persist_write(const char *dir, const struct shmz_msg_zone_info *info, int zfd) {
        char tmp[PATH_MAX], path[PATH_MAX];
        _cleanup_free_ void *buf = NULL;
        _cleanup_close_ int fd = -EBADF;
        struct persist_header h = {
                .magic = PERSIST_MAGIC,
                .version = PERSIST_VERSION,
                .header_size = PERSIST_HEADER_SIZE,
                .map_size = info->map_size,
                .size = info->size,
                .ino = info->ino,
                .generation = info->generation,
                .created_usec = info->created_usec,
                .mtime_usec = info->mtime_usec,
                .ctime_usec = info->ctime_usec,
                .written_usec = now_usec(CLOCK_REALTIME),
                .uid = info->uid,
                .gid = info->gid,
                .mode = info->mode,
        };
        char page[PERSIST_HEADER_SIZE] = {};
        uint64_t sum = 0;
        int r;

        memcpy(h.name, info->name, sizeof(h.name));
        memcpy(h.tag, info->tag, sizeof(h.tag));
        r = mkdir_parents(dir, 0700, true);
        if (r < 0)
                return log_error_errno(r, "Zone '%s': cannot make %s: %m", info->name, dir);
        path_of(tmp, sizeof(tmp), dir, ".", info->name, ".tmp");
        path_of(path, sizeof(path), dir, "", info->name, "");
        buf = malloc(CHUNK);
        if (!buf)
                return log_oom();
        fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (fd < 0)
                return log_error_errno(errno, "Zone '%s': cannot write %s: %m", info->name, tmp);
        /*
         * Clients keep writing meanwhile: what is summed is what is written, a
         * chunk at a time. The copy is as consistent as a crash would leave the
         * zone; reading it back repairs the allocator as after a writer's death.
         */
        for (uint64_t off = 0; off < info->map_size; off += CHUNK) {
                size_t n = (size_t) MIN(CHUNK, info->map_size - off);

                r = full_read(zfd, buf, n, (off_t) off);
                if (r >= 0)
                        r = full_write(fd, buf, n, (off_t) (PERSIST_HEADER_SIZE + off));
                if (r < 0)
                        goto fail;
                sum = checksum64(buf, n, sum);
        }
        h.data_sum = sum;
        h.header_sum = header_sum(&h);
        memcpy(page, &h, sizeof(h));
        r = full_write(fd, page, sizeof(page), 0);
        if (r < 0)
                goto fail;
        if (fsync(fd) < 0) {
                r = -errno;
                goto fail;
        }
        if (rename(tmp, path) < 0) {
                r = -errno;
                goto fail;
        }
        (void) fsync_dir(dir);
        return 0;
fail:
        (void) unlink(tmp);
        return log_error_errno(r, "Zone '%s': cannot write %s: %m; the previous copy stays.", info->name, path);
}

/* Renames a refused copy aside, so that the next stop does not overwrite what the administrator may want. */
static int refuse(const char *dir, const char *name, int r, const char *why) {
        char path[PATH_MAX], aside[PATH_MAX], suffix[64];
        struct tm tm;
        time_t t = time(NULL);

        (void) gmtime_r(&t, &tm);
        (void) strftime(suffix, sizeof(suffix), ".bad-%Y%m%dT%H%M%SZ", &tm);
        path_of(path, sizeof(path), dir, "", name, "");
        path_of(aside, sizeof(aside), dir, "", name, suffix);
        if (rename(path, aside) < 0)
                log_error_errno(errno, "Zone '%s': %s %s; cannot move it aside: %m.", name, path, why);
        else
                log_error("Zone '%s': %s %s; not restored, kept as %s.", name, path, why, aside);
        return r;
}

/* The zone's own header fields, the lock free, the allocator checked: as after a crash of every client. */
static int make_whole(int fd, const struct zone_decl *decl, const struct persist_header *ph) {
        struct shmz_zone_header h;
        struct shmz_zone *z;
        int r;

        zone_header_init(&h, decl->name, decl->tag, ph->map_size, decl->uid, decl->gid, decl->mode, ph->generation);
        h.created_usec = ph->created_usec;
        /* Everything before the allocator's word and its root (the users'), and the name and tag. */
        r = full_write(fd, &h, offsetof(struct shmz_zone_header, alloc_state), 0);
        if (r >= 0)
                r = full_write(fd, (const char *) &h + offsetof(struct shmz_zone_header, name),
                               offsetof(struct shmz_zone_header, lock) - offsetof(struct shmz_zone_header, name),
                               offsetof(struct shmz_zone_header, name));
        if (r < 0)
                return r;
        r = zone_map_fd(fd, false, decl->name, &z);
        if (r < 0)
                return r;
        /* Whoever held it when the copy was made is not there any more. */
        (void) shmz_mutex_init(shmz_zone_mutex(z));
        r = shmz_zone_check_locked(z, SHMZ_CHECK_REPAIR);
        shmz_zone_close(z);
        if (r > 0)
                log_notice("Zone '%s': its allocator was in the middle of a change when it was written; repaired.",
                           decl->name);
        return r < 0 ? r : 0;
}

int persist_read(const char *dir, const struct zone_decl *decl, int *ret_fd, struct zone_history *ret_hist) {
        char path[PATH_MAX], memfd_name[16 + SHMZ_NAME_BUF];
        _cleanup_close_ int fd = -EBADF, zfd = -EBADF;
        _cleanup_free_ void *buf = NULL;
        struct persist_header h;
        char page[PERSIST_HEADER_SIZE];
        struct stat st;
        uint64_t sum = 0;
        int r;

        path_of(path, sizeof(path), dir, "", decl->name, "");
        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (fd < 0 && errno == ENOENT)
                return -ENOENT;
        if (fd < 0)
                return log_error_errno(errno, "Zone '%s': cannot read %s: %m", decl->name, path);
        if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
                return refuse(dir, decl->name, -EBADMSG, "is not a regular file");
        if (st.st_size < (off_t) PERSIST_HEADER_SIZE || full_read(fd, page, sizeof(page), 0) < 0)
                return refuse(dir, decl->name, -EBADMSG, "is truncated (no whole header)");
        memcpy(&h, page, sizeof(h));
        if (h.magic != PERSIST_MAGIC || h.version != PERSIST_VERSION || h.header_size != PERSIST_HEADER_SIZE ||
            h.header_sum != header_sum(&h) || !buf_is_cstr(h.name, sizeof(h.name)) ||
            !buf_is_cstr(h.tag, sizeof(h.tag)))
                return refuse(dir, decl->name, -EBADMSG, "has a header that fails its checksum");
        if (!streq(h.name, decl->name) || h.map_size != zone_map_size(decl->size) || !streq(h.tag, decl->tag) ||
            h.map_size < SHMZ_ZONE_HEADER_SIZE || h.map_size % (uint64_t) sysconf(_SC_PAGESIZE) != 0)
                return refuse(dir, decl->name, -EINVAL,
                              "does not fit the declaration (name, size or tag changed since it was written)");
        if ((uint64_t) st.st_size != PERSIST_HEADER_SIZE + h.map_size)
                return refuse(dir, decl->name, -EBADMSG, "is truncated");

        buf = malloc(CHUNK);
        if (!buf)
                return log_oom();
        (void) snprintf(memfd_name, sizeof(memfd_name), "shmzone:%s", decl->name);
        r = memfd_new_sealed(memfd_name, h.map_size, true, &zfd);
        if (r < 0)
                return log_error_errno(r, "Zone '%s': cannot make its memfd: %m", decl->name);
        for (uint64_t off = 0; off < h.map_size; off += CHUNK) {
                size_t n = (size_t) MIN(CHUNK, h.map_size - off);

                r = full_read(fd, buf, n, (off_t) (PERSIST_HEADER_SIZE + off));
                if (r < 0)
                        return refuse(dir, decl->name, -EBADMSG, "is truncated");
                sum = checksum64(buf, n, sum);
                r = full_write(zfd, buf, n, (off_t) off);
                if (r < 0)
                        return log_error_errno(r, "Zone '%s': cannot fill its memfd: %m", decl->name);
        }
        /* Checked before anything of it is used: a refused copy never reaches a zone. */
        if (sum != h.data_sum)
                return refuse(dir, decl->name, -EBADMSG, "fails its checksum");
        r = make_whole(zfd, decl, &h);
        if (r < 0)
                return refuse(dir, decl->name, r, "holds a zone whose allocator cannot be repaired");
        *ret_hist = (struct zone_history){
                .ino = h.ino,
                .generation = h.generation,
                .created_usec = h.created_usec,
                .mtime_usec = h.mtime_usec,
                .ctime_usec = h.ctime_usec,
        };
        strncpy_buf(ret_hist->tag, sizeof(ret_hist->tag), h.tag);
        log_info("Zone '%s': restored from %s (%" PRIu64 " bytes).", decl->name, path, h.size);
        *ret_fd = TAKE_FD(zfd);
        return 0;
}
