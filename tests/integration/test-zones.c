/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Zones end to end against a real shmzoned on a private socket. */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "client.h"
#include "harness.h"
#include "shmzone.h"
#include "util.h"
#include "zone.h"

static struct daemon_proc d;

static void start_with(const char *config) {
        harness_init(&d, config);
        cr_assert_eq(harness_start(&d, NULL, false), 0, "daemon did not start: %s", harness_log(&d));
}

static void start(void) {
        start_with("[daemon]\nmemory_budget = 64M\nuid_quota = 16M\n");
}

static void stop(void) {
        harness_cleanup(&d);
}

static struct shmz_client *connect_or_die(void) {
        struct shmz_client *c = harness_connect(&d);

        cr_assert_not_null(c, "cannot connect to %s", d.socket);
        return c;
}

TestSuite(zones, .init = start, .fini = stop, .timeout = 60);

Test(zones, two_processes_share_writes) {
        struct shmz_client *c = connect_or_die();
        struct shmz_zone *z;
        volatile char *p;
        pid_t pid;
        int status;

        cr_assert_eq(shmz_zone_open(c, "shared", 1 << 20, "t", SHMZ_CREATE, &z), 0);
        cr_assert_eq(shmz_zone_existed(z), 0);
        cr_assert_geq(shmz_zone_size(z), 1u << 20);
        p = shmz_zone_base(z);
        strcpy((char *) p, "from parent");

        pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
                /* A separate connection and mapping, as an unrelated process would have. */
                struct shmz_client *c2;
                struct shmz_zone *z2;
                char *q;

                if (shmz_connect(d.socket, &c2) < 0 || shmz_zone_open(c2, "shared", 0, "t", 0, &z2) < 0)
                        _exit(1);
                q = shmz_zone_base(z2);
                if (strcmp(q, "from parent") != 0 || !shmz_zone_existed(z2))
                        _exit(2);
                strcpy(q + 4096, "from child");
                shmz_zone_close(z2);
                shmz_disconnect(c2);
                _exit(0);
        }
        cr_assert_eq(waitpid(pid, &status, 0), pid);
        cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child failed: %d", status);
        cr_assert_str_eq((char *) p + 4096, "from child");
        shmz_zone_close(z);
        shmz_disconnect(c);
}

Test(zones, tag_size_and_excl_rules) {
        struct shmz_client *c = connect_or_die();
        struct shmz_zone *z, *z2 = NULL, *z3;
        struct shmz_zone_stat st;

        cr_assert_eq(shmz_zone_open(c, "rules", 65536, "limit_req", SHMZ_CREATE, &z), 0);
        memset(shmz_zone_base(z), 0x5a, 100);

        /* Another tag: refused, nothing changes. */
        cr_assert_eq(shmz_zone_open(c, "rules", 65536, "other", SHMZ_CREATE, &z2), -EEXIST);
        cr_assert_eq(shmz_zone_open(c, "rules", 0, NULL, 0, &z2), -EEXIST);
        /* Another size: refused, never a silent reset. */
        cr_assert_eq(shmz_zone_open(c, "rules", 131072, "limit_req", SHMZ_CREATE, &z2), -EINVAL);
        /* EXCL on an existing zone. */
        cr_assert_eq(shmz_zone_open(c, "rules", 65536, "limit_req", SHMZ_CREATE | SHMZ_EXCL, &z2), -EEXIST);
        /* Missing without CREATE, creating without a size, bad names. */
        cr_assert_eq(shmz_zone_open(c, "missing", 0, NULL, 0, &z2), -ENOENT);
        cr_assert_eq(shmz_zone_open(c, "nosize", 0, NULL, SHMZ_CREATE, &z2), -EINVAL);
        cr_assert_eq(shmz_zone_open(c, "..", 4096, NULL, SHMZ_CREATE, &z2), -EINVAL);
        cr_assert_eq(shmz_zone_open(c, "a/b", 4096, NULL, SHMZ_CREATE, &z2), -EINVAL);
        cr_assert_eq(shmz_zone_open(c, "", 4096, NULL, SHMZ_CREATE, &z2), -EINVAL);

        /* Same name, tag and size (or size 0): attach, and learn the data predates us. */
        cr_assert_eq(shmz_zone_open(c, "rules", 0, "limit_req", 0, &z2), 0);
        cr_assert_eq(shmz_zone_existed(z2), 1);
        cr_assert_eq(((unsigned char *) shmz_zone_base(z2))[99], 0x5a);

        /* Odd sizes are rounded up to pages; asking again with the same odd size is the same zone. */
        cr_assert_eq(shmz_zone_open(c, "odd", 1000, NULL, SHMZ_CREATE, &z3), 0);
        cr_assert_geq(shmz_zone_size(z3), 1000);
        shmz_zone_close(z3);
        cr_assert_eq(shmz_zone_open(c, "odd", 1000, NULL, 0, &z3), 0);
        shmz_zone_close(z3);
        cr_assert_eq(shmz_zone_open(c, "odd", 100000, NULL, 0, &z3), -EINVAL);

        cr_assert_eq(shmz_zone_stat(c, "rules", &st), 0);
        cr_assert_str_eq(st.tag, "limit_req");
        cr_assert_eq(st.attached, 2);
        cr_assert_eq(st.mode, 0600);
        cr_assert_eq(st.uid, getuid());
        shmz_zone_close(z2);
        cr_assert_eq(shmz_zone_stat(c, "rules", &st), 0);
        cr_assert_eq(st.attached, 1);
        shmz_zone_close(z);
        shmz_disconnect(c);
}

static const char *const probe_names[] = { "private", "public" };

static int open_as_other(void *userdata) {
        const char *name = userdata;
        struct shmz_client *c;
        struct shmz_zone *z;
        int r;

        r = shmz_connect(d.socket, &c);
        if (r < 0)
                return 100;
        r = shmz_zone_open(c, name, 0, NULL, 0, &z);
        if (r == 0) {
                /* Allowed: the mapping must really work. */
                ((char *) shmz_zone_base(z))[0] = 'x';
                shmz_zone_close(z);
        }
        shmz_disconnect(c);
        return -r;
}

Test(zones, other_uid_follows_mode) {
        struct shmz_client *c = connect_or_die();
        struct shmz_zone *z1, *z2;

        cr_assert_eq(shmz_zone_open(c, probe_names[0], 4096, NULL, SHMZ_CREATE, &z1), 0);
        cr_assert_eq(shmz_zone_open(c, probe_names[1], 4096, NULL, SHMZ_CREATE, &z2), 0);
        cr_assert_eq(shmz_zone_chmod(c, probe_names[1], 0666), 0);

        cr_assert_eq(harness_run_as(65534, 65534, open_as_other, (void *) probe_names[0]), EACCES);
        cr_assert_eq(harness_run_as(65534, 65534, open_as_other, (void *) probe_names[1]), 0);
        cr_assert_eq(((char *) shmz_zone_base(z2))[0], 'x');

        /* A stranger may not change the ACL or remove the zone. */
        shmz_zone_close(z1);
        shmz_zone_close(z2);
        shmz_disconnect(c);
}

static int chmod_as_other(void *userdata) {
        struct shmz_client *c;
        int r;

        if (shmz_connect(d.socket, &c) < 0)
                return 100;
        r = shmz_zone_chmod(c, userdata, 0666);
        if (r == -EPERM)
                r = shmz_zone_unlink(c, userdata);
        shmz_disconnect(c);
        return -r;
}

Test(zones, stranger_cannot_chmod_or_unlink) {
        struct shmz_client *c = connect_or_die();
        struct shmz_zone *z;

        cr_assert_eq(shmz_zone_open(c, "mine", 4096, NULL, SHMZ_CREATE, &z), 0);
        cr_assert_eq(shmz_zone_chmod(c, "mine", 0644), 0);
        cr_assert_eq(harness_run_as(65534, 65534, chmod_as_other, "mine"), EPERM);
        shmz_zone_close(z);
        shmz_disconnect(c);
}

static void on_segv(int sig) {
        _exit(42);
}

Test(zones, read_only_attach_cannot_write) {
        struct shmz_client *c = connect_or_die();
        struct shmz_zone *z, *ro;
        pid_t pid;
        int status;

        cr_assert_eq(shmz_zone_open(c, "ro", 8192, NULL, SHMZ_CREATE, &z), 0);
        strcpy(shmz_zone_base(z), "visible");
        cr_assert_eq(shmz_zone_open(c, "ro", 0, NULL, SHMZ_RDONLY, &ro), 0);
        cr_assert_str_eq(shmz_zone_base(ro), "visible");

        /* The fd behind the mapping is O_RDONLY: no way to make the pages writable. */
        cr_assert_eq(mprotect(shmz_zone_base(ro), 4096, PROT_READ | PROT_WRITE), -1);
        cr_assert_eq(errno, EACCES);

        pid = fork();
        if (pid == 0) {
                struct sigaction sa = { .sa_handler = on_segv };

                /* Our own handler: sanitizers turn a plain SIGSEGV into an exit status of theirs. */
                (void) sigaction(SIGSEGV, &sa, NULL);
                ((volatile char *) shmz_zone_base(ro))[0] = 'X';
                _exit(0);
        }
        cr_assert_eq(waitpid(pid, &status, 0), pid);
        cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 42, "a write went through: %d", status);
        cr_assert_str_eq(shmz_zone_base(z), "visible");
        shmz_zone_close(ro);
        shmz_zone_close(z);
        shmz_disconnect(c);
}

static int open_rw_then_ro(void *userdata) {
        struct shmz_client *c;
        struct shmz_zone *z;
        int r;

        if (shmz_connect(d.socket, &c) < 0)
                return 100;
        r = shmz_zone_open(c, userdata, 0, NULL, 0, &z);
        if (r != -EACCES)
                return 101;
        r = shmz_zone_open(c, userdata, 0, NULL, SHMZ_RDONLY, &z);
        if (r < 0)
                return -r;
        if (mprotect(shmz_zone_base(z), 4096, PROT_READ | PROT_WRITE) == 0)
                return 102;
        shmz_zone_close(z);
        shmz_disconnect(c);
        return 0;
}

Test(zones, read_permission_gives_read_only_attach) {
        struct shmz_client *c = connect_or_die();
        struct shmz_zone *z;

        cr_assert_eq(shmz_zone_open(c, "readable", 4096, NULL, SHMZ_CREATE, &z), 0);
        cr_assert_eq(shmz_zone_chmod(c, "readable", 0644), 0);
        cr_assert_eq(harness_run_as(65534, 65534, open_rw_then_ro, "readable"), 0);
        shmz_zone_close(z);
        shmz_disconnect(c);
}

Test(zones, quota_and_budget) {
        struct shmz_client *c = connect_or_die();
        struct shmz_zone *z[8] = {};
        struct shmz_daemon_status st;

        /* uid_quota is 16M: one zone of 17M can never fit, 4M ones do until the quota is used. */
        cr_assert_eq(shmz_zone_open(c, "huge", 17u << 20, NULL, SHMZ_CREATE, &z[0]), -EDQUOT);
        for (int i = 0; i < 3; i++) {
                char name[16];

                snprintf(name, sizeof(name), "q%d", i);
                cr_assert_eq(shmz_zone_open(c, name, 4u << 20, NULL, SHMZ_CREATE, &z[i]), 0);
        }
        cr_assert_eq(shmz_zone_open(c, "q3", 4u << 20, NULL, SHMZ_CREATE, &z[3]), -EDQUOT);
        cr_assert_eq(shmz_daemon_status(c, &st), 0);
        cr_assert_eq(st.quota, 16u << 20);
        cr_assert_geq(st.budget_used, 12u << 20);
        /* Unlinked and detached: the quota is given back. */
        shmz_zone_close(z[0]);
        cr_assert_eq(shmz_zone_unlink(c, "q0"), 0);
        cr_assert_eq(shmz_zone_open(c, "q3", 4u << 20, NULL, SHMZ_CREATE, &z[3]), 0);
        for (int i = 1; i < 4; i++)
                shmz_zone_close(z[i]);
        shmz_disconnect(c);
}

TestSuite(budget, .fini = stop, .timeout = 60);

Test(budget, budget_is_global) {
        struct shmz_client *c;
        struct shmz_zone *z, *z2;

        /* Declared zones count against the budget too. */
        start_with("[daemon]\nmemory_budget = 8M\nuid_quota = 64M\n[zone big]\nsize = 6M\n");
        c = connect_or_die();
        cr_assert_eq(shmz_zone_open(c, "more", 1u << 20, NULL, SHMZ_CREATE, &z), 0);
        cr_assert_eq(shmz_zone_open(c, "toomuch", 2u << 20, NULL, SHMZ_CREATE, &z2), -ENOSPC);
        shmz_zone_close(z);
        shmz_disconnect(c);
}

static int count_zone(const struct shmz_zone_stat *st, void *userdata) {
        (*(int *) userdata)++;
        return 0;
}

Test(zones, list_unlink_and_chown) {
        struct shmz_client *c = connect_or_die();
        struct shmz_zone *z;
        struct shmz_zone_stat st;
        int n = 0;

        for (int i = 0; i < 50; i++) {
                char name[16];

                snprintf(name, sizeof(name), "l%02d", i);
                cr_assert_eq(shmz_zone_open(c, name, 4096, NULL, SHMZ_CREATE, &z), 0);
                shmz_zone_close(z);
        }
        cr_assert_eq(shmz_zone_list(c, count_zone, &n), 0);
        cr_assert_eq(n, 50);

        cr_assert_eq(shmz_zone_chown(c, "l07", 65534, 65534), 0);
        cr_assert_eq(shmz_zone_stat(c, "l07", &st), 0);
        cr_assert_eq(st.uid, 65534);
        cr_assert_eq(st.gid, 65534);

        /* Unlink while attached: the name goes at once, the mapping keeps working. */
        cr_assert_eq(shmz_zone_open(c, "l10", 0, NULL, 0, &z), 0);
        cr_assert_eq(shmz_zone_unlink(c, "l10"), 0);
        cr_assert_eq(shmz_zone_stat(c, "l10", &st), -ENOENT);
        strcpy(shmz_zone_base(z), "still mine");
        cr_assert_str_eq(shmz_zone_base(z), "still mine");
        cr_assert_eq(shmz_zone_unlink(c, "l10"), -ENOENT);
        n = 0;
        cr_assert_eq(shmz_zone_list(c, count_zone, &n), 0);
        cr_assert_eq(n, 49);
        shmz_zone_close(z);
        shmz_disconnect(c);
}

Test(zones, zone_outlives_disconnect) {
        struct shmz_client *c = connect_or_die();
        struct shmz_zone *z;

        cr_assert_eq(shmz_zone_open(c, "late", 4096, NULL, SHMZ_CREATE, &z), 0);
        /* Closing the connection first is allowed: the zone keeps it until it is closed. */
        shmz_disconnect(c);
        strcpy(shmz_zone_base(z), "ok");
        shmz_zone_close(z);
}

Test(zones, clean_stop_tells_clients) {
        struct shmz_client *c = connect_or_die();
        struct shmz_zone *z;
        struct shmz_daemon_status st;

        cr_assert_eq(shmz_zone_open(c, "bye", 4096, NULL, SHMZ_CREATE, &z), 0);
        cr_assert_eq(harness_stop(&d), 0, "exit status; log: %s", harness_log(&d));
        cr_assert_eq(access(d.socket, F_OK), -1, "the socket file is left behind");
        cr_assert_eq(shmz_daemon_status(c, &st), -ENOTCONN);
        /* The bytes are still mapped: the daemon going away takes nothing from clients. */
        strcpy(shmz_zone_base(z), "mapped");
        cr_assert_str_eq(shmz_zone_base(z), "mapped");
        shmz_zone_close(z);
        shmz_disconnect(c);
        cr_assert(strstr(harness_log(&d), "Stopped."), "log: %s", harness_log(&d));
}

static int open_with_group(gid_t supplementary) {
        pid_t pid = fork();
        int status;

        if (pid == 0) {
                struct shmz_client *c;
                struct shmz_zone *z;
                int r;

                if (setgroups(supplementary ? 1 : 0, &supplementary) < 0 || setgid(65534) < 0 || setuid(65534) < 0)
                        _exit(126);
                if (shmz_connect(d.socket, &c) < 0)
                        _exit(125);
                r = shmz_zone_open(c, "grp", 0, NULL, 0, &z);
                _exit(r == 0 ? 0 : -r);
        }
        cr_assert_eq(waitpid(pid, &status, 0), pid);
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}

Test(zones, supplementary_group_grants_group_bits) {
        struct shmz_client *c = connect_or_die();
        struct shmz_zone *z;

        cr_assert_eq(shmz_zone_open(c, "grp", 4096, NULL, SHMZ_CREATE, &z), 0);
        cr_assert_eq(shmz_zone_chown(c, "grp", (uid_t) -1, 4242), 0);
        cr_assert_eq(shmz_zone_chmod(c, "grp", 0060), 0);
        /* The groups come from SO_PEERGROUPS: a member through a supplementary group gets in. */
        cr_assert_eq(open_with_group(4242), 0);
        cr_assert_eq(open_with_group(0), EACCES);
        cr_assert_eq(open_with_group(4243), EACCES);
        shmz_zone_close(z);
        shmz_disconnect(c);
}

/* What the daemon hands out, seen at the fd level (the library hides the fd). */
static int raw_open(struct shmz_client *c, const char *name, uint64_t size, unsigned flags, int *ret_fd) {
        struct shmz_msg_zone_open req = { .size = size, .flags = flags };
        struct shmz_msg_zone_info info;

        strncpy_buf(req.name, sizeof(req.name), name);
        return client_request(c, SHMZ_MSG_ZONE_OPEN, &req, sizeof(req), &info, sizeof(info), ret_fd);
}

Test(zones, memfd_is_sealed_and_self_describing) {
        struct shmz_client *c = connect_or_die();
        struct shmz_zone_header h;
        int fd = -1, rofd = -1, seals;

        cr_assert_eq(raw_open(c, "sealed", 65536, SHMZ_CREATE, &fd), 0);
        cr_assert_geq(fd, 0);
        seals = fcntl(fd, F_GET_SEALS);
        cr_assert_eq(seals & (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL), F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
        /* Nobody can shrink it under the others (SIGBUS) or grow it. */
        cr_assert_eq(ftruncate(fd, 4096), -1);
        cr_assert_eq(errno, EPERM);
        cr_assert_eq(ftruncate(fd, 1 << 24), -1);
        cr_assert_eq(pread(fd, &h, sizeof(h), 0), (ssize_t) sizeof(h));
        cr_assert_eq(zone_header_check(&h, 65536 + SHMZ_ZONE_HEADER_SIZE, "sealed"), 0);
        cr_assert_eq(h.uid, getuid());
        cr_assert_eq(h.mode, 0600);
        /* The header's ACL copy follows chmod/chown (the registry's copy is the one that counts). */
        cr_assert_eq(shmz_zone_chmod(c, "sealed", 0640), 0);
        cr_assert_eq(shmz_zone_chown(c, "sealed", 65534, 65534), 0);
        cr_assert_eq(pread(fd, &h, sizeof(h), 0), (ssize_t) sizeof(h));
        cr_assert(h.mode == 0640 && h.uid == 65534 && h.gid == 65534, "header %o %u:%u", h.mode, h.uid, h.gid);

        cr_assert_eq(raw_open(c, "sealed", 0, SHMZ_RDONLY, &rofd), 0);
        cr_assert_eq(fcntl(rofd, F_GETFL) & O_ACCMODE, O_RDONLY);
        cr_assert_eq(pwrite(rofd, "x", 1, SHMZ_ZONE_HEADER_SIZE), -1);
        cr_assert_eq(errno, EBADF);
        cr_assert_eq(mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, rofd, 0), MAP_FAILED);
        cr_assert_eq(errno, EACCES);
        close(rofd);
        close(fd);
        shmz_disconnect(c);
}

Test(budget, zones_per_uid_are_counted) {
        struct shmz_client *c;
        struct shmz_zone *z[4];

        /* Tiny zones cost the daemon an fd each: their number is limited per uid, not only their bytes. */
        start_with("[daemon]\nuid_max_zones = 3\n[zone declared]\nsize = 4K\n");
        c = connect_or_die();
        for (int i = 0; i < 3; i++) {
                char name[8];

                snprintf(name, sizeof(name), "n%d", i);
                cr_assert_eq(shmz_zone_open(c, name, 4096, NULL, SHMZ_CREATE, &z[i]), 0, "zone %d", i);
        }
        cr_assert_eq(shmz_zone_open(c, "n3", 4096, NULL, SHMZ_CREATE, &z[3]), -EDQUOT);
        /* An unlinked zone still counts while attached, and stops counting at its last detach. */
        cr_assert_eq(shmz_zone_unlink(c, "n0"), 0);
        cr_assert_eq(shmz_zone_open(c, "n3", 4096, NULL, SHMZ_CREATE, &z[3]), -EDQUOT);
        shmz_zone_close(z[0]);
        cr_assert_eq(shmz_zone_open(c, "n3", 4096, NULL, SHMZ_CREATE, &z[3]), 0);
        for (int i = 1; i < 4; i++)
                shmz_zone_close(z[i]);
        shmz_disconnect(c);
}

Test(budget, declared_zones_use_no_quota) {
        struct shmz_client *c;
        struct shmz_zone *z;

        /* The administrator's 2M zone is root's, yet root's own 1M quota is untouched by it. */
        start_with("[daemon]\nuid_quota = 1M\n[zone admin]\nsize = 2M\n");
        c = connect_or_die();
        cr_assert_eq(shmz_zone_open(c, "mine", 900u << 10, NULL, SHMZ_CREATE, &z), 0);
        shmz_zone_close(z);
        shmz_disconnect(c);
}

int main(int argc, char *argv[]) {
        return harness_main(argc, argv, /* need_root= */ true, /* need_fuse= */ false);
}
