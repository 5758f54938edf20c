/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The daemon's core, in process: no socket, no FUSE, no root. Callers are
 * made by hand (uid, gid, supplementary groups) the way the front ends make
 * them from SO_PEERCRED or fuse_req_ctx. Every test ends with registry_free()
 * and the build is sanitized, so a zone or ticket left behind is a leak.
 */
#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <syslog.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/lsan_interface.h>
#define HAVE_LSAN 1
#endif

#include "registry.h"
#include "shmzone.h"
#include "util.h"
#include "zone-header.h"

#define HDR ((uint64_t) SHMZ_ZONE_HEADER_SIZE)

/* The cast of callers. OWNER owns the zones below, which belong to group 2000. */
static const gid_t owner_groups[] = { 2000, 4000 };
static const gid_t supp_groups[] = { 3000, 2000 };
static const gid_t other_groups[] = { 3000, 4000 };
static const struct caller ROOT = { .uid = 0, .gid = 0 };
static const struct caller OWNER = { .uid = 1000, .gid = 1000, .groups = owner_groups, .n_groups = 2 };
static const struct caller GRP = { .uid = 1001, .gid = 2000 };
static const struct caller SUPP = { .uid = 1002, .gid = 1002, .groups = supp_groups, .n_groups = 2 };
static const struct caller OTHER = { .uid = 1003, .gid = 1003, .groups = other_groups, .n_groups = 2 };
static const struct caller USER_B = { .uid = 1010, .gid = 1010 };
static const struct caller USER_C = { .uid = 1020, .gid = 1020 };

static struct registry *reg;
static uint64_t page;

static uint64_t pages(uint64_t n) {
        return n * page;
}

/* The usable size whose zone takes exactly n pages (header included). */
static uint64_t size_for(uint64_t n) {
        cr_assert_gt(pages(n), HDR);
        return pages(n) - HDR;
}

static void setup_limits(uint64_t budget, uint64_t quota, uint64_t max_zones) {
        struct registry_limits lim = { .budget = budget, .quota = quota, .max_zones = max_zones };

        page = (uint64_t) sysconf(_SC_PAGESIZE);
        registry_free(reg);
        cr_assert_eq(registry_new(&lim, &reg), 0);
}

static void setup(void) {
        setup_limits(UINT64_C(1) << 30, UINT64_C(256) << 20, 100);
}

static void teardown(void) {
        reg = registry_free(reg);
}

/*
 * Ends a test: the registry goes, and with it every zone and ticket it holds
 * (all attachments were detached). LeakSanitizer's report at exit does not
 * fail a criterion test, so ask it here.
 */
static void finish(void) {
        reg = registry_free(reg);
#ifdef HAVE_LSAN
        cr_assert_eq(__lsan_do_recoverable_leak_check(), 0, "leaked (LeakSanitizer's report above)");
#endif
}

static void expect_stats(uint64_t used, uint64_t zones, uint64_t unlinked) {
        struct registry_stats st;

        registry_get_stats(reg, &st);
        cr_assert_eq(st.budget_used, used, "budget_used %" PRIu64 ", expected %" PRIu64, st.budget_used, used);
        cr_assert_eq(st.zones, zones, "zones %" PRIu64 ", expected %" PRIu64, st.zones, zones);
        cr_assert_eq(st.zones_unlinked, unlinked, "zones_unlinked %" PRIu64 ", expected %" PRIu64, st.zones_unlinked,
                     unlinked);
}

/* fds of this process on the memfd of zone `name`: 0 once the zone's memory is gone. */
static unsigned memfds_of(const char *name) {
        char want[SHMZ_NAME_BUF + 64], link[PATH_MAX];
        unsigned n = 0;
        struct dirent *de;
        DIR *d;

        (void) snprintf(want, sizeof(want), "/memfd:shmzone:%s (deleted)", name);
        d = opendir("/proc/self/fd");
        cr_assert_not_null(d);
        while ((de = readdir(d))) {
                ssize_t l;

                l = readlinkat(dirfd(d), de->d_name, link, sizeof(link) - 1);
                if (l < 0)
                        continue;
                link[l] = 0;
                if (streq(link, want))
                        n++;
        }
        closedir(d);
        return n;
}

static int open_zone(const struct caller *c, const char *name, uint64_t size, unsigned flags, struct zone **ret_z,
                     int *ret_fd, struct shmz_msg_zone_info *ret_info) {
        struct shmz_msg_zone_info info;
        struct zone *z = NULL;
        int fd = -EBADF, r;

        r = registry_open(reg, c, name, size, NULL, flags, &z, &fd, &info, NULL);
        if (r < 0) {
                cr_assert_eq(fd, -EBADF, "a failed open handed out an fd");
                return r;
        }
        cr_assert_geq(fd, 0);
        cr_assert_not_null(z);
        if (ret_info)
                *ret_info = info;
        *ret_z = z;
        *ret_fd = fd;
        return 0;
}

static void close_zone(struct zone *z, int fd) {
        registry_detach(reg, z, &ROOT); /* the callers here all have pid 0: one holder record */
        cr_assert_eq(close(fd), 0);
}

/* Creates and detaches at once: a zone of c's that nobody holds. */
static uint64_t make_attached_and_detach(const struct caller *c, const char *name, uint64_t size) {
        struct shmz_msg_zone_info info;
        struct zone *z;
        int fd;

        cr_assert_eq(open_zone(c, name, size, SHMZ_CREATE, &z, &fd, &info), 0, "creating %s", name);
        close_zone(z, fd);
        return info.ino;
}

/*
 * A sized zone nobody attached to yet (pending, then sized by root: mode 0000
 * must not stop the test from making it), owned by uid:gid.
 */
static uint64_t make_zone(const char *name, uid_t uid, gid_t gid, uint32_t mode, uint64_t size) {
        struct caller creator = { .uid = uid, .gid = gid };
        struct shmz_msg_zone_info info;

        cr_assert_eq(registry_create_pending(reg, &creator, name, mode, &info), 0, "creating %s", name);
        cr_assert(info.flags & SHMZ_ZONE_INFO_PENDING);
        cr_assert_eq(registry_set_size(reg, &ROOT, name, info.ino, size), 0);
        cr_assert_eq(registry_info(reg, name, &info), 0);
        cr_assert_eq(info.uid, uid);
        cr_assert_eq(info.gid, gid);
        cr_assert_eq(info.mode, mode);
        cr_assert_not(info.flags & SHMZ_ZONE_INFO_PENDING);
        return info.ino;
}

static struct shmz_zone_header read_header(int fd) {
        struct shmz_zone_header h;

        cr_assert_eq(pread(fd, &h, sizeof(h), 0), (ssize_t) sizeof(h));
        cr_assert_eq(h.magic, SHMZ_ZONE_MAGIC);
        return h;
}

static int accmode(int fd) {
        int fl = fcntl(fd, F_GETFL);

        cr_assert_geq(fl, 0);
        return fl & O_ACCMODE;
}

TestSuite(core, .init = setup, .fini = teardown, .timeout = 30);

/* ---- ACL -------------------------------------------------------------------------------- */

/* Each is one of "rw" (both opens), "r" (read-only open only), "-" (neither). */
static const struct acl_row {
        uint32_t mode;
        const char *owner, *grp, *supp, *other, *root;
} acl_rows[] = {
        { 0600, "rw", "-", "-", "-", "rw" },
        { 0640, "rw", "r", "r", "-", "rw" },
        { 0660, "rw", "rw", "rw", "-", "rw" },
        { 0604, "rw", "-", "-", "r", "rw" },
        { 0666, "rw", "rw", "rw", "rw", "rw" },
        { 0644, "rw", "r", "r", "r", "rw" },
        { 0400, "r", "-", "-", "-", "rw" },
        { 0200, "-", "-", "-", "-", "rw" }, /* writing needs reading too */
        { 0000, "-", "-", "-", "-", "rw" },
        /* The owner's class decides for the owner, even when it is in the group and the group may write. */
        { 0460, "r", "rw", "rw", "-", "rw" },
        /* The group's class decides for members, even when "other" may do more. */
        { 0046, "-", "r", "r", "rw", "rw" },
        { 0006, "-", "-", "-", "rw", "rw" },
        { 0020, "-", "-", "-", "-", "rw" },
};

static void check_open(const char *name, uint32_t mode, const char *who, const struct caller *c, const char *expect) {
        bool want_r = strchr(expect, 'r'), want_w = strchr(expect, 'w');
        struct shmz_msg_zone_info info;
        struct zone *z;
        int fd, r;

        r = open_zone(c, name, 0, SHMZ_RDONLY, &z, &fd, &info);
        cr_assert_eq(r, want_r ? 0 : -EACCES, "mode %04o, %s, read-only open: %d", mode, who, r);
        if (r == 0) {
                cr_assert_eq(accmode(fd), O_RDONLY);
                cr_assert_eq(info.mode, mode);
                close_zone(z, fd);
        }
        r = open_zone(c, name, 0, 0, &z, &fd, NULL);
        cr_assert_eq(r, want_w ? 0 : -EACCES, "mode %04o, %s, read-write open: %d", mode, who, r);
        if (r == 0) {
                cr_assert_eq(accmode(fd), O_RDWR);
                close_zone(z, fd);
        }
}

Test(core, acl_open_matrix) {
        for (size_t i = 0; i < ELEMENTSOF(acl_rows); i++) {
                const struct acl_row *row = &acl_rows[i];
                char name[32];

                (void) snprintf(name, sizeof(name), "acl-%04o", row->mode);
                (void) make_zone(name, OWNER.uid, 2000, row->mode, 1);
                check_open(name, row->mode, "owner", &OWNER, row->owner);
                check_open(name, row->mode, "group (primary gid)", &GRP, row->grp);
                check_open(name, row->mode, "group (supplementary only)", &SUPP, row->supp);
                check_open(name, row->mode, "other", &OTHER, row->other);
                check_open(name, row->mode, "root", &ROOT, row->root);
        }
        expect_stats(ELEMENTSOF(acl_rows) * zone_map_size(1), ELEMENTSOF(acl_rows), 0);
        finish();
}

/* Permission comes first: a stranger learns nothing of the tag or size by the error. */
Test(core, acl_before_tag_and_size) {
        (void) make_zone("secret", OWNER.uid, 2000, 0600, 1);
        cr_assert_eq(registry_open(reg, &OTHER, "secret", 0, "wrong-tag", 0, &(struct zone *){ NULL }, &(int){ -1 },
                                   NULL, NULL),
                     -EACCES);
        cr_assert_eq(registry_open(reg, &OTHER, "secret", pages(100), NULL, SHMZ_RDONLY, &(struct zone *){ NULL },
                                   &(int){ -1 }, NULL, NULL),
                     -EACCES);
        cr_assert_eq(registry_open(reg, &OTHER, "secret", 0, NULL, SHMZ_CREATE | SHMZ_EXCL, &(struct zone *){ NULL },
                                   &(int){ -1 }, NULL, NULL),
                     -EACCES);
        /* The owner gets the real answers. */
        cr_assert_eq(registry_open(reg, &OWNER, "secret", 0, "wrong-tag", 0, &(struct zone *){ NULL }, &(int){ -1 },
                                   NULL, NULL),
                     -EEXIST);
        cr_assert_eq(registry_open(reg, &OWNER, "secret", pages(100), NULL, 0, &(struct zone *){ NULL }, &(int){ -1 },
                                   NULL, NULL),
                     -EINVAL);
        finish();
}

static const struct setattr_row {
        const char *what;
        const struct caller *c;
        uint32_t mask, mode, uid, gid;
        int expect;
} setattr_rows[] = {
        { "root chmod", &ROOT, SHMZ_SETATTR_MODE, 0604, 0, 0, 0 },
        { "root gives it away", &ROOT, SHMZ_SETATTR_UID, 0, 1003, 0, 0 },
        { "root chgrp to any group", &ROOT, SHMZ_SETATTR_GID, 0, 0, 9999, 0 },
        { "root chown uid and gid", &ROOT, SHMZ_SETATTR_UID | SHMZ_SETATTR_GID, 0, 1001, 1001, 0 },
        { "owner chmod", &OWNER, SHMZ_SETATTR_MODE, 0666, 0, 0, 0 },
        { "owner gives it away", &OWNER, SHMZ_SETATTR_UID, 0, 1003, 0, -EPERM },
        { "owner chown to itself", &OWNER, SHMZ_SETATTR_UID, 0, 1000, 0, 0 },
        { "owner chgrp to its primary gid", &OWNER, SHMZ_SETATTR_GID, 0, 0, 1000, 0 },
        { "owner chgrp to a supplementary group", &OWNER, SHMZ_SETATTR_GID, 0, 0, 4000, 0 },
        { "owner chgrp to a group not its own", &OWNER, SHMZ_SETATTR_GID, 0, 0, 5000, -EPERM },
        { "owner gives it away with a chgrp", &OWNER, SHMZ_SETATTR_UID | SHMZ_SETATTR_GID, 0, 1003, 4000, -EPERM },
        { "owner chmod and bad chgrp", &OWNER, SHMZ_SETATTR_MODE | SHMZ_SETATTR_GID, 0666, 0, 5000, -EPERM },
        { "group member chmod", &GRP, SHMZ_SETATTR_MODE, 0666, 0, 0, -EPERM },
        { "group member chgrp to the same group", &GRP, SHMZ_SETATTR_GID, 0, 0, 2000, -EPERM },
        { "group member takes it", &GRP, SHMZ_SETATTR_UID, 0, 1001, 0, -EPERM },
        { "supplementary member chmod", &SUPP, SHMZ_SETATTR_MODE, 0666, 0, 0, -EPERM },
        { "stranger chmod", &OTHER, SHMZ_SETATTR_MODE, 0666, 0, 0, -EPERM },
        { "stranger takes it", &OTHER, SHMZ_SETATTR_UID, 0, 1003, 0, -EPERM },
        { "stranger chgrp to its own group", &OTHER, SHMZ_SETATTR_GID, 0, 0, 1003, -EPERM },
        { "stranger chown to the current owner", &OTHER, SHMZ_SETATTR_UID, 0, 1000, 0, -EPERM },
        { "mode beyond 07777", &ROOT, SHMZ_SETATTR_MODE, 010600, 0, 0, -EINVAL },
        { "unknown mask bit", &ROOT, 0x100, 0, 0, 0, -EINVAL },
};

Test(core, setattr_rules) {
        for (size_t i = 0; i < ELEMENTSOF(setattr_rows); i++) {
                const struct setattr_row *row = &setattr_rows[i];
                struct shmz_msg_zone_info before, after;
                struct shmz_zone_header h;
                struct zone *z;
                char name[32];
                int fd, r;

                (void) snprintf(name, sizeof(name), "attr-%zu", i);
                (void) make_zone(name, OWNER.uid, 2000, 0640, 1);
                cr_assert_eq(registry_info(reg, name, &before), 0);
                r = registry_setattr(reg, row->c, name, 0, row->mask, row->mode, row->uid, row->gid);
                cr_assert_eq(r, row->expect, "%s: %d, expected %d", row->what, r, row->expect);
                cr_assert_eq(registry_info(reg, name, &after), 0);
                if (r < 0) {
                        cr_assert_eq(after.uid, before.uid, "%s: refused but changed the owner", row->what);
                        cr_assert_eq(after.gid, before.gid, "%s: refused but changed the group", row->what);
                        cr_assert_eq(after.mode, before.mode, "%s: refused but changed the mode", row->what);
                        continue;
                }
                cr_assert_eq(after.mode, row->mask & SHMZ_SETATTR_MODE ? row->mode : before.mode, "%s", row->what);
                cr_assert_eq(after.uid, row->mask & SHMZ_SETATTR_UID ? row->uid : before.uid, "%s", row->what);
                cr_assert_eq(after.gid, row->mask & SHMZ_SETATTR_GID ? row->gid : before.gid, "%s", row->what);
                /* The zone's own header follows (self-describing after a restart). */
                cr_assert_eq(open_zone(&ROOT, name, 0, SHMZ_RDONLY, &z, &fd, NULL), 0);
                h = read_header(fd);
                cr_assert_eq(h.uid, after.uid, "%s: header uid", row->what);
                cr_assert_eq(h.gid, after.gid, "%s: header gid", row->what);
                cr_assert_eq(h.mode, after.mode, "%s: header mode", row->what);
                close_zone(z, fd);
        }
        finish();
}

/* The FUSE view acts on an inode: a zone made again under the name must not receive the change. */
Test(core, setattr_by_stale_ino) {
        uint64_t old_ino = make_zone("reborn", OWNER.uid, 2000, 0640, 1), new_ino;
        struct shmz_msg_zone_info info;

        cr_assert_eq(registry_unlink(reg, &OWNER, "reborn"), 0);
        new_ino = make_zone("reborn", OWNER.uid, 2000, 0640, 1);
        cr_assert_neq(old_ino, new_ino);
        cr_assert_eq(registry_setattr(reg, &ROOT, "reborn", old_ino, SHMZ_SETATTR_MODE, 0666, 0, 0), -ENOENT);
        cr_assert_eq(registry_set_tag(reg, &ROOT, "reborn", old_ino, "x"), -ENOENT);
        cr_assert_eq(registry_info(reg, "reborn", &info), 0);
        cr_assert_eq(info.mode, 0640);
        cr_assert_str_empty(info.tag);
        cr_assert_eq(registry_setattr(reg, &ROOT, "reborn", new_ino, SHMZ_SETATTR_MODE, 0666, 0, 0), 0);
        cr_assert_eq(registry_set_tag(reg, &ROOT, "reborn", new_ino, "x"), 0);
        finish();
}

static const struct unlink_row {
        const char *what;
        const struct caller *c;
        int expect;
} unlink_rows[] = {
        { "owner", &OWNER, 0 },
        { "root", &ROOT, 0 },
        { "group member (primary gid)", &GRP, -EPERM },
        { "group member (supplementary)", &SUPP, -EPERM },
        { "stranger", &OTHER, -EPERM },
};

Test(core, unlink_rules) {
        for (size_t i = 0; i < ELEMENTSOF(unlink_rows); i++) {
                const struct unlink_row *row = &unlink_rows[i];
                struct shmz_msg_zone_info info;
                int r;

                /* Even a zone everyone may write to is unlinked by its owner or root only (no sticky-less dir). */
                (void) make_zone("victim", OWNER.uid, 2000, 0666, 1);
                r = registry_unlink(reg, row->c, "victim");
                cr_assert_eq(r, row->expect, "%s: %d", row->what, r);
                cr_assert_eq(registry_info(reg, "victim", &info), r == 0 ? -ENOENT : 0, "%s", row->what);
                if (r < 0)
                        cr_assert_eq(registry_unlink(reg, &OWNER, "victim"), 0);
                expect_stats(0, 0, 0);
        }
        cr_assert_eq(registry_unlink(reg, &ROOT, "victim"), -ENOENT);
        cr_assert_eq(registry_unlink(reg, &ROOT, "../victim"), -EINVAL);
        cr_assert_eq(registry_unlink(reg, &ROOT, ""), -EINVAL);
        finish();
}

static const struct tag_row {
        const char *what;
        const struct caller *c;
        int expect;
} tag_rows[] = {
        { "owner", &OWNER, 0 },
        { "root", &ROOT, 0 },
        { "group member with write access", &GRP, -EPERM },
        { "supplementary member with write access", &SUPP, -EPERM },
        { "stranger with write access", &OTHER, -EPERM },
};

Test(core, set_tag_rules) {
        for (size_t i = 0; i < ELEMENTSOF(tag_rows); i++) {
                const struct tag_row *row = &tag_rows[i];
                struct shmz_msg_zone_info info;
                char name[32];
                struct zone *z;
                int fd, r;

                (void) snprintf(name, sizeof(name), "tag-%zu", i);
                (void) make_zone(name, OWNER.uid, 2000, 0666, 1);
                r = registry_set_tag(reg, row->c, name, 0, "fresh");
                cr_assert_eq(r, row->expect, "%s: %d", row->what, r);
                cr_assert_eq(registry_info(reg, name, &info), 0);
                cr_assert_str_eq(info.tag, r == 0 ? "fresh" : "", "%s", row->what);
                if (r < 0)
                        continue;
                /* The header's copy follows, and opens now need the new tag. */
                cr_assert_eq(registry_open(reg, row->c, name, 0, "fresh", 0, &z, &fd, NULL, NULL), 0);
                cr_assert_str_eq(read_header(fd).tag, "fresh");
                /* Attached: the tag says what the bytes mean; it cannot change under a user. */
                cr_assert_eq(registry_set_tag(reg, row->c, name, 0, "other"), -EBUSY, "%s, attached", row->what);
                close_zone(z, fd);
                /* Once used it stays fixed, attached or not. */
                cr_assert_eq(registry_set_tag(reg, row->c, name, 0, "other"), -EBUSY, "%s, used", row->what);
                cr_assert_eq(registry_info(reg, name, &info), 0);
                cr_assert_str_eq(info.tag, "fresh");
        }
        cr_assert_eq(registry_set_tag(reg, &ROOT, "tag-0", 0, "bad\ttag"), -EINVAL);
        cr_assert_eq(registry_set_tag(reg, &ROOT, "missing", 0, "x"), -ENOENT);
        finish();
}

/* A pending zone (FUSE create before truncate) may be tagged; nobody used it yet. */
Test(core, set_tag_pending) {
        struct shmz_msg_zone_info info;

        cr_assert_eq(registry_create_pending(reg, &OWNER, "pend", 0600, &info), 0);
        cr_assert_eq(registry_set_tag(reg, &OWNER, "pend", info.ino, "early"), 0);
        cr_assert_eq(registry_set_size(reg, &OWNER, "pend", info.ino, 1), 0);
        cr_assert_eq(registry_info(reg, "pend", &info), 0);
        cr_assert_str_eq(info.tag, "early");
        cr_assert_eq(registry_set_tag(reg, &OWNER, "pend", info.ino, "late"), 0, "not used yet");
        finish();
}

/* ---- open --------------------------------------------------------------------------------- */

Test(core, open_rules) {
        struct shmz_msg_zone_info info;
        struct zone *z, *z2;
        bool existed = true;
        int fd, fd2;

        cr_assert_eq(open_zone(&OWNER, "o", 0, 0, &z, &fd, NULL), -ENOENT);
        cr_assert_eq(open_zone(&OWNER, "o", 0, SHMZ_CREATE, &z, &fd, NULL), -EINVAL, "creating needs a size");
        cr_assert_eq(open_zone(&OWNER, "../o", 1, SHMZ_CREATE, &z, &fd, NULL), -EINVAL);
        cr_assert_eq(open_zone(&OWNER, "o", 1, SHMZ_CREATE | 0x100, &z, &fd, NULL), -EINVAL);
        cr_assert_eq(registry_open(reg, &OWNER, "o", 1, "tab\there", SHMZ_CREATE, &z, &fd, NULL, NULL), -EINVAL);
        expect_stats(0, 0, 0);

        cr_assert_eq(registry_open(reg, &OWNER, "o", 1, "t", SHMZ_CREATE, &z, &fd, &info, &existed), 0);
        cr_assert_not(existed, "a new zone has no data yet");
        /* What a client's zone starts as: its creator's, 0600. */
        cr_assert_eq(info.uid, OWNER.uid);
        cr_assert_eq(info.gid, OWNER.gid);
        cr_assert_eq(info.mode, 0600);
        cr_assert_eq(info.attached, 1);
        cr_assert_geq(info.ino, REGISTRY_FIRST_INO);
        cr_assert_not(info.flags & (SHMZ_ZONE_INFO_DECLARED | SHMZ_ZONE_INFO_UNLINKED | SHMZ_ZONE_INFO_PENDING));

        cr_assert_eq(registry_open(reg, &OWNER, "o", 1, "t", SHMZ_CREATE | SHMZ_EXCL, &z2, &fd2, NULL, NULL), -EEXIST);
        cr_assert_eq(registry_open(reg, &OWNER, "o", 1, "other", SHMZ_CREATE, &z2, &fd2, NULL, NULL), -EEXIST);
        cr_assert_eq(registry_open(reg, &OWNER, "o", 1, NULL, 0, &z2, &fd2, NULL, NULL), -EEXIST, "tag '' != 't'");
        cr_assert_eq(registry_open(reg, &OWNER, "o", pages(3), "t", 0, &z2, &fd2, NULL, NULL), -EINVAL);
        /* Another size within the same pages is the same zone. */
        cr_assert_eq(registry_open(reg, &OWNER, "o", page - HDR % page, "t", 0, &z2, &fd2, &info, &existed), 0);
        cr_assert(existed);
        cr_assert_eq(z2, z);
        cr_assert_eq(info.attached, 2);
        close_zone(z2, fd2);
        cr_assert_eq(registry_open(reg, &OWNER, "o", 0, "t", 0, &z2, &fd2, &info, NULL), 0, "size 0: whatever it is");
        cr_assert_eq(info.attached, 2);
        close_zone(z2, fd2);
        close_zone(z, fd);
        cr_assert_eq(registry_info(reg, "o", &info), 0);
        cr_assert_eq(info.attached, 0);
        expect_stats(zone_map_size(1), 1, 0);

        /* A pending zone has no memory to hand out yet. */
        cr_assert_eq(registry_create_pending(reg, &OWNER, "p", 0600, NULL), 0);
        cr_assert_eq(registry_create_pending(reg, &OWNER, "p", 0600, NULL), -EEXIST);
        cr_assert_eq(open_zone(&OWNER, "p", 1, SHMZ_CREATE, &z, &fd, NULL), -EAGAIN);
        cr_assert_eq(registry_set_size(reg, &OTHER, "p", 0, 1), -EACCES, "sizing a zone takes write access");
        cr_assert_eq(registry_set_size(reg, &OWNER, "p", 0, 0), -EINVAL);
        cr_assert_eq(registry_set_size(reg, &OWNER, "p", 0, size_for(2)), 0);
        cr_assert_eq(registry_set_size(reg, &OWNER, "p", 0, size_for(2)), 0, "the same size again");
        cr_assert_eq(registry_set_size(reg, &OWNER, "p", 0, size_for(3)), -EINVAL, "zones never change size");
        expect_stats(zone_map_size(1) + pages(2), 2, 0);
        finish();
}

/* A read-only attachment cannot be turned into a writable one through its fd. */
Test(core, rdonly_fd) {
        struct shmz_msg_zone_info info;
        struct zone *z;
        struct stat st;
        void *m;
        int fd, wfd;

        cr_assert_eq(open_zone(&OWNER, "ro", size_for(2), SHMZ_CREATE, &z, &wfd, NULL), 0);
        cr_assert_eq(accmode(wfd), O_RDWR);
        cr_assert_eq(pwrite(wfd, "x", 1, HDR), 1);

        cr_assert_eq(open_zone(&OWNER, "ro", 0, SHMZ_RDONLY, &z, &fd, &info), 0);
        cr_assert_eq(accmode(fd), O_RDONLY);
        cr_assert_eq(fstat(fd, &st), 0);
        cr_assert_eq(st.st_mode & 07777, 0400, "memfd inode mode %04o", st.st_mode & 07777);
        cr_assert_eq((uint64_t) st.st_size, pages(2));
        cr_assert_eq(pwrite(fd, "y", 1, HDR), -1);
        cr_assert_eq(errno, EBADF);
        m = mmap(NULL, pages(2), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        cr_assert_eq(m, MAP_FAILED);
        cr_assert_eq(errno, EACCES);
        m = mmap(NULL, pages(2), PROT_READ, MAP_SHARED, fd, 0);
        cr_assert_neq(m, MAP_FAILED);
        cr_assert_eq(((const char *) m)[HDR], 'x', "the same memory as the writable fd");
        cr_assert_eq(mprotect(m, pages(2), PROT_READ | PROT_WRITE), -1);
        cr_assert_eq(munmap(m, pages(2)), 0);
        /* Reopening it writable fails by the inode's mode (root would pass by CAP_DAC_OVERRIDE). */
        if (geteuid() != 0) {
                char path[64];

                (void) snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
                cr_assert_eq(open(path, O_RDWR), -1);
                cr_assert_eq(errno, EACCES);
        }
        /* Sealed: nobody can shrink it under the others. */
        cr_assert_eq(ftruncate(wfd, (off_t) page), -1);
        cr_assert_eq(errno, EPERM);
        close_zone(z, fd);
        close_zone(z, wfd);
        finish();
}

/*
 * A setattr with mask 0 needs no permission, so it must change nothing: no ctime
 * bump, no header rewrite, no CHANGED event (anyone may send ZONE_SETATTR for any zone).
 */
static void count_events(void *userdata, enum registry_event ev, const char *name, uint64_t ino) {
        (*(unsigned *) userdata)++;
}

Test(core, setattr_empty_mask_changes_nothing) {
        struct shmz_msg_zone_info before, after;
        unsigned events = 0;
        int r;

        (void) make_zone("quiet", OWNER.uid, 2000, 0640, 1);
        cr_assert_eq(registry_info(reg, "quiet", &before), 0);
        registry_set_observer(reg, count_events, &events);
        (void) usleep(2000); /* a ctime bump would show */
        r = registry_setattr(reg, &OTHER, "quiet", 0, 0, 0, 0, 0);
        cr_assert(r == 0 || r == -EPERM, "%d", r);
        cr_assert_eq(registry_info(reg, "quiet", &after), 0);
        cr_assert_eq(events, 0, "a stranger's empty setattr told the observer of a change");
        cr_assert_eq(after.ctime_usec, before.ctime_usec, "a stranger's empty setattr bumped the ctime");
        finish();
}

/* ---- quota and budget --------------------------------------------------------------------- */

Test(core, page_rounding) {
        static const uint64_t sizes[] = { 1, 100, 4095, 4096, 4097, 65536, 1000000 };
        struct shmz_msg_zone_info info;
        uint64_t used = 0;

        for (size_t i = 0; i < ELEMENTSOF(sizes); i++) {
                uint64_t m = zone_map_size(sizes[i]);
                char name[32];

                /* Whole pages, room for the header and the size, not a page more. */
                cr_assert_eq(m % page, 0);
                cr_assert_geq(m, sizes[i] + HDR);
                cr_assert_lt(m - page, sizes[i] + HDR);
                (void) snprintf(name, sizeof(name), "r%zu", i);
                (void) make_attached_and_detach(&OWNER, name, sizes[i]);
                cr_assert_eq(registry_info(reg, name, &info), 0);
                cr_assert_eq(info.map_size, m);
                cr_assert_eq(info.size, m - HDR, "the usable size is what the pages hold");
                used += m;
                expect_stats(used, i + 1, 0);
        }
        cr_assert_eq(zone_map_size(size_for(2)), pages(2));
        cr_assert_eq(zone_map_size(size_for(2) + 1), pages(3));
        finish();
}

Test(core, huge_sizes_charge_nothing) {
        static const uint64_t huge[] = { UINT64_MAX, UINT64_MAX / 2 + 1, UINT64_MAX - HDR, UINT64_MAX - 1 };
        struct shmz_msg_zone_info info;
        struct zone *z;
        int fd;

        setup_limits(pages(10), pages(10), 3);
        for (size_t i = 0; i < ELEMENTSOF(huge); i++) {
                cr_assert_eq(zone_map_size(huge[i]), 0);
                cr_assert_eq(open_zone(&OWNER, "huge", huge[i], SHMZ_CREATE, &z, &fd, NULL), -EINVAL, "size %" PRIu64,
                             huge[i]);
                cr_assert_eq(registry_info(reg, "huge", &info), -ENOENT);
                expect_stats(0, 0, 0);
        }
        /* The largest size that has a map size is refused by the budget instead. */
        cr_assert_neq(zone_map_size(UINT64_MAX / 2), 0);
        cr_assert_eq(open_zone(&OWNER, "huge", UINT64_MAX / 2, SHMZ_CREATE, &z, &fd, NULL), -ENOSPC);
        expect_stats(0, 0, 0);

        /* The same through a pending zone's size. */
        cr_assert_eq(registry_create_pending(reg, &OWNER, "pend", 0600, NULL), 0);
        for (size_t i = 0; i < ELEMENTSOF(huge); i++)
                cr_assert_eq(registry_set_size(reg, &OWNER, "pend", 0, huge[i]), -EINVAL);
        cr_assert_eq(registry_set_size(reg, &OWNER, "pend", 0, UINT64_MAX / 2), -ENOSPC);
        cr_assert_eq(registry_info(reg, "pend", &info), 0);
        cr_assert(info.flags & SHMZ_ZONE_INFO_PENDING);
        cr_assert_eq(info.map_size, 0);
        expect_stats(0, 1, 0);

        /* Nor did the failures use up zone counts: pend + two more is the uid's max of 3. */
        (void) make_attached_and_detach(&OWNER, "a", 1);
        (void) make_attached_and_detach(&OWNER, "b", 1);
        cr_assert_eq(open_zone(&OWNER, "c", 1, SHMZ_CREATE, &z, &fd, NULL), -EDQUOT);
        expect_stats(2 * zone_map_size(1), 3, 0);
        finish();
}

Test(core, uid_quota_edges) {
        struct zone *z1, *z;
        int fd1, fd;

        setup_limits(pages(10), pages(4), 100);
        /* One zone exactly the quota; a byte more is a page more. */
        cr_assert_eq(open_zone(&OWNER, "q1", size_for(4) + 1, SHMZ_CREATE, &z, &fd, NULL), -EDQUOT);
        expect_stats(0, 0, 0);
        cr_assert_eq(open_zone(&OWNER, "q1", size_for(5), SHMZ_CREATE, &z, &fd, NULL), -EDQUOT);
        expect_stats(0, 0, 0);
        (void) make_attached_and_detach(&OWNER, "q1", size_for(4));
        expect_stats(pages(4), 1, 0);
        cr_assert_eq(open_zone(&OWNER, "q2", 1, SHMZ_CREATE, &z, &fd, NULL), -EDQUOT);
        expect_stats(pages(4), 1, 0);
        cr_assert_eq(registry_unlink(reg, &OWNER, "q1"), 0);
        expect_stats(0, 0, 0);

        /* Two zones that together fill it exactly, then not a page more. */
        cr_assert_eq(open_zone(&OWNER, "q1", size_for(2), SHMZ_CREATE, &z1, &fd1, NULL), 0);
        cr_assert_eq(open_zone(&OWNER, "q2", size_for(3), SHMZ_CREATE, &z, &fd, NULL), -EDQUOT);
        expect_stats(pages(2), 1, 0);
        (void) make_attached_and_detach(&OWNER, "q2", size_for(2));
        expect_stats(pages(4), 2, 0);
        cr_assert_eq(open_zone(&OWNER, "q3", 1, SHMZ_CREATE, &z, &fd, NULL), -EDQUOT);
        /* A pending zone costs no bytes until sized; sizing it is charged like creating. */
        cr_assert_eq(registry_create_pending(reg, &OWNER, "q3", 0600, NULL), 0);
        cr_assert_eq(registry_set_size(reg, &OWNER, "q3", 0, 1), -EDQUOT);
        expect_stats(pages(4), 3, 0);
        cr_assert_eq(registry_unlink(reg, &OWNER, "q3"), 0);

        /* Another uid has a quota of its own; the budget is everyone's. */
        (void) make_attached_and_detach(&USER_B, "b1", size_for(4));
        expect_stats(pages(8), 3, 0);
        cr_assert_eq(open_zone(&USER_C, "c1", size_for(3), SHMZ_CREATE, &z, &fd, NULL), -ENOSPC);
        expect_stats(pages(8), 3, 0);
        (void) make_attached_and_detach(&USER_C, "c1", size_for(2));
        expect_stats(pages(10), 4, 0);
        cr_assert_eq(open_zone(&USER_C, "c2", 1, SHMZ_CREATE, &z, &fd, NULL), -ENOSPC);
        cr_assert_eq(open_zone(&ROOT, "r1", 1, SHMZ_CREATE, &z, &fd, NULL), -ENOSPC, "root has no budget of its own");
        expect_stats(pages(10), 4, 0);

        /* Unlinked but attached: the bytes stay charged until the last detach. */
        cr_assert_eq(registry_unlink(reg, &OWNER, "q1"), 0);
        expect_stats(pages(10), 3, 1);
        cr_assert_eq(open_zone(&USER_C, "c2", 1, SHMZ_CREATE, &z, &fd, NULL), -ENOSPC);
        cr_assert_eq(memfds_of("q1"), 2, "the registry's and the attachment's");
        close_zone(z1, fd1);
        cr_assert_eq(memfds_of("q1"), 0, "freed at the last detach");
        expect_stats(pages(8), 3, 0);
        /* Both the budget and OWNER's quota got the two pages back. */
        (void) make_attached_and_detach(&OWNER, "q1", size_for(2));
        expect_stats(pages(10), 4, 0);
        finish();
}

Test(core, uid_max_zones) {
        struct zone *z1, *z;
        int fd1, fd;

        setup_limits(pages(100), pages(50), 3);
        cr_assert_eq(open_zone(&OWNER, "z1", 1, SHMZ_CREATE, &z1, &fd1, NULL), 0);
        (void) make_attached_and_detach(&OWNER, "z2", 1);
        /* A failed create (bytes) must not use up a zone. */
        cr_assert_eq(open_zone(&OWNER, "z3", pages(60), SHMZ_CREATE, &z, &fd, NULL), -EDQUOT);
        (void) make_attached_and_detach(&OWNER, "z3", 1);
        expect_stats(3 * zone_map_size(1), 3, 0);
        cr_assert_eq(open_zone(&OWNER, "z4", 1, SHMZ_CREATE, &z, &fd, NULL), -EDQUOT);
        cr_assert_eq(registry_create_pending(reg, &OWNER, "z4", 0600, NULL), -EDQUOT);
        expect_stats(3 * zone_map_size(1), 3, 0);
        /* Counted per uid. */
        (void) make_attached_and_detach(&USER_B, "b1", 1);
        expect_stats(4 * zone_map_size(1), 4, 0);

        /* Pending zones count (each may come to hold an fd). */
        cr_assert_eq(registry_unlink(reg, &OWNER, "z3"), 0);
        cr_assert_eq(registry_create_pending(reg, &OWNER, "p", 0600, NULL), 0);
        cr_assert_eq(open_zone(&OWNER, "z4", 1, SHMZ_CREATE, &z, &fd, NULL), -EDQUOT);

        /* Unlinked zones still attached count too, until their last detach. */
        cr_assert_eq(registry_unlink(reg, &OWNER, "z1"), 0);
        expect_stats(3 * zone_map_size(1), 3, 1);
        cr_assert_eq(open_zone(&OWNER, "z4", 1, SHMZ_CREATE, &z, &fd, NULL), -EDQUOT);
        close_zone(z1, fd1);
        expect_stats(2 * zone_map_size(1), 3, 0);
        (void) make_attached_and_detach(&OWNER, "z4", 1);
        cr_assert_eq(open_zone(&OWNER, "z5", 1, SHMZ_CREATE, &z, &fd, NULL), -EDQUOT);
        expect_stats(3 * zone_map_size(1), 4, 0);
        finish();
}

struct report_log {
        size_t n;
        struct {
                int prio;
                char msg[512];
        } e[32];
};

static void record_report(void *userdata, int priority, const char *msg) {
        struct report_log *log = userdata;

        cr_assert_lt(log->n, ELEMENTSOF(log->e));
        log->e[log->n].prio = priority;
        strncpy_buf(log->e[log->n].msg, sizeof(log->e[log->n].msg), msg);
        log->n++;
}

static struct zone_decl decl(const char *name, const char *tag, uint64_t size, uint32_t uid, uint32_t gid,
                             uint32_t mode) {
        struct zone_decl d = { .size = size, .uid = uid, .gid = gid, .mode = mode };

        strncpy_buf(d.name, sizeof(d.name), name);
        strncpy_buf(d.tag, sizeof(d.tag), tag);
        return d;
}

static int apply(const struct registry_limits *lim, const struct zone_decl *d, size_t n, struct report_log *log) {
        *log = (struct report_log){ 0 };
        return registry_apply_config(reg, lim, d, n, record_report, log);
}

/* The administrator's zones: the budget pays for them, no uid's quota or zone count does. */
Test(core, declared_zones_outside_quota) {
        struct registry_limits lim = { .budget = pages(10), .quota = pages(2), .max_zones = 1 };
        struct zone_decl d[3] = {
                decl("d1", "", size_for(4), OWNER.uid, OWNER.gid, 0600),
                decl("d2", "", size_for(2), OWNER.uid, OWNER.gid, 0600),
        };
        struct report_log log;
        struct registry_stats st;
        struct zone *z;
        int fd;

        setup_limits(pages(100), pages(100), 100);
        cr_assert_eq(apply(&lim, d, 2, &log), 0);
        registry_get_stats(reg, &st);
        cr_assert_eq(st.budget, pages(10), "the new limits apply");
        cr_assert_eq(st.quota, pages(2));
        expect_stats(pages(6), 2, 0);
        /* OWNER still has its whole quota and its one zone. */
        (void) make_attached_and_detach(&OWNER, "own", size_for(2));
        expect_stats(pages(8), 3, 0);
        cr_assert_eq(open_zone(&OWNER, "own2", 1, SHMZ_CREATE, &z, &fd, NULL), -EDQUOT);
        /* But the budget counts them. */
        d[2] = decl("d3", "", size_for(3), OWNER.uid, OWNER.gid, 0600);
        cr_assert_eq(apply(&lim, d, 3, &log), 1);
        cr_assert_eq(log.n, 1);
        cr_assert_eq(log.e[0].prio, LOG_ERR);
        cr_assert(strstr(log.e[0].msg, "'d3'") && strstr(log.e[0].msg, strerror(ENOSPC)), "%s", log.e[0].msg);
        expect_stats(pages(8), 3, 0);
        /* Retiring one frees its bytes (nobody attached), still nothing charged to OWNER. */
        d[0] = d[1];
        cr_assert_eq(apply(&lim, d, 1, &log), 0);
        expect_stats(pages(4), 2, 0);
        cr_assert_eq(memfds_of("d1"), 0);
        cr_assert_eq(open_zone(&OWNER, "own2", 1, SHMZ_CREATE, &z, &fd, NULL), -EDQUOT, "max_zones still 1");
        /* A huge declaration is refused and charges nothing either. */
        d[1] = decl("d4", "", UINT64_MAX, 0, 0, 0600);
        cr_assert_eq(apply(&lim, d, 2, &log), 1);
        cr_assert_eq(log.e[0].prio, LOG_ERR);
        expect_stats(pages(4), 2, 0);
        finish();
}

/* ---- tickets ----------------------------------------------------------------------------- */

static void issue(const char *name, bool writable, uint64_t t[2]) {
        struct shmz_msg_zone_info info;
        struct zone *z;

        /* As the FUSE view does: a reference for the open file, a ticket for it, the file released later. */
        cr_assert_eq(registry_info(reg, name, &info), 0);
        cr_assert_eq(registry_ref_by_ino(reg, info.ino, &z), 0);
        cr_assert_eq(registry_ticket_issue(reg, z, writable, t), 0);
        registry_unref(reg, z);
}

static int redeem(const uint64_t t[2], bool want_write, struct zone **z, int *fd, struct shmz_msg_zone_info *info) {
        *fd = -EBADF;
        return registry_ticket_redeem(reg, &ROOT, t, want_write, z, fd, info, NULL);
}

/* Holders: one record per process however often it attaches, bounded per zone, gone with the last detach. */
Test(core, holders_bounded_per_process) {
        enum { N = SHMZ_HOLDERS_MAX + 40 };
        static struct zone *zs[1000], *many[N];
        struct shmz_msg_zone_holders h;
        struct shmz_msg_zone_info info;
        struct caller p = OWNER;
        uint32_t seen = 0, after = 0;
        int fd;

        p.pid = 4242;
        p.comm = "web\x01server name that is long";
        for (int i = 0; i < 1000; i++) {
                cr_assert_eq(registry_open(reg, &p, "h", pages(1), NULL, SHMZ_CREATE, &zs[i], &fd, NULL, NULL), 0);
                close(fd);
        }
        cr_assert_eq(registry_holders(reg, &p, "h", 0, 0, &h), 0);
        cr_assert_eq(h.processes, 1);
        cr_assert_eq(h.n, 1);
        cr_assert_eq(h.creator_pid, 4242);
        cr_assert_eq(h.creator_uid, OWNER.uid);
        cr_assert_eq(h.holders[0].pid, 4242);
        cr_assert_eq(h.holders[0].attachments, 1000);
        cr_assert_str_eq(h.holders[0].comm, "web?server name", "printable, cut to 15 bytes");
        cr_assert_gt(h.attach_usec, 0);
        cr_assert_eq(h.detach_usec, 0);
        /* Read permission needed: a stranger learns nothing of who uses the zone. */
        cr_assert_eq(registry_holders(reg, &OTHER, "h", 0, 0, &h), -EACCES);
        cr_assert_eq(registry_holders(reg, &p, "nope", 0, 0, &h), -ENOENT);

        /* Many processes: SHMZ_HOLDERS_MAX records, the rest counted only. */
        for (int i = 0; i < N; i++) {
                struct caller q = OWNER;

                q.pid = 10000 + i;
                cr_assert_eq(registry_open(reg, &q, "h", 0, NULL, 0, &many[i], &fd, NULL, NULL), 0);
                close(fd);
        }
        cr_assert_eq(registry_info(reg, "h", &info), 0);
        cr_assert_eq(info.attached, 1000 + N);
        cr_assert_eq(info.holders, SHMZ_HOLDERS_MAX + 1, "records, and one for the untracked");
        /* Pages by pid cover every record once, in order. */
        do {
                cr_assert_eq(registry_holders(reg, NULL, "h", 0, after, &h), 0);
                for (uint32_t k = 0; k < h.n; k++) {
                        cr_assert_gt(h.holders[k].pid, after);
                        after = h.holders[k].pid;
                        seen++;
                }
        } while (h.n == SHMZ_HOLDERS_PER_MSG);
        cr_assert_eq(seen, SHMZ_HOLDERS_MAX);
        cr_assert_eq(h.untracked, N + 1 - SHMZ_HOLDERS_MAX);

        for (int i = 0; i < N; i++) {
                struct caller q = OWNER;

                q.pid = 10000 + i;
                registry_detach(reg, many[i], &q);
        }
        for (int i = 0; i < 999; i++)
                registry_detach(reg, zs[i], &p);
        cr_assert_eq(registry_holders(reg, NULL, "h", 0, 0, &h), 0);
        cr_assert_eq(h.processes, 1);
        cr_assert_eq(h.untracked, 0);
        cr_assert_eq(h.holders[0].attachments, 1);
        cr_assert_gt(h.detach_usec, 0);
        registry_detach(reg, zs[999], &p);
        cr_assert_eq(registry_holders(reg, NULL, "h", 0, 0, &h), 0);
        cr_assert_eq(h.processes, 0);
        cr_assert_eq(h.n, 0);
        cr_assert_eq(h.last_pid, 4242);
}

Test(core, ticket_one_use) {
        struct shmz_msg_zone_info info;
        uint64_t t[2], t2[2], bogus[2] = { 0, 0 };
        struct zone *z, *z2;
        int fd, fd2;

        (void) make_zone("t", OWNER.uid, 2000, 0600, 1);
        issue("t", true, t);
        cr_assert(t[0] != 0 || t[1] != 0);
        cr_assert_eq(redeem(bogus, false, &z, &fd, NULL), -EACCES);
        cr_assert_eq(redeem(t, true, &z, &fd, &info), 0);
        cr_assert_eq(accmode(fd), O_RDWR);
        cr_assert_str_eq(info.name, "t");
        cr_assert_eq(info.attached, 1);
        cr_assert_eq(redeem(t, true, &z2, &fd2, NULL), -EACCES, "second use");
        cr_assert_eq(redeem(t, false, &z2, &fd2, NULL), -EACCES, "second use, read-only");
        cr_assert_eq(fd2, -EBADF);
        close_zone(z, fd);

        /* A writable ticket may be redeemed for less. */
        issue("t", true, t);
        cr_assert_eq(redeem(t, false, &z, &fd, NULL), 0);
        cr_assert_eq(accmode(fd), O_RDONLY);
        close_zone(z, fd);

        /* Two tickets for one zone are independent. */
        issue("t", false, t);
        issue("t", false, t2);
        cr_assert(t[0] != t2[0] || t[1] != t2[1]);
        cr_assert_eq(redeem(t2, false, &z, &fd, NULL), 0);
        close_zone(z, fd);
        cr_assert_eq(redeem(t, false, &z, &fd, NULL), 0);
        close_zone(z, fd);
        finish();
}

Test(core, ticket_revoked) {
        struct shmz_msg_zone_info info;
        uint64_t t[2];
        struct zone *z;
        int fd;

        (void) make_zone("t", OWNER.uid, 2000, 0600, 1);
        issue("t", true, t);
        registry_ticket_revoke(reg, t);
        cr_assert_eq(redeem(t, false, &z, &fd, NULL), -EACCES);
        registry_ticket_revoke(reg, t); /* twice: a no-op */

        /* A ticket keeps an unlinked zone alive; revoking it frees the zone. */
        issue("t", true, t);
        cr_assert_eq(registry_unlink(reg, &OWNER, "t"), 0);
        expect_stats(zone_map_size(1), 0, 1);
        cr_assert_eq(memfds_of("t"), 1);
        registry_ticket_revoke(reg, t);
        expect_stats(0, 0, 0);
        cr_assert_eq(memfds_of("t"), 0);
        cr_assert_eq(registry_info(reg, "t", &info), -ENOENT);
        finish();
}

Test(core, ticket_rdonly) {
        uint64_t t[2];
        struct zone *z;
        int fd;

        (void) make_zone("t", OWNER.uid, 2000, 0600, 1);
        issue("t", false, t);
        cr_assert_eq(redeem(t, true, &z, &fd, NULL), -EACCES);
        cr_assert_eq(fd, -EBADF);
        /* The failed attempt spent it. */
        cr_assert_eq(redeem(t, false, &z, &fd, NULL), -EACCES);

        issue("t", false, t);
        cr_assert_eq(redeem(t, false, &z, &fd, NULL), 0);
        cr_assert_eq(accmode(fd), O_RDONLY);
        close_zone(z, fd);
        finish();
}

/* A ticket names the zone its file was opened on, never a newer zone of the same name. */
Test(core, ticket_same_name_other_zone) {
        struct shmz_msg_zone_info old_info, new_info, info;
        struct zone *old_z, *new_z, *z;
        int old_fd, new_fd, fd;
        char c = 0;
        uint64_t t[2];

        cr_assert_eq(open_zone(&OWNER, "A", 1, SHMZ_CREATE, &old_z, &old_fd, &old_info), 0);
        cr_assert_eq(pwrite(old_fd, "O", 1, HDR), 1);
        close_zone(old_z, old_fd);
        issue("A", true, t);
        cr_assert_eq(registry_unlink(reg, &OWNER, "A"), 0);
        cr_assert_eq(open_zone(&OWNER, "A", 1, SHMZ_CREATE, &new_z, &new_fd, &new_info), 0);
        cr_assert_eq(pwrite(new_fd, "N", 1, HDR), 1);
        cr_assert_neq(new_info.ino, old_info.ino);
        expect_stats(2 * zone_map_size(1), 1, 1);

        /* What the code does: the ticket's reference kept the old zone, and that is what it attaches. */
        cr_assert_eq(redeem(t, true, &z, &fd, &info), 0);
        cr_assert_neq(z, new_z, "a ticket must never give the new zone");
        cr_assert_eq(info.ino, old_info.ino);
        cr_assert(info.flags & SHMZ_ZONE_INFO_UNLINKED);
        cr_assert_eq(pread(fd, &c, 1, HDR), 1);
        cr_assert_eq(c, 'O', "the old zone's bytes");
        close_zone(z, fd);
        /* Its last holder gone, the old zone is freed; the new one stays. */
        expect_stats(zone_map_size(1), 1, 0);
        cr_assert_eq(pread(new_fd, &c, 1, HDR), 1);
        cr_assert_eq(c, 'N');
        close_zone(new_z, new_fd);
        finish();
}

/* Tickets never redeemed nor revoked go with the registry (LSan and the fd count tell). */
Test(core, tickets_freed_with_registry) {
        uint64_t t[2];

        (void) make_zone("linked", OWNER.uid, 2000, 0600, 1);
        (void) make_zone("gone", OWNER.uid, 2000, 0600, 1);
        issue("linked", true, t);
        issue("linked", false, t);
        issue("gone", true, t);
        cr_assert_eq(registry_unlink(reg, &OWNER, "gone"), 0);
        cr_assert_eq(memfds_of("linked"), 1);
        cr_assert_eq(memfds_of("gone"), 1, "held by its ticket only");
        finish();
        cr_assert_eq(memfds_of("linked"), 0);
        cr_assert_eq(memfds_of("gone"), 0);
}

/* ---- reload ------------------------------------------------------------------------------ */

static const struct registry_limits big = { .budget = UINT64_C(1) << 30, .quota = UINT64_C(1) << 20, .max_zones = 10 };

static bool logged(const struct report_log *log, int prio, const char *needle1, const char *needle2) {
        for (size_t i = 0; i < log->n; i++)
                if (log->e[i].prio == prio && strstr(log->e[i].msg, needle1) &&
                    (!needle2 || strstr(log->e[i].msg, needle2)))
                        return true;
        return false;
}

Test(core, reload_keep_and_create) {
        struct zone_decl d[3] = {
                decl("a", "ta", size_for(2), 0, 0, 0644),
                decl("b", "", size_for(3), OWNER.uid, 2000, 0660),
        };
        struct shmz_msg_zone_info a1, b1, a2, b2, c;
        struct report_log log;

        cr_assert_eq(apply(&big, d, 2, &log), 0);
        cr_assert_eq(log.n, 2);
        cr_assert(logged(&log, LOG_INFO, "'a'", "created"));
        cr_assert(logged(&log, LOG_INFO, "'b'", "created"));
        expect_stats(pages(5), 2, 0);
        cr_assert_eq(registry_info(reg, "a", &a1), 0);
        cr_assert_eq(registry_info(reg, "b", &b1), 0);
        cr_assert(a1.flags & SHMZ_ZONE_INFO_DECLARED);
        cr_assert_str_eq(a1.tag, "ta");
        cr_assert_eq(a1.mode, 0644);
        cr_assert_eq(b1.uid, OWNER.uid);
        cr_assert_eq(b1.gid, 2000);
        cr_assert_eq(b1.map_size, pages(3));

        /* Unchanged: kept as it is, nothing to say. */
        cr_assert_eq(apply(&big, d, 2, &log), 0);
        cr_assert_eq(log.n, 0, "%s", log.e[0].msg);
        cr_assert_eq(registry_info(reg, "a", &a2), 0);
        cr_assert_eq(registry_info(reg, "b", &b2), 0);
        cr_assert_eq(a2.ino, a1.ino);
        cr_assert_eq(a2.generation, a1.generation);
        cr_assert_eq(b2.ino, b1.ino);
        expect_stats(pages(5), 2, 0);

        /* A new one is created, the others kept. */
        d[2] = decl("c", "", 1, 0, 0, 0600);
        cr_assert_eq(apply(&big, d, 3, &log), 0);
        cr_assert_eq(log.n, 1);
        cr_assert(logged(&log, LOG_INFO, "'c'", "created"));
        cr_assert_eq(registry_info(reg, "c", &c), 0);
        cr_assert_eq(registry_info(reg, "a", &a2), 0);
        cr_assert_eq(a2.ino, a1.ino);
        expect_stats(pages(5) + zone_map_size(1), 3, 0);
        finish();
}

Test(core, reload_refuses_size_change) {
        struct zone_decl d = decl("a", "", size_for(2), 0, 0, 0644);
        struct shmz_msg_zone_info before, after;
        struct report_log log;
        struct zone *z;
        char c = 0;
        int fd;

        cr_assert_eq(apply(&big, &d, 1, &log), 0);
        cr_assert_eq(open_zone(&ROOT, "a", 0, 0, &z, &fd, &before), 0);
        cr_assert_eq(pwrite(fd, "K", 1, HDR + 10), 1);
        close_zone(z, fd);

        d.size = size_for(3);
        cr_assert_eq(apply(&big, &d, 1, &log), 1);
        cr_assert_eq(log.n, 1);
        cr_assert(logged(&log, LOG_ERR, "'a'", "size changed"), "%s", log.e[0].msg);
        expect_stats(pages(2), 1, 0);

        cr_assert_eq(open_zone(&ROOT, "a", 0, 0, &z, &fd, &after), 0);
        cr_assert_eq(after.ino, before.ino);
        cr_assert_eq(after.map_size, pages(2));
        cr_assert_eq(pread(fd, &c, 1, HDR + 10), 1);
        cr_assert_eq(c, 'K', "the running zone's data stay");
        close_zone(z, fd);
        /* A size within the same pages is no change. */
        d.size = size_for(2) - 7;
        cr_assert_eq(apply(&big, &d, 1, &log), 0);
        cr_assert_eq(log.n, 0);
        finish();
}

Test(core, reload_refuses_tag_change) {
        struct zone_decl d = decl("a", "v1", size_for(2), 0, 0, 0644);
        struct shmz_msg_zone_info before, after;
        struct report_log log;

        cr_assert_eq(apply(&big, &d, 1, &log), 0);
        cr_assert_eq(registry_info(reg, "a", &before), 0);
        strncpy_buf(d.tag, sizeof(d.tag), "v2");
        cr_assert_eq(apply(&big, &d, 1, &log), 1);
        cr_assert_eq(log.n, 1);
        cr_assert(logged(&log, LOG_ERR, "'a'", "tag changed"), "%s", log.e[0].msg);
        cr_assert_eq(registry_info(reg, "a", &after), 0);
        cr_assert_eq(after.ino, before.ino);
        cr_assert_str_eq(after.tag, "v1");
        finish();
}

Test(core, reload_applies_acl_change) {
        struct zone_decl d = decl("a", "", size_for(2), 0, 0, 0600);
        struct shmz_msg_zone_info before, after;
        struct shmz_zone_header h;
        struct report_log log;
        struct zone *z;
        int fd;

        cr_assert_eq(apply(&big, &d, 1, &log), 0);
        cr_assert_eq(registry_info(reg, "a", &before), 0);
        cr_assert_eq(open_zone(&OWNER, "a", 0, SHMZ_RDONLY, &z, &fd, NULL), -EACCES);

        d.uid = OWNER.uid;
        d.gid = 2000;
        d.mode = 0640;
        cr_assert_eq(apply(&big, &d, 1, &log), 0);
        cr_assert_eq(log.n, 1);
        cr_assert(logged(&log, LOG_INFO, "'a'", "owner 1000:2000, mode 0640"), "%s", log.e[0].msg);
        cr_assert_eq(registry_info(reg, "a", &after), 0);
        cr_assert_eq(after.ino, before.ino);
        cr_assert_eq(after.uid, OWNER.uid);
        cr_assert_eq(after.gid, 2000);
        cr_assert_eq(after.mode, 0640);
        /* In force at once, and the header follows. */
        cr_assert_eq(open_zone(&OWNER, "a", 0, 0, &z, &fd, NULL), 0);
        h = read_header(fd);
        cr_assert_eq(h.uid, OWNER.uid);
        cr_assert_eq(h.gid, 2000);
        cr_assert_eq(h.mode, 0640);
        close_zone(z, fd);
        cr_assert_eq(open_zone(&GRP, "a", 0, SHMZ_RDONLY, &z, &fd, NULL), 0);
        close_zone(z, fd);
        cr_assert_eq(open_zone(&GRP, "a", 0, 0, &z, &fd, NULL), -EACCES);
        finish();
}

Test(core, reload_retires_undeclared) {
        struct zone_decl d[2] = {
                decl("keep", "", 1, 0, 0, 0600),
                decl("old", "", size_for(2), 0, 0, 0600),
        };
        struct shmz_msg_zone_info info;
        struct report_log log;
        struct zone *z;
        char c = 0;
        int fd;

        cr_assert_eq(apply(&big, d, 2, &log), 0);
        cr_assert_eq(open_zone(&ROOT, "old", 0, 0, &z, &fd, NULL), 0);
        cr_assert_eq(pwrite(fd, "L", 1, HDR), 1);
        expect_stats(zone_map_size(1) + pages(2), 2, 0);

        cr_assert_eq(apply(&big, d, 1, &log), 0);
        cr_assert_eq(log.n, 1);
        cr_assert(logged(&log, LOG_INFO, "'old'", "retired"), "%s", log.e[0].msg);
        cr_assert(strstr(log.e[0].msg, "1 attached"), "%s", log.e[0].msg);
        cr_assert_eq(registry_info(reg, "old", &info), -ENOENT);
        cr_assert_eq(registry_info(reg, "keep", &info), 0);
        /* Unlinked, not reset: the attachment still sees its bytes, which stay charged. */
        expect_stats(zone_map_size(1) + pages(2), 1, 1);
        cr_assert_eq(pread(fd, &c, 1, HDR), 1);
        cr_assert_eq(c, 'L');
        cr_assert_eq(memfds_of("old"), 2);
        close_zone(z, fd);
        expect_stats(zone_map_size(1), 1, 0);
        cr_assert_eq(memfds_of("old"), 0, "freed after the last detach");

        /* Declaring it again makes a new, empty zone. */
        cr_assert_eq(apply(&big, d, 2, &log), 0);
        cr_assert(logged(&log, LOG_INFO, "'old'", "created"));
        cr_assert_eq(open_zone(&ROOT, "old", 0, SHMZ_RDONLY, &z, &fd, NULL), 0);
        cr_assert_eq(pread(fd, &c, 1, HDR), 1);
        cr_assert_eq(c, 0);
        close_zone(z, fd);

        /* An empty config retires all of them. */
        cr_assert_eq(apply(&big, NULL, 0, &log), 0);
        cr_assert_eq(log.n, 2);
        expect_stats(0, 0, 0);
        finish();
}

/* A client's zone under a declared name is never adopted: its creator may still hold a writable mapping. */
Test(core, reload_never_adopts_client_zone) {
        struct zone_decl d[2] = {
                decl("ok", "", 1, 0, 0, 0600),
                decl("taken", "", size_for(2), 0, 0, 0600),
        };
        struct shmz_msg_zone_info before, after;
        struct report_log log;

        (void) make_attached_and_detach(&OWNER, "taken", size_for(2));
        cr_assert_eq(registry_info(reg, "taken", &before), 0);
        for (int round = 0; round < 2; round++) {
                cr_assert_eq(apply(&big, d, 2, &log), 1, "round %d", round);
                cr_assert(logged(&log, LOG_ERR, "'taken'", "created by uid 1000"), "round %d", round);
                cr_assert_eq(registry_info(reg, "taken", &after), 0);
                cr_assert_eq(after.ino, before.ino);
                cr_assert_eq(after.uid, OWNER.uid);
                cr_assert_eq(after.mode, 0600);
                cr_assert_not(after.flags & SHMZ_ZONE_INFO_DECLARED);
                expect_stats(pages(2) + zone_map_size(1), 2, 0);
        }
        /* Nor is it retired by a config that does not declare it. */
        cr_assert_eq(apply(&big, d, 1, &log), 0);
        cr_assert_eq(registry_info(reg, "taken", &after), 0);
        cr_assert_eq(after.ino, before.ino);
        /* Once its owner removes it, the declaration takes the name. */
        cr_assert_eq(registry_unlink(reg, &OWNER, "taken"), 0);
        cr_assert_eq(apply(&big, d, 2, &log), 0);
        cr_assert_eq(registry_info(reg, "taken", &after), 0);
        cr_assert(after.flags & SHMZ_ZONE_INFO_DECLARED);
        cr_assert_eq(after.uid, 0);
        finish();
}

/* ---- observer ---------------------------------------------------------------------------- */

struct event_log {
        size_t n;
        struct {
                enum registry_event ev;
                char name[SHMZ_NAME_BUF];
                uint64_t ino;
                int info_r;
                struct shmz_msg_zone_info info;
                uint64_t zones;
        } e[32];
};

/* Calls back into the registry, as the FUSE view's invalidation does: a deadlock here hangs (timeout). */
static void observe(void *userdata, enum registry_event ev, const char *name, uint64_t ino) {
        struct event_log *log = userdata;
        struct registry_stats st;

        cr_assert_lt(log->n, ELEMENTSOF(log->e));
        registry_get_stats(reg, &st);
        log->e[log->n].ev = ev;
        strncpy_buf(log->e[log->n].name, sizeof(log->e[log->n].name), name);
        log->e[log->n].ino = ino;
        log->e[log->n].info_r = registry_info(reg, name, &log->e[log->n].info);
        log->e[log->n].zones = st.zones;
        log->n++;
}

static void expect_event(const struct event_log *log, size_t i, enum registry_event ev, const char *name,
                         uint64_t ino) {
        cr_assert_gt(log->n, i, "event %zu missing", i);
        cr_assert_eq(log->e[i].ev, ev, "event %zu: %d, expected %d", i, log->e[i].ev, ev);
        cr_assert_str_eq(log->e[i].name, name, "event %zu", i);
        cr_assert_eq(log->e[i].ino, ino, "event %zu", i);
        /* Told after the change, with the lock free: the registry already shows it. */
        if (ev == REGISTRY_ZONE_REMOVED)
                cr_assert_eq(log->e[i].info_r, -ENOENT, "event %zu", i);
        else {
                cr_assert_eq(log->e[i].info_r, 0, "event %zu", i);
                cr_assert_eq(log->e[i].info.ino, ino, "event %zu", i);
        }
}

Test(core, observer_events, .timeout = 10) {
        struct zone_decl d[2] = { decl("decl", "", 1, 0, 0, 0600) };
        struct shmz_msg_zone_info info, pend, dinfo;
        struct event_log log = { 0 };
        struct report_log rlog;
        struct zone *z, *z2;
        uint64_t ino, t[2];
        int fd, fd2;

        registry_set_observer(reg, observe, &log);

        cr_assert_eq(open_zone(&OWNER, "x", 1, SHMZ_CREATE, &z, &fd, &info), 0);
        ino = info.ino;
        expect_event(&log, 0, REGISTRY_ZONE_ADDED, "x", ino);
        cr_assert_eq(log.e[0].zones, 1);
        cr_assert_eq(log.n, 1);
        /* Attaching to and detaching from an existing zone changes no file attribute. */
        cr_assert_eq(open_zone(&OWNER, "x", 0, 0, &z2, &fd2, NULL), 0);
        close_zone(z2, fd2);
        cr_assert_eq(log.n, 1);

        cr_assert_eq(registry_setattr(reg, &OWNER, "x", 0, SHMZ_SETATTR_MODE, 0640, 0, 0), 0);
        expect_event(&log, 1, REGISTRY_ZONE_CHANGED, "x", ino);
        cr_assert_eq(log.e[1].info.mode, 0640, "the observer sees the new mode");
        cr_assert_eq(registry_setattr(reg, &OTHER, "x", 0, SHMZ_SETATTR_MODE, 0666, 0, 0), -EPERM);
        cr_assert_eq(log.n, 2, "a refused change is no event");

        cr_assert_eq(registry_create_pending(reg, &OWNER, "p", 0600, &pend), 0);
        expect_event(&log, 2, REGISTRY_ZONE_ADDED, "p", pend.ino);
        cr_assert_eq(registry_set_tag(reg, &OWNER, "p", 0, "tg"), 0);
        expect_event(&log, 3, REGISTRY_ZONE_CHANGED, "p", pend.ino);
        cr_assert_eq(registry_set_size(reg, &OWNER, "p", 0, 1), 0);
        expect_event(&log, 4, REGISTRY_ZONE_CHANGED, "p", pend.ino);
        cr_assert_eq(log.e[4].info.map_size, zone_map_size(1));

        cr_assert_eq(registry_unlink(reg, &OWNER, "x"), 0);
        expect_event(&log, 5, REGISTRY_ZONE_REMOVED, "x", ino);
        cr_assert_eq(log.e[5].zones, 1);
        close_zone(z, fd);
        cr_assert_eq(log.n, 6, "the last detach frees memory, no name");

        /* Reload: added, changed (ACL), removed (retired). */
        cr_assert_eq(apply(&big, d, 1, &rlog), 0);
        cr_assert_eq(registry_info(reg, "decl", &dinfo), 0);
        expect_event(&log, 6, REGISTRY_ZONE_ADDED, "decl", dinfo.ino);
        d[0].mode = 0644;
        cr_assert_eq(apply(&big, d, 1, &rlog), 0);
        expect_event(&log, 7, REGISTRY_ZONE_CHANGED, "decl", dinfo.ino);
        cr_assert_eq(log.e[7].info.mode, 0644);
        cr_assert_eq(apply(&big, d, 1, &rlog), 0);
        cr_assert_eq(log.n, 8, "an unchanged zone is no event");
        cr_assert_eq(apply(&big, NULL, 0, &rlog), 0);
        expect_event(&log, 8, REGISTRY_ZONE_REMOVED, "decl", dinfo.ino);

        /* Ticket plumbing changes nothing visible. */
        issue("p", true, t);
        cr_assert_eq(redeem(t, true, &z, &fd, NULL), 0);
        close_zone(z, fd);
        cr_assert_eq(log.n, 9);

        /* Without an observer, nothing is told. */
        registry_set_observer(reg, NULL, NULL);
        cr_assert_eq(registry_unlink(reg, &OWNER, "p"), 0);
        cr_assert_eq(log.n, 9);
        finish();
}

/* ---- the fd store: FDNAME identities, the store hook, adoption -------------------------- */

Test(core, fdname_format_and_parse) {
        struct zone_identity id = { .uid = 4294967295u, .gid = 7, .mode = 02755, .charged_uid = 12, .declared = true },
                             back;
        char buf[ZONE_FDNAME_MAX + 1], long_name[SHMZ_NAME_BUF] = "";
        static const char *const bad[] = {
                "shmz.1.2.600.0.3",            /* no name */
                "shmz.1.2.600.0.3.",           /* empty name */
                "shmz.1.2.600.0.3...",         /* ".." */
                "shmz.1.2.600.0.3.a/b",        /* not a name */
                "shmz.01.2.600.0.3.a",         /* a second spelling of uid 1 */
                "shmz.1.2.800.0.3.a",          /* mode not octal */
                "shmz.1.2.17777.0.3.a",        /* mode past 07777 */
                "shmz.1.2.600.2.3.a",          /* unknown flag */
                "shmz.4294967296.2.600.0.3.a", /* uid past 32 bits */
                "shmz.-1.2.600.0.3.a",
                "shmz..2.600.0.3.a",
                "zone.1.2.600.0.3.a",
                "",
        };

        strncpy_buf(id.name, sizeof(id.name), "a.b-c_d");
        cr_assert_eq(zone_identity_format(&id, buf, sizeof(buf)), 0);
        cr_assert_str_eq(buf, "shmz.4294967295.7.2755.1.12.a.b-c_d");
        cr_assert_eq(zone_identity_parse(buf, &back), 0);
        cr_assert_str_eq(back.name, "a.b-c_d");
        cr_assert(back.uid == id.uid && back.gid == id.gid && back.mode == id.mode &&
                  back.charged_uid == id.charged_uid && back.declared);

        /* The longest name with the longest numbers still fits systemd's 255. */
        memset(long_name, 'x', SHMZ_NAME_MAX);
        long_name[SHMZ_NAME_MAX] = 0;
        id = (struct zone_identity){ .uid = UINT32_MAX, .gid = UINT32_MAX, .mode = 07777, .charged_uid = UINT32_MAX };
        strncpy_buf(id.name, sizeof(id.name), long_name);
        cr_assert_eq(zone_identity_format(&id, buf, sizeof(buf)), 0);
        cr_assert_leq(strlen(buf), ZONE_FDNAME_MAX);
        cr_assert_eq(zone_identity_parse(buf, &back), 0);
        cr_assert_str_eq(back.name, long_name);
        cr_assert_eq(zone_identity_format(&id, buf, 100), -ENAMETOOLONG);

        for (size_t i = 0; i < ELEMENTSOF(bad); i++)
                cr_assert_eq(zone_identity_parse(bad[i], &back), -EBADMSG, "%s", bad[i]);
}

/* What the store hook was told: FDNAMEs with '+' (stored, with a copy of the fd kept) or '-' (removed). */
static struct store_log {
        char ops[8][ZONE_FDNAME_MAX + 2];
        int fds[8];
        size_t n;
} slog;

static void slog_add(char op, const struct zone_identity *id, int fd) {
        char name[ZONE_FDNAME_MAX + 1];

        cr_assert_lt(slog.n, 8);
        cr_assert_eq(zone_identity_format(id, name, sizeof(name)), 0);
        snprintf(slog.ops[slog.n], sizeof(slog.ops[0]), "%c%s", op, name);
        slog.fds[slog.n++] = fd >= 0 ? fcntl(fd, F_DUPFD_CLOEXEC, 3) : -EBADF;
}

static void slog_stored(void *userdata, const struct zone_identity *id, int fd) {
        cr_assert_geq(fd, 0);
        slog_add('+', id, fd);
}

static void slog_removed(void *userdata, const struct zone_identity *id) {
        slog_add('-', id, -EBADF);
}

static const struct registry_store slog_store = { .stored = slog_stored, .removed = slog_removed };

static void slog_reset(void) {
        for (size_t i = 0; i < slog.n; i++)
                safe_close(slog.fds[i]);
        memset(&slog, 0, sizeof(slog));
}

Test(core, store_follows_memory_acl_and_unlink) {
        struct zone *z;
        int fd;

        slog_reset();
        registry_set_store(reg, &slog_store, NULL);
        /* Pending: no memory, nothing to store until its size is fixed. */
        cr_assert_eq(registry_create_pending(reg, &OWNER, "pend", 0600, NULL), 0);
        cr_assert_eq(slog.n, 0);
        cr_assert_eq(registry_set_size(reg, &OWNER, "pend", 0, 4096), 0);
        cr_assert_eq(slog.n, 1);
        cr_assert_str_eq(slog.ops[0], "+shmz.1000.1000.600.0.1000.pend");

        cr_assert_eq(open_zone(&OWNER, "z", 4096, SHMZ_CREATE, &z, &fd, NULL), 0);
        cr_assert_str_eq(slog.ops[1], "+shmz.1000.1000.600.0.1000.z");
        /* chown to a group of the owner's, then chmod: the old name goes first each time. */
        cr_assert_eq(registry_setattr(reg, &OWNER, "z", 0, SHMZ_SETATTR_GID, 0, 0, 2000), 0);
        cr_assert_str_eq(slog.ops[2], "-shmz.1000.1000.600.0.1000.z");
        cr_assert_str_eq(slog.ops[3], "+shmz.1000.2000.600.0.1000.z");
        cr_assert_eq(registry_setattr(reg, &OWNER, "z", 0, 0, 0, 0, 0), 0);
        cr_assert_eq(slog.n, 4, "nothing asked, nothing stored");
        /* Unlinked while attached: out of the store at once. */
        cr_assert_eq(registry_unlink(reg, &OWNER, "z"), 0);
        cr_assert_str_eq(slog.ops[4], "-shmz.1000.2000.600.0.1000.z");
        cr_assert_eq(slog.n, 5);
        close_zone(z, fd);
        cr_assert_eq(slog.n, 5);
        slog_reset();
        finish();
}

Test(core, adopt_checks_and_charges) {
        struct shmz_msg_zone_info info;
        struct registry_stats st;
        char name[ZONE_FDNAME_MAX + 1];
        const char *why;
        struct zone *z;
        struct stat sb;
        void *m;
        int fd, kept, spare, pipefd[2], unsealed;

        slog_reset();
        registry_set_store(reg, &slog_store, NULL);
        cr_assert_eq(open_zone(&OWNER, "old", 8192, SHMZ_CREATE, &z, &fd, NULL), 0);
        m = mmap(NULL, 4096, PROT_WRITE, MAP_SHARED, fd, 4096);
        cr_assert_neq(m, MAP_FAILED);
        memset(m, 0x77, 16);
        cr_assert_eq(munmap(m, 4096), 0);
        cr_assert_eq(registry_setattr(reg, &OWNER, "old", 0, SHMZ_SETATTR_MODE, 0640, 0, 0), 0);
        snprintf(name, sizeof(name), "%s", slog.ops[slog.n - 1] + 1);
        kept = TAKE_FD(slog.fds[slog.n - 1]);
        close_zone(z, fd);
        slog_reset();
        /* A new daemon: nothing of the old registry but the stored fd and its name. */
        setup();
        registry_set_store(reg, &slog_store, NULL);

        cr_assert_eq(registry_adopt(reg, "shmz.x", kept, NULL, &why), -EBADMSG);
        cr_assert_str_eq(why, "its FDNAME does not parse");
        cr_assert_eq(registry_adopt(reg, "shmz.1000.1000.640.0.1000.other", kept, NULL, &why), -EBADF,
                     "another zone's memfd");
        cr_assert_eq(pipe2(pipefd, O_CLOEXEC), 0);
        cr_assert_eq(registry_adopt(reg, "shmz.0.0.600.0.0.p", pipefd[0], NULL, &why), -EBADF);
        close(pipefd[0]);
        close(pipefd[1]);
        unsealed = memfd_create("shmzone:u", MFD_CLOEXEC | MFD_ALLOW_SEALING);
        cr_assert_eq(ftruncate(unsealed, 8192), 0);
        cr_assert_eq(registry_adopt(reg, "shmz.0.0.600.0.0.u", unsealed, NULL, &why), -EPERM);
        close(unsealed);

        /* Writers scribbled the header's ACL and its inode mode went astray: the FDNAME wins, 0400 again. */
        cr_assert_eq(pwrite(kept, &(uint32_t[3]){ 0, 0, 0666 }, 12, offsetof(struct shmz_zone_header, uid)), 12);
        cr_assert_eq(fchmod(kept, 0666), 0);
        spare = fcntl(kept, F_DUPFD_CLOEXEC, 3);
        cr_assert_geq(spare, 0);
        cr_assert_eq(registry_adopt(reg, name, kept, NULL, &why), 0, "%s", why ?: "");
        cr_assert_eq(registry_info(reg, "old", &info), 0);
        cr_assert(info.uid == 1000 && info.gid == 1000 && info.mode == 0640);
        cr_assert_eq(read_header(kept).mode, 0640);
        cr_assert_eq(fstat(kept, &sb), 0);
        cr_assert_eq(sb.st_mode & 07777, 0400);
        cr_assert_eq(slog.n, 0, "systemd kept its copy: nothing stored again");
        registry_get_stats(reg, &st);
        cr_assert_eq(st.budget_used, pages(3));
        cr_assert_eq(st.zones, 1);
        /* Its bytes, through a new attachment. */
        cr_assert_eq(open_zone(&OWNER, "old", 0, 0, &z, &fd, NULL), 0);
        m = mmap(NULL, 4096, PROT_READ, MAP_SHARED, fd, 4096);
        cr_assert_neq(m, MAP_FAILED);
        cr_assert_eq(((unsigned char *) m)[15], 0x77);
        cr_assert_eq(munmap(m, 4096), 0);
        close_zone(z, fd);

        /* The same name again: taken. */
        fd = fcntl(kept, F_DUPFD_CLOEXEC, 3);
        cr_assert_eq(registry_adopt(reg, name, fd, NULL, &why), -EEXIST);
        close(fd);
        /* Unlinked: removed under the name it was stored under. */
        cr_assert_eq(registry_unlink(reg, &OWNER, "old"), 0);
        cr_assert_eq(slog.n, 1);
        cr_assert_str_eq(slog.ops[0] + 1, name);
        cr_assert_eq(slog.ops[0][0], '-');
        slog_reset();

        /* Limits lowered across the restart: kept and charged all the same (its memory exists), and said so. */
        setup_limits(pages(2), pages(1), 0);
        cr_assert_eq(registry_adopt(reg, name, spare, NULL, &why), 1);
        cr_assert_str_eq(why, "adopted past the memory budget or its uid's quota");
        expect_stats(pages(3), 1, 0);
        cr_assert_eq(open_zone(&OWNER, "new", 4096, SHMZ_CREATE, &z, &fd, NULL), -EDQUOT);
        finish();
}

/* A store like systemd's: names in, names out, in the order they arrive. */
static struct {
        pthread_mutex_t lock;
        char names[16][ZONE_FDNAME_MAX + 1];
        size_t n;
        bool overflow;
} sim = { .lock = PTHREAD_MUTEX_INITIALIZER };

static void sim_stored(void *userdata, const struct zone_identity *id, int fd) {
        usleep(20); /* a slow PID 1 widens the window for another thread's changes to overtake */
        pthread_mutex_lock(&sim.lock);
        if (sim.n < ELEMENTSOF(sim.names))
                (void) zone_identity_format(id, sim.names[sim.n++], sizeof(sim.names[0]));
        else
                sim.overflow = true;
        pthread_mutex_unlock(&sim.lock);
}

static void sim_removed(void *userdata, const struct zone_identity *id) {
        char name[ZONE_FDNAME_MAX + 1];

        (void) zone_identity_format(id, name, sizeof(name));
        pthread_mutex_lock(&sim.lock);
        for (size_t i = 0; i < sim.n;)
                if (streq(sim.names[i], name))
                        memcpy(sim.names[i], sim.names[--sim.n], sizeof(sim.names[0]));
                else
                        i++;
        pthread_mutex_unlock(&sim.lock);
}

static const struct registry_store sim_store = { .stored = sim_stored, .removed = sim_removed };

static void *chmod_loop(void *userdata) {
        uint32_t base = *(const uint32_t *) userdata;

        for (uint32_t i = 0; i < 2000; i++)
                cr_assert_eq(registry_setattr(reg, &ROOT, "raced", 0, SHMZ_SETATTR_MODE, base | (i & 7), 0, 0), 0);
        return NULL;
}

/* Two threads chmod one zone at once: the store ends with its last identity only, never a stale one. */
Test(core, store_order_across_threads) {
        struct shmz_msg_zone_info info;
        uint32_t modes[2] = { 0600, 0640 };
        char want[ZONE_FDNAME_MAX + 1];
        pthread_t t[2];

        registry_set_store(reg, &sim_store, NULL);
        make_attached_and_detach(&OWNER, "raced", 4096);
        for (int i = 0; i < 2; i++)
                cr_assert_eq(pthread_create(&t[i], NULL, chmod_loop, &modes[i]), 0);
        for (int i = 0; i < 2; i++)
                cr_assert_eq(pthread_join(t[i], NULL), 0);
        cr_assert_eq(registry_info(reg, "raced", &info), 0);
        snprintf(want, sizeof(want), "shmz.1000.1000.%o.0.1000.raced", info.mode);
        cr_assert_not(sim.overflow);
        cr_assert_eq(sim.n, 1, "%zu entries, the first %s", sim.n, sim.names[0]);
        cr_assert_str_eq(sim.names[0], want);
        finish();
}
