/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Zones survive a restart through systemd's fd store. The harness plays
 * systemd: its notify socket keeps the fds the daemon stores (FDSTORE=1) and
 * drops the ones it removes; the next daemon gets them back at 3.. with
 * LISTEN_FDS, LISTEN_FDNAMES and its own LISTEN_PID, as after `systemctl restart`.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "harness.h"
#include "shmzone.h"
#include "util.h"
#include "zone-header.h"

#define KEEP_FDNAME "shmz.1000.1000.640.0.0.keep"
#define DECL_FDNAME "shmz.0.0.644.1.0.decl"

static struct daemon_proc d;

static void start(void) {
        harness_init(&d, "[daemon]\nmemory_budget = 64M\nuid_quota = 4M\n"
                         "[zone decl]\nsize = 64K\ntag = d\nuser = root\ngroup = root\nmode = 0644\n");
        cr_assert_eq(harness_start(&d, NULL, false), 0, "daemon did not start: %s", harness_log(&d));
}

static void stop(void) {
        harness_cleanup(&d);
}

TestSuite(restart, .init = start, .fini = stop, .timeout = 60);

/* The harness's fd store entry of that FDNAME, or -1. */
static int stored(const char *fdname) {
        for (size_t i = 0; i < d.n_stored; i++)
                if (streq(d.stored_names[i], fdname))
                        return (int) i;
        return -1;
}

/* Store entries of the zone called name, whatever its identity. */
static unsigned stored_zone(const char *name) {
        unsigned n = 0;

        for (size_t i = 0; i < d.n_stored; i++) {
                const char *s = d.stored_names[i];
                size_t l = strlen(s), k = strlen(name);

                if (l > k && s[l - k - 1] == '.' && streq(s + l - k, name))
                        n++;
        }
        return n;
}

/* A memfd like the daemon's for zone `memfd_zone`, its header naming hdr_name, sealed or not. */
static int make_memfd(const char *memfd_zone, const char *hdr_name, bool seal) {
        struct shmz_zone_header h;
        char name[64];
        int fd;

        snprintf(name, sizeof(name), "shmzone:%s", memfd_zone);
        fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
        cr_assert_geq(fd, 0);
        cr_assert_eq(ftruncate(fd, 8192), 0);
        zone_header_init(&h, hdr_name, "", 8192, 0, 0, 0600, 1);
        cr_assert_eq(pwrite(fd, &h, sizeof(h), 0), (ssize_t) sizeof(h));
        if (seal)
                cr_assert_eq(fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL), 0);
        return fd;
}

static void expect_log(const char *line) {
        cr_expect_eq(harness_wait_log(&d, line, 5), 0, "no '%s' in the log:\n%s", line, harness_log(&d));
}

Test(restart, zones_survive_and_hostile_fds_are_dropped) {
        struct shmz_client *c = harness_connect(&d), *c2;
        struct shmz_zone *z, *gone, *z2, *more;
        struct shmz_daemon_status before, after;
        struct shmz_zone_stat st;
        volatile unsigned char *p, *p2;
        int pipefd[2], fds[HARNESS_MAX_STORED];
        const char *names[HARNESS_MAX_STORED];
        size_t n = 0;

        cr_assert_not_null(c);
        /* A client's zone with a byte pattern; chmod/chown after its memory exists: the FDNAME follows. */
        cr_assert_eq(shmz_zone_open(c, "keep", 3 << 20, "t", SHMZ_CREATE, &z), 0);
        p = shmz_zone_base(z);
        memset((void *) p, 0xa5, 4096);
        p[(3 << 20) - 1] = 0x5c;
        cr_assert_eq(shmz_zone_chown(c, "keep", 1000, 1000), 0);
        cr_assert_eq(shmz_zone_chmod(c, "keep", 0640), 0);
        cr_assert_eq(shmz_daemon_status(c, &before), 0);
        /* Unlinked while a client still holds it: out of the store at once. */
        cr_assert_eq(shmz_zone_open(c, "gone", 65536, "t", SHMZ_CREATE, &gone), 0);
        cr_assert_eq(shmz_zone_unlink(c, "gone"), 0);

        harness_drain_notify(&d);
        cr_assert_geq(stored(KEEP_FDNAME), 0, "keep not stored under its new identity");
        cr_assert_eq(stored_zone("keep"), 1, "the old identities of keep were not removed");
        cr_assert_geq(stored(DECL_FDNAME), 0);
        cr_assert_eq(stored_zone("gone"), 0, "an unlinked zone stays in the store");
        cr_assert_geq(stored("shmz.history"), 0, "no history record");
        cr_assert_eq(d.n_stored, 3);

        /* systemctl restart: the store outlives the daemon; our mappings do too. */
        cr_assert_eq(harness_stop(&d), 0);

        for (size_t i = 0; i < d.n_stored; i++) {
                fds[n] = d.stored_fds[i];
                names[n++] = d.stored_names[i];
        }
        /*
         * Hostile or broken entries, each dropped with a reason. The FDNAME itself
         * is trusted (systemd takes FDSTORE= from the service's main process
         * only, NotifyAccess=main): these stand for corruption and foreign fds.
         */
        cr_assert_eq(pipe2(pipefd, O_CLOEXEC), 0);
        fds[n] = pipefd[0];
        names[n++] = "shmz.0.0.600.0.0.pipe";
        fds[n] = make_memfd("unsealed", "unsealed", false);
        names[n++] = "shmz.0.0.600.0.0.unsealed";
        /* A header a writer damaged is no reason to lose a zone: adopted, repaired (test-keep.c). */
        fds[n] = make_memfd("hdr", "other", true);
        names[n++] = "shmz.0.0.600.0.0.hdr";
        fds[n] = make_memfd("bad", "bad", true);
        names[n++] = "shmz.0.0.9999.0.0.bad"; /* mode not octal */
        /* The same zone twice under one name: the second is a duplicate. */
        fds[n] = fcntl(d.stored_fds[stored(KEEP_FDNAME)], F_DUPFD_CLOEXEC, 3);
        names[n++] = KEEP_FDNAME;
        d.listen_fds = fds;
        d.listen_names = names;
        d.n_listen = n;
        cr_assert_eq(harness_start(&d, NULL, false), 0, "daemon did not restart: %s", harness_log(&d));
        for (size_t i = 3; i < n; i++)
                close(fds[i]);
        close(pipefd[1]);

        expect_log("Dropping stored fd 'shmz.0.0.600.0.0.pipe': it is not a shmzone memfd of that name.");
        expect_log("Dropping stored fd 'shmz.0.0.600.0.0.unsealed': it is not sealed as a zone is.");
        expect_log(
                "Stored zone 'shmz.0.0.600.0.0.hdr': its header was damaged: the daemon's fields were rewritten; its "
                "name, owner, mode and bytes are kept.");
        expect_log("Dropping stored fd 'shmz.0.0.9999.0.0.bad': its FDNAME does not parse.");
        expect_log("Dropping stored fd '" KEEP_FDNAME "': a zone of that name exists already.");
        expect_log("Took back 3 zone(s) from the previous run.");
        /* Dropped from systemd's store too (sent before READY=1, so harness_start() has read them). */
        for (size_t i = 3; i < n; i++) {
                char line[300];

                if (streq(names[i], "shmz.0.0.600.0.0.hdr"))
                        continue;

                snprintf(line, sizeof(line), "FDSTOREREMOVE=1\nFDNAME=%s|", names[i]);
                cr_expect(strstr(d.notified, line), "no %s in %s", line, d.notified);
        }

        /* The store holds what it held: removing the duplicate's name took keep's copy, it was stored again. */
        harness_drain_notify(&d);
        cr_expect_eq(d.n_stored, 3);
        cr_expect_geq(stored(KEEP_FDNAME), 0);
        cr_expect_geq(stored(DECL_FDNAME), 0);

        c2 = harness_connect(&d);
        cr_assert_not_null(c2);
        cr_assert_eq(shmz_zone_open(c2, "keep", 0, "t", 0, &z2), 0);
        cr_expect_eq(shmz_zone_existed(z2), 1);
        p2 = shmz_zone_base(z2);
        for (size_t i = 0; i < 4096; i++)
                cr_assert_eq(p2[i], 0xa5, "byte %zu", i);
        cr_assert_eq(p2[(3 << 20) - 1], 0x5c);
        /* The mapping from before the restart and the new one are the same memory. */
        p[8192] = 0x11;
        cr_assert_eq(p2[8192], 0x11);
        p2[8193] = 0x22;
        cr_assert_eq(p[8193], 0x22);

        cr_assert_eq(shmz_zone_stat(c2, "keep", &st), 0);
        cr_expect_eq(st.uid, 1000);
        cr_expect_eq(st.gid, 1000);
        cr_expect_eq(st.mode, 0640);
        cr_assert_eq(shmz_zone_stat(c2, "decl", &st), 0);
        cr_expect_eq(st.mode, 0644);
        cr_expect(st.flags & SHMZ_ZONE_INFO_DECLARED);
        cr_expect_eq(shmz_zone_open(c2, "gone", 0, NULL, 0, &more), -ENOENT);

        /* Charged again: the same budget, and root's 4M quota has room for 1M more, not 2M. */
        cr_assert_eq(shmz_daemon_status(c2, &after), 0);
        cr_expect_eq(after.budget_used, before.budget_used + 8192, "the repaired zone's 8K besides");
        cr_expect_eq(after.zones, 3);
        cr_expect_eq(shmz_zone_open(c2, "more", 2 << 20, "t", SHMZ_CREATE, &more), -EDQUOT);

        shmz_zone_close(z2);
        shmz_disconnect(c2);
        shmz_zone_close(gone);
        shmz_zone_close(z);
        shmz_disconnect(c);
}

/* A listening socket at d.socket, as a socket unit would pass it. */
static int make_listen_socket(void) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);

        cr_assert_geq(fd, 0);
        cr_assert_lt(strlen(d.socket), sizeof(sa.sun_path));
        memcpy(sa.sun_path, d.socket, strlen(d.socket) + 1);
        (void) unlink(d.socket);
        cr_assert_eq(bind(fd, (struct sockaddr *) &sa, sizeof(sa)), 0);
        cr_assert_eq(chmod(d.socket, 0666), 0);
        cr_assert_eq(listen(fd, 16), 0);
        return fd;
}

Test(restart, config_meets_kept_zones_and_socket_activation) {
        struct shmz_client *c = harness_connect(&d);
        struct shmz_zone *z;
        struct shmz_zone_stat st;
        int fds[3];
        const char *names[3];
        int i_decl;

        cr_assert_not_null(c);
        cr_assert_eq(shmz_zone_open(c, "decl", 0, "d", 0, &z), 0);
        memset(shmz_zone_base(z), 0x3c, 100);
        shmz_zone_close(z);
        shmz_disconnect(c);
        harness_drain_notify(&d);
        cr_assert_eq(harness_stop(&d), 0);
        i_decl = stored(DECL_FDNAME);
        cr_assert_geq(i_decl, 0);

        /* The declaration changed its size, and a new zone is declared: refused and created, as a reload does. */
        harness_write_config(&d, "[daemon]\nmemory_budget = 64M\nuid_quota = 4M\n"
                                 "[zone decl]\nsize = 128K\ntag = d\nuser = root\ngroup = root\nmode = 0644\n"
                                 "[zone fresh]\nsize = 64K\ntag = f\nuser = root\ngroup = root\nmode = 0600\n");
        /* systemd names a socket unit's fd after the unit: not a zone's name, whatever it starts with. */
        fds[0] = make_listen_socket();
        names[0] = "shmzoned.socket";
        fds[1] = d.stored_fds[i_decl];
        names[1] = DECL_FDNAME;
        fds[2] = d.stored_fds[stored("shmz.history")];
        names[2] = "shmz.history";
        d.listen_fds = fds;
        d.listen_names = names;
        d.n_listen = 3;
        cr_assert_eq(harness_start(&d, NULL, false), 0, "daemon did not restart: %s", harness_log(&d));
        close(fds[0]);
        expect_log("Zone 'decl': size changed");
        expect_log("Zone 'fresh': created");
        expect_log("refused, see above; serving the zones kept from the previous run.");

        c = harness_connect(&d);
        cr_assert_not_null(c, "the passed socket does not serve");
        cr_assert_eq(shmz_zone_open(c, "decl", 0, "d", 0, &z), 0);
        cr_assert_eq(((unsigned char *) shmz_zone_base(z))[99], 0x3c);
        cr_assert_eq(shmz_zone_stat(c, "decl", &st), 0);
        cr_expect_eq(st.size, 65536, "the running zone keeps its size");
        shmz_zone_close(z);
        shmz_disconnect(c);
        harness_drain_notify(&d);
        cr_expect_geq(stored(DECL_FDNAME), 0);
        cr_expect_geq(stored("shmz.0.0.600.1.0.fresh"), 0);

        /* Now it is no longer declared: retired, and out of the store. */
        harness_write_config(&d, "[daemon]\nmemory_budget = 64M\n");
        cr_assert_eq(harness_reload(&d), 0, "reload: %s", harness_log(&d));
        harness_drain_notify(&d);
        cr_expect_eq(stored_zone("decl"), 0);
        cr_expect_eq(stored_zone("fresh"), 0);
        cr_expect_eq(d.n_stored, 1);
        cr_expect_geq(stored("shmz.history"), 0, "the history record stays while the daemon runs");
        /* The socket was systemd's: the daemon leaves its file in place. */
        cr_assert_eq(harness_stop(&d), 0);
        cr_expect_eq(access(d.socket, F_OK), 0);
}

int main(int argc, char *argv[]) {
        return harness_main(argc, argv, true, false);
}
