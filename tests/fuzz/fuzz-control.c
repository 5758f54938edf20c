/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The control protocol as a client sees it: each input is one connection's
 * worth of packets, read by the real decoder (proto_recv() on a socket) and
 * handed to the real dispatcher, which works on a real registry and answers
 * on a real socket. The worker's read loop is mirrored here, not run: it lives
 * on a thread of its own, and a fuzzer wants one input done when the call
 * returns.
 *
 * Input: one byte of flags, then frames, each a little-endian u16 and that
 * many bytes (fewer at the end of the input):
 *   bits 0-10   length of the packet (up to 2047: more than SHMZ_MSG_MAX fits)
 *   bit 15      the packet carries an fd (SCM_RIGHTS), which no request may
 * Every packet goes through a SOCK_SEQPACKET pair as one message. The flags
 * (FLAG_*) can put a valid HELLO first, pick the caller, fix up the header's
 * size; ZONE_OPEN_TICKET requests can get real tickets (pick_ticket()).
 *
 * Besides the sanitizers, the replies are checked: framing, one reply per
 * request (a run for the listings; none for the one-way ZONE_CLOSE and
 * PORT_ACCEPTED when accepted) echoing its type and stream, bodies of the size
 * the protocol says, an fd exactly on successful opens and segments. And no
 * fd outlives the input. The port table is real too; with one connection, a
 * listener cannot be connected to (its connection takes nothing else).
 */
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <systemd/sd-event.h>
#include <time.h>
#include <unistd.h>

#include "clients.h"
#include "daemon.h"
#include "fuzz-util.h"
#include "log.h"
#include "ports.h"
#include "proto.h"
#include "registry.h"
#include "shmzone.h"
#include "wire.h"
#include "worker.h"

#define FLAG_HELLO 0x1u    /* a valid HELLO goes first: deeper paths without the fuzzer finding it */
#define FLAG_ROOT 0x2u     /* the caller is root, else an ordinary uid with supplementary groups */
#define FLAG_FIX_SIZE 0x4u /* the header's size field is set to the packet's length */

#define FRAME_LEN_MASK 0x7ffu
#define FRAME_FD 0x8000u
/* Packets per input: far above what any seed needs, and it bounds the zones a LIST may list. */
#define MAX_FRAMES 64u
#define MAX_OPENED 8u

static sd_event *event;
static bool verbose; /* $SHMZ_FUZZ_VERBOSE: every reply on stderr, for writing seeds */
static struct clients *clients;
static const gid_t user_groups[] = { 1000, 100, 4242 };

/* Never called: the loop is not run. The source exists so that conn_update_events() has a real one to change. */
static int on_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        return 0;
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv) {
        /* Thousands of inputs a second: the daemon's debug lines would be all the fuzzer does. */
        log_max_level = LOG_EMERG - 1;
        verbose = getenv("SHMZ_FUZZ_VERBOSE");
        if (sd_event_new(&event) < 0 || clients_new(&clients) < 0)
                abort();
        clients_set_limits(clients, 64, 16, 10 * 1000000ull);
        return 0;
}

/* Sends one packet as a client would; an fd goes along if asked (the peer must refuse it). */
static int send_packet(int fd, const void *buf, size_t len, bool with_fd) {
        struct iovec iov = { .iov_base = (void *) buf, .iov_len = len };

        return wire_send(fd, &iov, 1, &fd, with_fd ? 1 : 0, MSG_DONTWAIT);
}

/* The sockets of one input: the connection's client end, and the pair that carries requests to the decoder. */
struct link {
        int client;
        int wire_in, wire_out;
        struct registry *registry;
        /* Zones opened so far (inode numbers, and whether writable), for tickets. */
        struct {
                uint64_t ino;
                bool writable;
        } opened[MAX_OPENED];
        unsigned n_opened;
};

/*
 * A 128-bit random ticket is nothing a fuzzer guesses. A ZONE_OPEN_TICKET
 * request whose first word is 0 gets a ticket put in, issued the moment
 * before for the zone its second word picks among those opened so far, with
 * the access that open had: as the FUSE view issues one for each open file.
 * Issued only when asked for: an unredeemed ticket keeps its zone alive.
 */
static void pick_ticket(struct link *l, uint8_t *pkt, size_t len) {
        struct shmz_msg_header h;
        struct shmz_msg_zone_ticket m;
        struct zone *z;
        unsigned k;
        int r;

        if (l->n_opened == 0 || len != sizeof(h) + sizeof(m))
                return;
        memcpy(&h, pkt, sizeof(h));
        memcpy(&m, pkt + sizeof(h), sizeof(m));
        if (h.type != SHMZ_MSG_ZONE_OPEN_TICKET || m.ticket[0] != 0)
                return;
        k = (unsigned) (m.ticket[1] % l->n_opened);
        if (registry_ref_by_ino(l->registry, l->opened[k].ino, &z) < 0)
                return; /* gone (unlinked and closed): the request keeps its made-up ticket */
        r = registry_ticket_issue(l->registry, z, l->opened[k].writable, m.ticket);
        registry_unref(l->registry, z);
        if (r >= 0)
                memcpy(pkt + sizeof(h), &m, sizeof(m));
}

static bool is_listing(uint16_t type) {
        return type == SHMZ_MSG_ZONE_LIST || type == SHMZ_MSG_PORT_LIST || type == SHMZ_MSG_SEGMENT_LIST;
}

/* Reads every reply the dispatcher sent for the request h and checks it against the protocol. */
static void drain_replies(struct link *l, const struct shmz_msg_header *req) {
        bool last = false;
        unsigned n = 0;

        for (;;) {
                uint8_t buf[SHMZ_MSG_MAX];
                int fds[PROTO_MAX_FDS];
                struct shmz_msg_header h;
                size_t size, n_fds, body;
                ssize_t want;
                int r;

                r = proto_recv(l->client, buf, sizeof(buf), &size, fds, &n_fds);
                if (r == -EAGAIN)
                        break;
                fuzz_assert(r >= 0, "reply to type %u: %s", req->type, strerror(-r));
                memcpy(&h, buf, sizeof(h));
                body = size - sizeof(h);
                n++;
                if (verbose)
                        fprintf(stderr, "reply type %u stream %u flags %#x status %d (%s), %zu bytes, %zu fds\n",
                                h.type, h.stream, h.flags, h.status, strerror(-h.status), body, n_fds);
                fuzz_assert(h.flags & SHMZ_MSG_F_REPLY, "type %u: reply without the reply flag", h.type);
                fuzz_assert(h.type == req->type && h.stream == req->stream, "reply %u/%u to request %u/%u", h.type,
                            h.stream, req->type, req->stream);
                fuzz_assert(!last, "type %u: a reply after the last one of its run", h.type);
                fuzz_assert(is_listing(h.type) || (n == 1 && !(h.flags & SHMZ_MSG_F_LAST)),
                            "type %u: reply %u, flags %#x", h.type, n, h.flags);
                fuzz_assert(h.status <= 0, "type %u: status %d", h.type, h.status);
                last = h.flags & SHMZ_MSG_F_LAST;
                if (h.status < 0) {
                        fuzz_assert(body == 0 && n_fds == 0, "type %u: error %d with %zu bytes and %zu fds", h.type,
                                    h.status, body, n_fds);
                } else if (is_listing(h.type) && last) {
                        fuzz_assert(body == 0 && n_fds == 0, "end of listing with %zu bytes", body);
                } else {
                        bool opens = h.type == SHMZ_MSG_ZONE_OPEN || h.type == SHMZ_MSG_ZONE_OPEN_TICKET;

                        want = proto_body_size(h.type, true);
                        fuzz_assert(want >= 0 && (size_t) want == body, "type %u: reply of %zu bytes, want %zd", h.type,
                                    body, want);
                        unsigned want_fds = opens || h.type == SHMZ_MSG_SEGMENT_CREATE ? 1u
                                            : h.type == SHMZ_MSG_PORT_CONNECT          ? 2u
                                                                                       : 0u;

                        fuzz_assert(n_fds == want_fds, "type %u: %zu fds", h.type, n_fds);
                        if (opens) {
                                struct shmz_msg_zone_info info;
                                struct stat st;

                                /* The fd passed is the zone the reply describes. */
                                memcpy(&info, proto_body(buf), sizeof(info));
                                fuzz_assert(fstat(fds[0], &st) >= 0 && (uint64_t) st.st_size == info.map_size,
                                            "zone '%.*s': fd of %lld bytes, info says %llu", (int) SHMZ_NAME_MAX,
                                            info.name, (long long) st.st_size, (unsigned long long) info.map_size);
                                if (l->n_opened < MAX_OPENED)
                                        l->opened[l->n_opened++] = (typeof(l->opened[0])){
                                                .ino = info.ino, .writable = !(info.flags & SHMZ_ZONE_INFO_RDONLY)
                                        };
                        }
                }
                for (size_t i = 0; i < n_fds; i++)
                        safe_close(fds[i]);
        }
        /* ZONE_CLOSE and PORT_ACCEPTED are one-way; everything else gets its answer now (the socket never fills). */
        if ((req->type == SHMZ_MSG_ZONE_CLOSE || req->type == SHMZ_MSG_PORT_ACCEPTED) &&
            !(req->flags & SHMZ_MSG_F_REPLY))
                fuzz_assert(n <= 1, "%u replies to a one-way type %u", n, req->type);
        else
                fuzz_assert(n >= 1, "request type %u: no reply", req->type);
        fuzz_assert(!is_listing(req->type) || n == 1 || last, "listing of %u replies never ended", n);
}

/* One request through the real decoder into the dispatcher, as the worker's read loop does: < 0 ends the connection. */
static int one_request(struct conn *c, struct link *l, const void *pkt, size_t len, bool with_fd) {
        uint8_t buf[SHMZ_MSG_MAX], *msg;
        int fds[PROTO_MAX_FDS];
        struct shmz_msg_header h;
        size_t size, n_fds;
        int r;

        r = send_packet(l->wire_in, pkt, len, with_fd);
        if (r < 0)
                return 0; /* the kernel refused it: nothing reaches the daemon */
        r = proto_recv(l->wire_out, buf, sizeof(buf), &size, fds, &n_fds);
        /* The worker hands these to the reaper; here nobody can make close() block. */
        for (size_t i = 0; i < n_fds; i++)
                safe_close(fds[i]);
        if (r >= 0 && n_fds > 0)
                r = -EBADMSG;
        if (verbose)
                fprintf(stderr, "packet of %zu bytes%s: %s\n", len, with_fd ? " with an fd" : "",
                        r < 0 ? strerror(-r) : "dispatched");
        if (r < 0) {
                /* -ECONNRESET is a client hanging up; the rest are counted as errors before the worker drops it. */
                fuzz_assert(r != -EAGAIN, "a packet sent was not there to receive");
                if (r != -ECONNRESET)
                        atomic_fetch_add(&c->daemon->errors, 1);
                return r;
        }
        fuzz_assert(size >= sizeof(h) && size <= SHMZ_MSG_MAX, "proto_recv() passed %zu bytes", size);

        /* Exactly the message, on the heap: a read past its end is caught, not served from a stale buffer. */
        msg = malloc(size);
        if (!msg)
                abort();
        memcpy(msg, buf, size);
        memcpy(&h, msg, sizeof(h));
        atomic_fetch_add(&c->daemon->requests, 1);
        r = control_dispatch(c, msg, size);
        free(msg);

        /* The harness reads every reply at once; a queue here means a request produced more than a socket holds. */
        fuzz_assert(!c->out_head, "request type %u left replies queued", h.type);
        drain_replies(l, &h);
        return r;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct cursor in = { .p = data, .n = size };
        struct registry_limits lim = {
                .budget = 1u << 20,
                .quota = 512u << 10,
                .max_zones = 8,
        };
        struct daemon d = {};
        struct conn c = {};
        int conn_fds[2] = { -EBADF, -EBADF }, wire[2] = { -EBADF, -EBADF }, fds_before, sndbuf = 1 << 20;
        sd_event_source *src = NULL;
        struct link l;
        uint8_t flags;

        if (size == 0)
                return 0;
        fds_before = count_fds();
        flags = take_u8(&in);

        if (registry_new(&lim, &d.registry) < 0)
                abort();
        {
                struct ports_limits plim = {
                        .chunk_size = 4096,
                        .segment_chunks = 4,
                        .port_memory = 32768,
                        .max_ports_per_uid = 4,
                        .backlog = 2,
                        .uid_connections = 2,
                        .segment_memory = 1 << 20,
                        .uid_segment_memory = 1 << 18,
                };

                if (ports_new(&plim, &d.ports) < 0)
                        abort();
        }
        d.clients = clients;
        d.start_usec = now_usec(CLOCK_MONOTONIC);

        /* conn_fds[0] is the daemon's end of the connection, conn_fds[1] the client's; wire carries requests. */
        if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, conn_fds) < 0 ||
            socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, wire) < 0)
                abort();
        /* Room for the longest run of replies one request makes (a listing of every zone), so nothing queues. */
        (void) setsockopt(conn_fds[0], SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
        if (sd_event_add_io(event, &src, conn_fds[0], EPOLLIN, on_io, &c) < 0)
                abort();
        l = (struct link){ .client = conn_fds[1], .wire_in = wire[0], .wire_out = wire[1], .registry = d.registry };

        c.daemon = &d;
        c.fd = conn_fds[0];
        c.source = src;
        c.next_handle = 1;
        if (flags & FLAG_ROOT)
                c.caller = (struct caller){ .uid = 0, .gid = 0, .pid = getpid() };
        else
                c.caller = (struct caller){ .uid = 1000,
                                            .gid = 1000,
                                            .pid = getpid(),
                                            .groups = user_groups,
                                            .n_groups = ELEMENTSOF(user_groups) };
        c.counted_uid = c.caller.uid;

        if (flags & FLAG_HELLO) {
                struct {
                        struct shmz_msg_header h;
                        struct shmz_msg_hello m;
                } hello = {
                        .h = { .size = sizeof(hello), .type = SHMZ_MSG_HELLO, .stream = 1 },
                        .m = { .version_min = SHMZ_PROTO_VERSION, .version_max = SHMZ_PROTO_VERSION },
                };

                if (one_request(&c, &l, &hello, sizeof(hello), false) < 0)
                        fuzz_fail("a valid HELLO was refused");
        }

        for (unsigned i = 0; i < MAX_FRAMES && in.n >= 2; i++) {
                uint8_t pkt[FRAME_LEN_MASK + 1];
                uint16_t v = take_u16(&in);
                size_t len = take_bytes(&in, pkt, v & FRAME_LEN_MASK);

                if ((flags & FLAG_FIX_SIZE) && len >= sizeof(uint32_t)) {
                        uint32_t s = (uint32_t) len;
                        memcpy(pkt, &s, sizeof(s));
                }
                pick_ticket(&l, pkt, len);
                if (one_request(&c, &l, pkt, len, v & FRAME_FD) < 0)
                        break;
        }

        /* What conn_free() does with a connection, less the worker's own bookkeeping. */
        port_conn_closed(&c);
        control_release(&c);
        fuzz_assert(!c.attachments && c.n_attachments == 0, "attachments left after release");
        sd_event_source_disable_unref(src);
        safe_close(conn_fds[0]);
        safe_close(conn_fds[1]);
        safe_close(wire[0]);
        safe_close(wire[1]);
        /* Watches of ports this loop made (none can be: see above), then the table. */
        port_worker_stop(NULL);
        ports_free(d.ports);
        registry_free(d.registry);

        fuzz_assert(count_fds() == fds_before, "%d fds before the input, %d after", fds_before, count_fds());
        return 0;
}
