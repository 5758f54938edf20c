/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The core's port and segment tables, in process: listeners, ACL by mode,
 * backlog, per-uid limits, segments (tokens, seals, size, the memory bound),
 * lookups by id, drops, listings. Every test ends with ports_free() in a
 * sanitized build, so anything left behind is a leak.
 */
#include <criterion/criterion.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ports.h"
#include "util.h"

static const gid_t supp_groups[] = { 3000, 2000 };
static const struct caller OWNER = { .uid = 1000, .gid = 2000, .pid = 100 };
static const struct caller GRP = { .uid = 1001, .gid = 2000, .pid = 101 };
static const struct caller SUPP = { .uid = 1002, .gid = 1002, .pid = 102, .groups = supp_groups, .n_groups = 2 };
static const struct caller OTHER = { .uid = 1003, .gid = 1003, .pid = 103 };
static const struct caller ROOT = { .uid = 0, .gid = 0, .pid = 1 };

static struct ports *pt;
static struct ports_limits lim;

static void setup_with(uint32_t chunk_size, uint32_t chunks, uint64_t port_memory, uint32_t per_uid, uint32_t backlog) {
        lim = (struct ports_limits){
                .chunk_size = chunk_size,
                .segment_chunks = chunks,
                .port_memory = port_memory,
                .max_ports_per_uid = per_uid,
                .backlog = backlog,
                .uid_connections = 1000,
                .segment_memory = UINT64_C(1) << 30,
                .uid_segment_memory = UINT64_C(1) << 30,
        };
        cr_assert_eq(ports_new(&lim, &pt), 0);
}

static void setup(void) {
        setup_with(4096, 16, 4 * 4096 * 16, 16, 4);
}

static void teardown(void) {
        pt = ports_free(pt);
}

TestSuite(ports, .init = setup, .fini = teardown);

/* A port from c to name, with its channel like the front end makes it. */
static struct port *connect_ok(const struct caller *c, const char *name) {
        struct port *p = NULL;
        void *owner = NULL;
        int fd;

        cr_assert_eq(ports_connect(pt, c, name, &p, &owner), 0);
        cr_assert_not_null(p);
        fd = memfd_create("chan", MFD_CLOEXEC);
        cr_assert_geq(fd, 0);
        cr_assert_eq(ftruncate(fd, SHMZ_CHANNEL_SIZE), 0);
        cr_assert_eq(ports_port_set_channel(pt, p, fd), 0);
        close(fd);
        return p;
}

Test(ports, limits_are_checked) {
        struct ports *x = NULL;
        struct ports_limits bad = lim;

        bad.chunk_size = 5000;
        cr_assert_eq(ports_new(&bad, &x), -EINVAL);
        bad = lim;
        bad.segment_chunks = SHMZ_SEGMENT_MAX_CHUNKS + 1;
        cr_assert_eq(ports_new(&bad, &x), -EINVAL);
        bad = lim;
        bad.port_memory = 4096;
        cr_assert_eq(ports_new(&bad, &x), -EINVAL);
        cr_assert_null(x);
}

Test(ports, listen_connect_and_peer) {
        struct listener *l;
        struct port *p;
        struct shmz_msg_port_peer peer;
        void *owner = NULL;
        int token_owner = 7;

        cr_assert_eq(ports_listen(pt, &OWNER, "svc", 0620, &token_owner, &l), 0);
        cr_assert_eq(ports_listen(pt, &GRP, "svc", 0666, NULL, NULL), -EADDRINUSE);
        cr_assert_eq(ports_listen(pt, &GRP, "../x", 0666, NULL, NULL), -EINVAL);
        cr_assert_eq(ports_listen(pt, &GRP, "x", 01777, NULL, NULL), -EINVAL);
        cr_assert_eq(ports_connect(pt, &GRP, "nope", &p, &owner), -ENOENT);

        cr_assert_eq(ports_connect(pt, &GRP, "svc", &p, &owner), 0);
        cr_assert_eq(owner, &token_owner);
        ports_port_peer(pt, p, SHMZ_PORT_SIDE_CONNECTOR, &peer);
        cr_assert_eq(peer.side, SHMZ_PORT_SIDE_CONNECTOR);
        cr_assert_eq(peer.pid, 100u); /* the listener's */
        cr_assert_eq(peer.uid, 1000u);
        cr_assert_eq(peer.chunk_size, 4096u);
        cr_assert_eq(peer.segment_chunks, 16u);
        cr_assert_str_eq(peer.name, "svc");
        uint64_t tok0 = peer.token, id = peer.port_id;
        ports_port_peer(pt, p, SHMZ_PORT_SIDE_ACCEPTOR, &peer);
        cr_assert_eq(peer.pid, 101u); /* the connector's */
        cr_assert_eq(peer.uid, 1001u);
        cr_assert_eq(peer.port_id, id);
        cr_assert_neq(peer.token, tok0);
        ports_port_drop(pt, p, false);
        ports_unlisten(pt, l);
        cr_assert_eq(ports_connect(pt, &GRP, "svc", &p, &owner), -ENOENT);
}

Test(ports, acl_by_mode_write_bits) {
        struct listener *l;
        struct port *p;
        void *owner;

        /* Owner may write, group may not, others may. */
        cr_assert_eq(ports_listen(pt, &OWNER, "a", 0642, NULL, &l), 0);
        cr_assert_eq(ports_connect(pt, &GRP, "a", &p, &owner), -EACCES);
        cr_assert_eq(ports_connect(pt, &SUPP, "a", &p, &owner), -EACCES); /* 2000 is a supplementary group */
        p = connect_ok(&OTHER, "a");
        ports_port_drop(pt, p, false);
        p = connect_ok(&OWNER, "a");
        ports_port_drop(pt, p, false);
        p = connect_ok(&ROOT, "a");
        ports_port_drop(pt, p, false);
        ports_unlisten(pt, l);

        /* Read bits do not let anyone connect. */
        cr_assert_eq(ports_listen(pt, &OWNER, "b", 0444, NULL, &l), 0);
        cr_assert_eq(ports_connect(pt, &OTHER, "b", &p, &owner), -EACCES);
        cr_assert_eq(ports_connect(pt, &OWNER, "b", &p, &owner), -EACCES);
        ports_unlisten(pt, l);

        /* Group write: the supplementary group counts. */
        cr_assert_eq(ports_listen(pt, &OWNER, "c", 0620, NULL, &l), 0);
        p = connect_ok(&SUPP, "c");
        ports_port_drop(pt, p, false);
        cr_assert_eq(ports_connect(pt, &OTHER, "c", &p, &owner), -EACCES);
        ports_unlisten(pt, l);
}

Test(ports, backlog_and_accept) {
        struct listener *l;
        struct port *p[5];
        struct shmz_msg_port_info li;
        void *owner;

        cr_assert_eq(ports_listen(pt, &OWNER, "svc", 0666, NULL, &l), 0);
        /* The owner's own connections may fill the backlog (another uid gets half of it). */
        for (int i = 0; i < 4; i++)
                p[i] = connect_ok(&OWNER, "svc");
        cr_assert_eq(ports_connect(pt, &OWNER, "svc", &p[4], &owner), -EAGAIN);
        cr_assert_eq(ports_listener_info(pt, "svc", &li, NULL), 0);
        cr_assert_eq(li.backlog, 4u);
        cr_assert_eq(li.connections, 4u);

        /* Accepting one makes room; accepting it twice or a stranger's id does not. */
        struct shmz_msg_port_peer a;
        struct shmz_msg_port_info pi;
        ports_port_peer(pt, p[0], SHMZ_PORT_SIDE_ACCEPTOR, &a);
        cr_assert_eq(ports_port_info(pt, a.port_id, &pi), 0);
        cr_assert_eq(pi.backlog, 1u);
        cr_assert_eq(ports_accepted(pt, l, pi.port_id), 0);
        cr_assert_eq(ports_accepted(pt, l, pi.port_id), -EALREADY);
        cr_assert_eq(ports_accepted(pt, l, 999), -ENOENT);
        p[4] = connect_ok(&OWNER, "svc");
        cr_assert_eq(ports_connect(pt, &OWNER, "svc", &(struct port *){ NULL }, &owner), -EAGAIN);

        /* A dropped unaccepted port leaves the backlog. */
        ports_port_drop(pt, p[1], true);
        cr_assert_eq(ports_listener_info(pt, "svc", &li, NULL), 0);
        cr_assert_eq(li.backlog, 3u);
        cr_assert_eq(li.connections, 4u);

        /* Ports outlive their listener. */
        ports_unlisten(pt, l);
        struct ports_stats st;
        ports_get_stats(pt, &st);
        cr_assert_eq(st.listeners, 0u);
        cr_assert_eq(st.ports, 4u);
        cr_assert_eq(st.ports_closed, 1u);
        cr_assert_eq(st.peers_died, 1u);
        ports_port_drop(pt, p[0], false);
        ports_port_drop(pt, p[2], false);
        ports_port_drop(pt, p[3], false);
        ports_port_drop(pt, p[4], false);
        ports_get_stats(pt, &st);
        cr_assert_eq(st.ports, 0u);
        cr_assert_eq(st.ports_closed, 5u);
}

Test(ports, per_uid_limit) {
        struct port *p[16];
        struct listener *l, *l2;
        void *owner;
        size_t n = 0;

        teardown();
        setup_with(4096, 16, 65536, 4, 64);
        /* A port counts for its connector alone; the listener for its owner. */
        cr_assert_eq(ports_listen(pt, &OWNER, "svc", 0666, NULL, &l), 0);
        for (; n < 4; n++)
                p[n] = connect_ok(&OTHER, "svc");
        cr_assert_eq(ports_connect(pt, &OTHER, "svc", &p[n], &owner), -EUSERS);
        /* OTHER's four ports cost OWNER nothing: it publishes and connects as before, and others get in. */
        cr_assert_eq(ports_listen(pt, &OWNER, "svc2", 0666, NULL, &l2), 0);
        p[n++] = connect_ok(&OWNER, "svc");
        p[n++] = connect_ok(&GRP, "svc");
        ports_port_drop(pt, p[0], false);
        p[0] = connect_ok(&OTHER, "svc");
        cr_assert_eq(ports_connect(pt, &OTHER, "svc2", &p[n], &owner), -EUSERS);
        while (n > 0)
                ports_port_drop(pt, p[--n], false);
        ports_unlisten(pt, l2);
        ports_unlisten(pt, l);
        /* Two listeners and two ports of OWNER's: four. */
        cr_assert_eq(ports_listen(pt, &OWNER, "a", 0666, NULL, &l), 0);
        cr_assert_eq(ports_listen(pt, &OWNER, "b", 0666, NULL, &l2), 0);
        p[n++] = connect_ok(&OWNER, "a");
        p[n++] = connect_ok(&OWNER, "a");
        cr_assert_eq(ports_connect(pt, &OWNER, "b", &p[n], &owner), -EUSERS);
        cr_assert_eq(ports_listen(pt, &OWNER, "c", 0666, NULL, NULL), -EUSERS);
        while (n > 0)
                ports_port_drop(pt, p[--n], false);
        ports_unlisten(pt, l2);
        ports_unlisten(pt, l);
}

static uint64_t port_id_of(struct port *p) {
        struct shmz_msg_port_peer peer;

        ports_port_peer(pt, p, SHMZ_PORT_SIDE_CONNECTOR, &peer);
        return peer.port_id;
}

Test(ports, one_uid_takes_a_bounded_share_of_a_listener) {
        struct port *p[16];
        struct listener *l;
        void *owner;
        size_t n = 0;

        teardown();
        setup_with(4096, 16, 65536, 64, 4);
        lim.uid_connections = 3;
        ports_set_limits(pt, &lim);
        cr_assert_eq(ports_listen(pt, &OWNER, "svc", 0666, NULL, &l), 0);
        /* Half the backlog unaccepted: two. */
        p[n++] = connect_ok(&OTHER, "svc");
        p[n++] = connect_ok(&OTHER, "svc");
        cr_assert_eq(ports_connect(pt, &OTHER, "svc", &p[n], &owner), -EUSERS);
        /* The rest of the backlog is others'. */
        p[n++] = connect_ok(&GRP, "svc");
        cr_assert_eq(ports_accepted(pt, l, port_id_of(p[0])), 0);
        /* One accepted, one pending: one more, then three live is all. */
        p[n++] = connect_ok(&OTHER, "svc");
        cr_assert_eq(ports_accepted(pt, l, port_id_of(p[1])), 0);
        cr_assert_eq(ports_accepted(pt, l, port_id_of(p[3])), 0);
        cr_assert_eq(ports_connect(pt, &OTHER, "svc", &p[n], &owner), -EUSERS);
        /* The owner and root are not bounded by it. */
        for (int i = 0; i < 3; i++) {
                p[n] = connect_ok(i == 0 ? &ROOT : &OWNER, "svc");
                cr_assert_eq(ports_accepted(pt, l, port_id_of(p[n])), 0);
                n++;
        }
        /* A port that ends gives its share back. */
        ports_port_drop(pt, p[0], false);
        p[0] = connect_ok(&OTHER, "svc");
        while (n > 0)
                ports_port_drop(pt, p[--n], false);
        ports_unlisten(pt, l);
}

Test(ports, reserved_names) {
        struct port_decl rd[] = {
                { .name = "svc", .uid = 1000, .gid = 2000, .mode = 0620 },
                { .name = "solo", .uid = 1000, .gid = 2000, .mode = 0600 },
        };
        struct shmz_msg_port_info li;
        struct listener *l;
        struct port *p;
        void *owner;

        cr_assert_eq(ports_set_reserved(pt, rd, ELEMENTSOF(rd)), 0);
        /* Only its user, root, or its group where the mode grants the group write. */
        cr_assert_eq(ports_listen(pt, &OTHER, "svc", 0666, NULL, NULL), -EACCES);
        cr_assert_eq(ports_listen(pt, &GRP, "solo", 0666, NULL, NULL), -EACCES);
        cr_assert_eq(ports_listen(pt, &GRP, "svc", 0666, NULL, &l), 0);
        /* The reservation's ACL, not the publisher's. */
        cr_assert_eq(ports_listener_info(pt, "svc", &li, NULL), 0);
        cr_assert_eq(li.mode, 0620u);
        cr_assert_eq(li.uid, 1000u);
        cr_assert_eq(li.gid, 2000u);
        cr_assert_eq(li.uid_side[1], 1001u);
        cr_assert_eq(ports_connect(pt, &OTHER, "svc", &p, &owner), -EACCES);
        p = connect_ok(&SUPP, "svc");
        ports_port_drop(pt, p, false);
        ports_unlisten(pt, l);
        cr_assert_eq(ports_listen(pt, &OWNER, "solo", 0666, NULL, &l), 0);
        ports_unlisten(pt, l);
        cr_assert_eq(ports_listen(pt, &ROOT, "solo", 0666, NULL, &l), 0);
        ports_unlisten(pt, l);
        /* Unreserved names are first come, first served, as before; a reload can drop reservations. */
        cr_assert_eq(ports_listen(pt, &OTHER, "free", 0600, NULL, &l), 0);
        ports_unlisten(pt, l);
        cr_assert_eq(ports_set_reserved(pt, NULL, 0), 0);
        cr_assert_eq(ports_listen(pt, &OTHER, "svc", 0666, NULL, &l), 0);
        ports_unlisten(pt, l);
        rd[0].mode = 01000;
        cr_assert_eq(ports_set_reserved(pt, rd, 1), -EINVAL);
}

static void check_segment_fd(int fd, const struct shmz_msg_segment_info *si) {
        struct stat st;
        struct shmz_segment_header h;
        int seals = fcntl(fd, F_GET_SEALS);

        cr_assert_eq(fstat(fd, &st), 0);
        cr_assert_eq((uint64_t) st.st_size, SHMZ_SEGMENT_HEADER_SIZE + (uint64_t) si->chunk_size * si->n_chunks);
        cr_assert_eq((uint64_t) st.st_size, si->map_size);
        cr_assert_eq(seals, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
        cr_assert_eq(fcntl(fd, F_GETFL) & O_ACCMODE, O_RDWR);
        cr_assert_eq(pread(fd, &h, sizeof(h), 0), (ssize_t) sizeof(h));
        cr_assert_eq(h.magic, SHMZ_SEGMENT_MAGIC);
        cr_assert_eq(h.abi_version, SHMZ_ABI_VERSION);
        cr_assert_eq(h.header_size, SHMZ_SEGMENT_HEADER_SIZE);
        cr_assert_eq(h.map_size, si->map_size);
        cr_assert_eq(h.id, si->id);
        cr_assert_eq(h.port_id, si->port_id);
        cr_assert_eq(h.side, si->side);
        cr_assert_eq(h.slot, si->slot);
        cr_assert_eq(h.chunk_size, si->chunk_size);
        cr_assert_eq(h.n_chunks, si->n_chunks);
        for (size_t i = 0; i < ELEMENTSOF(h.used); i++)
                cr_assert_eq(h.used[i], 0u);
        cr_assert_eq(ftruncate(fd, 0), -1);
}

/*
 * Segments are also bounded per sending uid, per sending uid towards one receiving uid (half of the
 * former: the receiver decides when chunks come back), and for all ports together.
 */
Test(ports, segment_memory_per_uid_per_peer_and_in_all) {
        const uint64_t seg = SHMZ_SEGMENT_HEADER_SIZE + 4096 * 16;
        struct shmz_msg_port_peer c1, c2, c3, a1;
        struct shmz_msg_segment_info si;
        struct listener *l, *l2;
        struct port *p1, *p2, *p3;
        int fds[8], n = 0, fd = -1;

        /* Each direction may hold 4 segments (the suite's setup); a uid 4, 2 towards one uid; all ports 6. */
        teardown();
        lim.uid_segment_memory = 4 * seg;
        lim.segment_memory = 6 * seg;
        cr_assert_eq(ports_new(&lim, &pt), 0);

        cr_assert_eq(ports_listen(pt, &OWNER, "svc", 0666, NULL, &l), 0);
        cr_assert_eq(ports_listen(pt, &GRP, "svc2", 0666, NULL, &l2), 0);
        p1 = connect_ok(&OTHER, "svc");
        p2 = connect_ok(&OTHER, "svc2");
        ports_port_peer(pt, p1, 0, &c1);
        ports_port_peer(pt, p2, 0, &c2);
        ports_port_peer(pt, p1, 1, &a1);
        /* OTHER sends to OWNER: two segments, whatever the port may hold. */
        cr_assert_eq(ports_segment_create(pt, c1.port_id, c1.token, 0, &si, &fds[n++]), 0);
        cr_assert_eq(ports_segment_create(pt, c1.port_id, c1.token, 0, &si, &fds[n++]), 0);
        cr_assert_eq(ports_segment_create(pt, c1.port_id, c1.token, 0, &si, &fd), -ENOSPC);
        /* And to GRP: two more, then its uid's four are used. */
        cr_assert_eq(ports_segment_create(pt, c2.port_id, c2.token, 0, &si, &fds[n++]), 0);
        cr_assert_eq(ports_segment_create(pt, c2.port_id, c2.token, 0, &si, &fds[n++]), 0);
        cr_assert_eq(ports_segment_create(pt, c2.port_id, c2.token, 0, &si, &fd), -ENOSPC);
        /* OWNER has its own share, until all ports together hold 6. */
        cr_assert_eq(ports_segment_create(pt, a1.port_id, a1.token, 1, &si, &fds[n++]), 0);
        cr_assert_eq(ports_segment_create(pt, a1.port_id, a1.token, 1, &si, &fds[n++]), 0);
        cr_assert_eq(ports_segment_create(pt, a1.port_id, a1.token, 1, &si, &fd), -ENOSPC);
        cr_assert_eq(fd, -1);
        /* A port that ends gives its segments back to every count: OTHER's towards OWNER stay at two. */
        ports_port_drop(pt, p2, false);
        cr_assert_eq(ports_segment_create(pt, c1.port_id, c1.token, 0, &si, &fd), -ENOSPC);
        p3 = connect_ok(&OTHER, "svc2");
        ports_port_peer(pt, p3, 0, &c3);
        cr_assert_eq(ports_segment_create(pt, c3.port_id, c3.token, 0, &si, &fds[n++]), 0);
        for (int i = 0; i < n; i++)
                close(fds[i]);
        ports_port_drop(pt, p3, false);
        ports_port_drop(pt, p1, false);
        ports_unlisten(pt, l2);
        ports_unlisten(pt, l);
}

Test(ports, segments_token_size_and_bound) {
        struct shmz_msg_port_peer c, a;
        struct shmz_msg_segment_info si, got;
        struct listener *l;
        struct port *p;
        int fd = -1, fds[4];

        cr_assert_eq(ports_listen(pt, &OWNER, "svc", 0666, NULL, &l), 0);
        p = connect_ok(&OTHER, "svc");
        ports_port_peer(pt, p, 0, &c);
        ports_port_peer(pt, p, 1, &a);

        cr_assert_eq(ports_segment_create(pt, c.port_id, c.token ^ 1, 0, &si, &fd), -EPERM);
        cr_assert_eq(ports_segment_create(pt, c.port_id, c.token, 1, &si, &fd), -EPERM); /* the wrong side */
        cr_assert_eq(ports_segment_create(pt, c.port_id, c.token, 2, &si, &fd), -EINVAL);
        cr_assert_eq(ports_segment_create(pt, c.port_id + 100, c.token, 0, &si, &fd), -ENOENT);
        cr_assert_eq(fd, -1);

        /* port_memory holds 4 segments per direction. */
        for (int i = 0; i < 4; i++) {
                cr_assert_eq(ports_segment_create(pt, c.port_id, c.token, 0, &si, &fds[i]), 0);
                cr_assert_eq(si.slot, (uint32_t) i);
                cr_assert_eq(si.side, 0u);
                cr_assert_eq(si.owner_pid, 103u);
                cr_assert_eq(si.owner_uid, 1003u);
                check_segment_fd(fds[i], &si);
                cr_assert_eq(ports_segment_info(pt, si.id, &got), 0);
                cr_assert_eq(got.id, si.id);
                cr_assert_eq(got.port_id, c.port_id);
        }
        cr_assert_eq(ports_segment_create(pt, c.port_id, c.token, 0, &si, &fd), -ENOSPC);
        /* The other direction has its own bound. */
        cr_assert_eq(ports_segment_create(pt, a.port_id, a.token, 1, &si, &fd), 0);
        cr_assert_eq(si.owner_uid, 1000u);
        cr_assert_eq(si.slot, 0u);
        close(fd);

        /* Chunks in use are counted from the bitmap. */
        struct shmz_segment_header *h =
                mmap(NULL, SHMZ_SEGMENT_HEADER_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
        cr_assert_neq(h, MAP_FAILED);
        h->used[0] = 0x7;
        h->used[1] = ~UINT64_C(0); /* past n_chunks (16): not counted */
        struct ports_stats st;
        ports_get_stats(pt, &st);
        cr_assert_eq(st.segments, 5u);
        cr_assert_eq(st.chunks, 5u * 16);
        cr_assert_eq(st.chunks_used, 3u);
        cr_assert_eq(st.segment_bytes, 5u * (SHMZ_SEGMENT_HEADER_SIZE + 16 * 4096));
        munmap(h, SHMZ_SEGMENT_HEADER_SIZE);

        struct shmz_msg_port_info pi;
        cr_assert_eq(ports_port_info(pt, c.port_id, &pi), 0);
        cr_assert_eq(pi.segments, 5u);
        cr_assert_eq(pi.chunks_in_flight[0], 3u);
        cr_assert_eq(pi.chunks_in_flight[1], 0u);
        for (int i = 0; i < 4; i++)
                close(fds[i]);
        ports_port_drop(pt, p, false);
        ports_unlisten(pt, l);
}

Test(ports, lookup_drop_and_view_reference) {
        struct shmz_msg_port_peer c;
        struct shmz_msg_segment_info si, got;
        struct listener *l;
        struct segment *s;
        struct port *p;
        const void *m;
        size_t size;
        int fd;

        cr_assert_eq(ports_listen(pt, &OWNER, "svc", 0666, NULL, &l), 0);
        p = connect_ok(&OTHER, "svc");
        ports_port_peer(pt, p, 0, &c);
        cr_assert_eq(ports_segment_create(pt, c.port_id, c.token, 0, &si, &fd), 0);
        cr_assert_eq(pwrite(fd, "hello", 5, SHMZ_SEGMENT_HEADER_SIZE), 5);
        close(fd);

        cr_assert_eq(ports_segment_info(pt, si.id + 1, &got), -ENOENT);
        cr_assert_eq(ports_segment_info(pt, 0, &got), -ENOENT);
        cr_assert_eq(ports_segment_info(pt, UINT64_MAX, &got), -ENOENT);
        cr_assert_eq(ports_segment_ref(pt, si.id, &s), 0);
        cr_assert_eq(segment_view_map(s, &m, &size), 0);
        cr_assert_eq(size, si.map_size);
        cr_assert_eq(memcmp((const char *) m + SHMZ_SEGMENT_HEADER_SIZE, "hello", 5), 0);

        /* The port goes: the segment leaves the table, its memory stays for the reference. */
        ports_port_drop(pt, p, true);
        cr_assert_eq(ports_segment_info(pt, si.id, &got), -ENOENT);
        cr_assert_eq(ports_segment_ref(pt, si.id, &(struct segment *){ NULL }), -ENOENT);
        struct ports_stats st;
        ports_get_stats(pt, &st);
        cr_assert_eq(st.segments, 1u);
        cr_assert_eq(memcmp((const char *) m + SHMZ_SEGMENT_HEADER_SIZE, "hello", 5), 0);
        ports_segment_unref(pt, s);
        ports_get_stats(pt, &st);
        cr_assert_eq(st.segments, 0u);
        cr_assert_eq(st.segment_bytes, 0u);

        /* Slots are reused with new ids: the old id never finds the new segment. */
        p = connect_ok(&OTHER, "svc");
        ports_port_peer(pt, p, 0, &c);
        for (int i = 0; i < 3; i++) {
                cr_assert_eq(ports_segment_create(pt, c.port_id, c.token, 0, &got, &fd), 0);
                cr_assert_neq(got.id, si.id);
                close(fd);
        }
        cr_assert_eq(ports_segment_info(pt, si.id, &got), -ENOENT);
        ports_port_drop(pt, p, false);
        ports_unlisten(pt, l);
}

Test(ports, listings_sorted) {
        const char *names[] = { "zeta", "alpha", "mid", "beta" };
        struct listener *l[4];
        struct port *p[3];
        struct shmz_msg_port_info *v;
        struct shmz_msg_segment_info *sv;
        size_t n;

        for (int i = 0; i < 4; i++)
                cr_assert_eq(ports_listen(pt, &OWNER, names[i], 0666, NULL, &l[i]), 0);
        cr_assert_eq(ports_list_listeners(pt, &v, &n), 0);
        cr_assert_eq(n, 4u);
        cr_assert_str_eq(v[0].name, "alpha");
        cr_assert_str_eq(v[1].name, "beta");
        cr_assert_str_eq(v[2].name, "mid");
        cr_assert_str_eq(v[3].name, "zeta");
        cr_assert_eq(v[0].port_id, 0u);
        cr_assert_eq(v[0].mode, 0666u);
        cr_assert_eq(v[0].pid[1], 100u);
        free(v);

        p[0] = connect_ok(&OTHER, "mid");
        p[1] = connect_ok(&GRP, "alpha");
        p[2] = connect_ok(&OTHER, "mid");
        cr_assert_eq(ports_list_ports(pt, &v, &n), 0);
        cr_assert_eq(n, 3u);
        cr_assert_lt(v[0].port_id, v[1].port_id);
        cr_assert_lt(v[1].port_id, v[2].port_id);
        cr_assert_str_eq(v[1].name, "alpha");
        cr_assert_eq(v[1].uid_side[0], 1001u);
        cr_assert_eq(v[1].uid_side[1], 1000u);
        free(v);
        cr_assert_eq(ports_list_connections(pt, "mid", &v, &n), 0);
        cr_assert_eq(n, 2u);
        cr_assert_str_eq(v[0].name, "mid");
        cr_assert_lt(v[0].port_id, v[1].port_id);
        free(v);
        cr_assert_eq(ports_list_connections(pt, "nope", &v, &n), -ENOENT);

        /* Segments by id, across ports. */
        for (int i = 2; i >= 0; i--) {
                struct shmz_msg_port_peer c;
                struct shmz_msg_segment_info si;
                int fd;

                ports_port_peer(pt, p[i], 0, &c);
                cr_assert_eq(ports_segment_create(pt, c.port_id, c.token, 0, &si, &fd), 0);
                close(fd);
        }
        cr_assert_eq(ports_list_segments(pt, &sv, &n), 0);
        cr_assert_eq(n, 3u);
        cr_assert_lt(sv[0].id, sv[1].id);
        cr_assert_lt(sv[1].id, sv[2].id);
        free(sv);

        for (int i = 0; i < 3; i++)
                ports_port_drop(pt, p[i], false);
        for (int i = 0; i < 4; i++)
                ports_unlisten(pt, l[i]);
        cr_assert_eq(ports_list_listeners(pt, &v, &n), 0);
        cr_assert_eq(n, 0u);
        free(v);
}

/* Pages give what the whole listings give, in the same order. */
Test(ports, pages_match_listings) {
        struct listener *l[40];
        struct port *p[40];
        struct shmz_msg_port_info *all, page[7];
        struct shmz_msg_segment_info *sall, spage[7];
        size_t n_all, n, k;
        char name[16];

        teardown();
        setup_with(4096, 1, 3 * 4096, 5000, 5000);
        /*
         * More segments than the table makes fresh slots for, dropped in
         * reverse: the slots are reused from then on, so that ids no longer
         * follow the order segments are made in.
         */
        {
                static struct port *tmp[400];
                struct listener *tl;

                cr_assert_eq(ports_listen(pt, &OWNER, "tmp", 0666, NULL, &tl), 0);
                for (int i = 0; i < 400; i++) {
                        struct shmz_msg_port_peer c;
                        struct shmz_msg_segment_info si;
                        int fd;

                        tmp[i] = connect_ok(&OTHER, "tmp");
                        ports_port_peer(pt, tmp[i], 0, &c);
                        for (int j = 0; j < 3; j++) {
                                cr_assert_eq(ports_segment_create(pt, c.port_id, c.token, 0, &si, &fd), 0);
                                close(fd);
                        }
                }
                for (int i = 399; i >= 0; i--)
                        ports_port_drop(pt, tmp[i], false);
                ports_unlisten(pt, tl);
        }
        for (int i = 0; i < 40; i++) {
                snprintf(name, sizeof(name), "n%02d", (i * 13) % 40);
                cr_assert_eq(ports_listen(pt, &OWNER, name, 0666, NULL, &l[i]), 0);
        }
        bool out_of_order = false;
        uint64_t last = 0;
        for (int i = 0; i < 40; i++) {
                struct shmz_msg_port_peer c;
                struct shmz_msg_segment_info si;
                int fd;

                snprintf(name, sizeof(name), "n%02d", i % 40);
                p[i] = connect_ok(&OTHER, name);
                ports_port_peer(pt, p[i], 0, &c);
                for (int j = 0; j < i % 4; j++) {
                        cr_assert_eq(ports_segment_create(pt, c.port_id, c.token, 0, &si, &fd), 0);
                        out_of_order |= si.id < last;
                        last = si.id;
                        close(fd);
                }
        }
        cr_assert(out_of_order, "segment ids follow creation order: the test tests nothing");

        cr_assert_eq(ports_list_listeners(pt, &all, &n_all), 0);
        k = 0;
        for (char after[SHMZ_NAME_BUF] = "";;) {
                cr_assert_eq(ports_list_listeners_page(pt, after, page, 7, &n), 0);
                for (size_t i = 0; i < n; i++)
                        cr_assert_str_eq(page[i].name, all[k++].name);
                if (n < 7)
                        break;
                strncpy_buf(after, sizeof(after), page[n - 1].name);
        }
        cr_assert_eq(k, n_all);
        free(all);

        cr_assert_eq(ports_list_ports(pt, &all, &n_all), 0);
        k = 0;
        for (uint64_t after = 0;;) {
                cr_assert_eq(ports_list_ports_page(pt, after, page, 7, &n), 0);
                for (size_t i = 0; i < n; i++)
                        cr_assert_eq(page[i].port_id, all[k++].port_id);
                if (n < 7)
                        break;
                after = page[n - 1].port_id;
        }
        cr_assert_eq(k, n_all);
        free(all);

        cr_assert_eq(ports_list_segments(pt, &sall, &n_all), 0);
        cr_assert_gt(n_all, 14u);
        k = 0;
        for (uint64_t after = 0;;) {
                cr_assert_eq(ports_list_segments_page(pt, after, spage, 7, &n), 0);
                for (size_t i = 0; i < n; i++) {
                        cr_assert_eq(spage[i].id, sall[k].id);
                        cr_assert_eq(spage[i].port_id, sall[k].port_id);
                        k++;
                }
                if (n < 7)
                        break;
                after = spage[n - 1].id;
        }
        cr_assert_eq(k, n_all);
        free(sall);

        for (int i = 0; i < 40; i++)
                ports_port_drop(pt, p[i], false);
        for (int i = 0; i < 40; i++)
                ports_unlisten(pt, l[i]);
}

/* The view's single-record lookups: by inode, and a port only under the listener that brokered it. */
Test(ports, lookups_by_inode_and_by_listener) {
        struct shmz_msg_port_info li, pi;
        struct shmz_msg_port_peer c;
        struct listener *l, *l2;
        struct port *p, *p2;
        uint64_t ino, ino2;

        cr_assert_eq(ports_listen(pt, &OWNER, "svc", 0666, NULL, &l), 0);
        cr_assert_eq(ports_listener_info(pt, "svc", NULL, &ino), 0);
        cr_assert_eq(ports_listener_info_by_ino(pt, ino, &li), 0);
        cr_assert_str_eq(li.name, "svc");
        cr_assert_eq(ports_listener_info_by_ino(pt, ino + 1, &li), -ENOENT);
        cr_assert_eq(ports_listener_info_by_ino(pt, 5, &li), -ENOENT);

        p = connect_ok(&OTHER, "svc");
        ports_port_peer(pt, p, 0, &c);
        cr_assert_eq(ports_connection_info(pt, "svc", c.port_id, &pi), 0);
        cr_assert_eq(pi.port_id, c.port_id);
        cr_assert_eq(ports_connection_info(pt, "nope", c.port_id, &pi), -ENOENT);
        cr_assert_eq(ports_connection_info(pt, "svc", c.port_id + 1000, &pi), -ENOENT);

        /* The name published again: a new inode, and the old listener's port is not the new one's. */
        ports_unlisten(pt, l);
        cr_assert_eq(ports_listener_info_by_ino(pt, ino, &li), -ENOENT);
        cr_assert_eq(ports_listen(pt, &OWNER, "svc", 0666, NULL, &l2), 0);
        cr_assert_eq(ports_listener_info(pt, "svc", NULL, &ino2), 0);
        cr_assert_neq(ino2, ino);
        cr_assert_eq(ports_listener_info_by_ino(pt, ino2, &li), 0);
        cr_assert_eq(ports_connection_info(pt, "svc", c.port_id, &pi), -ENOENT);
        cr_assert_eq(ports_port_info(pt, c.port_id, &pi), 0); /* it lives on, under no listener */
        p2 = connect_ok(&OTHER, "svc");
        ports_port_peer(pt, p2, 0, &c);
        cr_assert_eq(ports_connection_info(pt, "svc", c.port_id, &pi), 0);

        ports_port_drop(pt, p, false);
        ports_port_drop(pt, p2, false);
        ports_unlisten(pt, l2);
}

struct seen {
        int added, removed;
};

static void observe(void *userdata, enum ports_event ev, const char *name, uint64_t ino) {
        struct seen *s = userdata;

        if (ev == PORTS_SEGMENT_ADDED || ev == PORTS_PORT_ADDED || ev == PORTS_LISTENER_ADDED)
                s->added++;
        else
                s->removed++;
        cr_assert_geq(ino, PORTS_INO_LISTENER_BASE);
        cr_assert_lt(ino, PORTS_INO_END);
        cr_assert(name[0]);
        /* Called outside the lock: calling back in works. */
        struct ports_stats st;
        ports_get_stats(pt, &st);
}

Test(ports, observer) {
        struct seen seen = {};
        struct shmz_msg_port_peer c;
        struct shmz_msg_segment_info si;
        struct listener *l;
        struct port *p;
        int fd;

        ports_set_observer(pt, observe, &seen);
        cr_assert_eq(ports_listen(pt, &OWNER, "svc", 0666, NULL, &l), 0);
        p = connect_ok(&OTHER, "svc");
        ports_port_peer(pt, p, 0, &c);
        cr_assert_eq(ports_segment_create(pt, c.port_id, c.token, 0, &si, &fd), 0);
        close(fd);
        cr_assert_eq(seen.added, 3);
        ports_port_drop(pt, p, false);
        ports_unlisten(pt, l);
        cr_assert_eq(seen.removed, 3);
}

/* Readers look segments up by id while another thread creates and drops them. */
static atomic_bool stop_readers;
static uint64_t last_id;

static void *reader(void *arg) {
        unsigned long found = 0;

        while (!atomic_load(&stop_readers)) {
                uint64_t id = __atomic_load_n(&last_id, __ATOMIC_ACQUIRE);
                struct shmz_msg_segment_info si;
                struct segment *s;

                if (ports_segment_info(pt, id, &si) == 0) {
                        cr_assert_eq(si.id, id);
                        found++;
                }
                if (ports_segment_ref(pt, id, &s) == 0) {
                        const void *m;
                        size_t size;

                        cr_assert_eq(segment_view_map(s, &m, &size), 0);
                        cr_assert_eq(((const struct shmz_segment_header *) m)->id, id);
                        ports_segment_unref(pt, s);
                }
        }
        return (void *) found;
}

static int count_fds(void) {
        int n = 0;

        for (int fd = 0; fd < 4096; fd++)
                if (fcntl(fd, F_GETFD) >= 0)
                        n++;
        return n;
}

Test(ports, lockfree_lookup_under_churn) {
        pthread_t t[2];
        struct listener *l;
        int fds_before = count_fds();

        cr_assert_eq(ports_listen(pt, &OWNER, "svc", 0666, NULL, &l), 0);
        for (int i = 0; i < 2; i++)
                cr_assert_eq(pthread_create(&t[i], NULL, reader, NULL), 0);
        for (int i = 0; i < 2000; i++) {
                struct shmz_msg_port_peer c;
                struct shmz_msg_segment_info si;
                struct port *p = connect_ok(&OTHER, "svc");
                int fd;

                ports_port_peer(pt, p, 0, &c);
                cr_assert_eq(ports_segment_create(pt, c.port_id, c.token, 0, &si, &fd), 0);
                close(fd);
                __atomic_store_n(&last_id, si.id, __ATOMIC_RELEASE);
                ports_port_drop(pt, p, false);
        }
        atomic_store(&stop_readers, true);
        for (int i = 0; i < 2; i++)
                pthread_join(t[i], NULL);
        ports_unlisten(pt, l);
        struct ports_stats st;
        ports_get_stats(pt, &st);
        cr_assert_eq(st.segments, 0u);
        cr_assert_eq(st.ports, 0u);
        /* Every segment's memfd and every channel went with its port. */
        cr_assert_eq(count_fds(), fds_before);
}
