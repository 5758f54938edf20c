/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Many threads at once on the public API, against a real shmzoned it starts
 * on a private socket: senders (copying and zero-copy, under backpressure)
 * and receivers of one port with releasing threads; RPC callers with short
 * deadlines beside a dispatcher and a plain receiver; closes under threads
 * asleep in every kind of call; a zone's allocator and lock from threads of
 * two processes. Each phase checks what it did (nothing lost, duplicated or
 * corrupted; every deadline kept; exclusion held) and prints one line,
 * "stress <phase>: ok (...)" or "stress <phase>: FAILED (...)". Built with
 * -fsanitize=thread as well (scripts/tsan.sh), where the sanitizer's reports
 * fail the run too.
 *
 *   stress-ports [SECONDS]   (default 10; the phases share them)
 *   $SHMZONED                the daemon to start (default: shmzoned on PATH)
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <shmzone.h>

#define MS UINT64_C(1000000)

static char dir[] = "/tmp/shmz-stress.XXXXXX";
static char sock_path[128];
static pid_t daemon_pid;
static double seconds = 10;
static int failures;

static uint64_t mono_ns(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000000u + (uint64_t) ts.tv_nsec;
}

/* A phase's verdict: the first failure's words, and how many. */
struct verdict {
        pthread_mutex_t lock;
        int failed;
        char first[256];
};

#define FAIL(v, ...)                                                                                                   \
        do {                                                                                                           \
                pthread_mutex_lock(&(v)->lock);                                                                        \
                if ((v)->failed++ == 0)                                                                                \
                        snprintf((v)->first, sizeof((v)->first), __VA_ARGS__);                                         \
                pthread_mutex_unlock(&(v)->lock);                                                                      \
        } while (0)

static void report(const char *phase, struct verdict *v, const char *figures) {
        if (v->failed) {
                printf("stress %s: FAILED (%d failures; first: %s)\n", phase, v->failed, v->first);
                failures++;
        } else
                printf("stress %s: ok (%s)\n", phase, figures);
        fflush(stdout);
}

static uint64_t phase_ns(double share) {
        return (uint64_t) (seconds * share * 1e9);
}

/* Deterministic payload bytes of message (sender, seq). */
static uint8_t pattern(uint32_t sender, uint32_t seq, size_t i) {
        return (uint8_t) (sender * 131 + seq * 31 + i * 7 + (i >> 8));
}

/* ---- the daemon ---------------------------------------------------------------------------- */

static int daemon_start(void) {
        const char *bin = getenv("SHMZONED") ?: "shmzoned";
        char config[128];
        FILE *f;

        if (!mkdtemp(dir))
                return -errno;
        snprintf(sock_path, sizeof(sock_path), "%s/sock", dir);
        snprintf(config, sizeof(config), "%s/shmzone.conf", dir);
        f = fopen(config, "we");
        if (!f)
                return -errno;
        /* Small chunks and little memory per port: senders run out of it, and wait. */
        fputs("[daemon]\nchunk_size = 4K\nsegment_chunks = 64\nport_memory = 1M\n", f);
        fclose(f);
        daemon_pid = fork();
        if (daemon_pid < 0)
                return -errno;
        if (daemon_pid == 0) {
                char log[160];
                int fd;

                /* Its log stays out of our report; it goes with the directory. */
                snprintf(log, sizeof(log), "%s/log", dir);
                fd = open(log, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
                if (fd >= 0)
                        (void) dup2(fd, STDERR_FILENO);
                execlp(bin, bin, "--config", config, "--socket", sock_path, "--no-mount", (char *) NULL);
                fprintf(stderr, "stress: cannot run %s: %m\n", bin);
                _exit(127);
        }
        for (int i = 0; i < 2000; i++) {
                struct shmz_client *c;

                if (shmz_connect(sock_path, &c) == 0) {
                        shmz_disconnect(c);
                        return 0;
                }
                if (waitpid(daemon_pid, NULL, WNOHANG) == daemon_pid)
                        return -ECHILD;
                usleep(10000);
        }
        return -ETIMEDOUT;
}

static void daemon_stop(void) {
        char cmd[160];

        if (daemon_pid > 0) {
                kill(daemon_pid, SIGTERM);
                (void) waitpid(daemon_pid, NULL, 0);
        }
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
        (void) system(cmd);
}

/* A port to ourselves through the daemon: *a the connector's end, *b the acceptor's. */
static int port_pair(struct shmz_client *c, const char *name, struct shmz_port **a, struct shmz_port **b) {
        struct shmz_listener *l;
        int r;

        r = shmz_port_listen(c, name, 0600, &l);
        if (r < 0)
                return r;
        r = shmz_port_connect(c, name, a);
        if (r >= 0) {
                r = shmz_port_accept(l, 5000 * MS, b);
                if (r < 0)
                        shmz_port_close(*a);
        }
        shmz_listener_close(l);
        return r;
}

/* ---- traffic: senders, receivers, releasers on one port ------------------------------------------ */

#define SENDERS 6
#define RECEIVERS 4
#define RELEASERS 2
#define SEQ_MAX (1u << 20)

struct hdr {
        uint32_t sender, seq, size, check;
};

struct traffic {
        struct shmz_port *tx, *rx;
        struct verdict v;
        atomic_bool stop_send, stop_recv;
        atomic_uint_fast64_t sent[SENDERS], got[SENDERS], eagain;
        _Atomic uint8_t *seen[SENDERS];
        /* Messages handed to the releasers (under lock): a receiver that keeps chunks a while. */
        pthread_mutex_t qlock;
        struct shmz_msg q[256];
        unsigned qn;
};

static const size_t copy_sizes[] = { 16, 200, 3000, 4096, 9000, 70000, 200000 };

struct sender_arg {
        struct traffic *t;
        uint32_t id;
};

static void *traffic_send(void *arg) {
        struct sender_arg *sa = arg;
        struct traffic *t = sa->t;
        bool zero_copy = sa->id >= SENDERS / 2;
        uint8_t *scratch = malloc(256 * 1024);

        for (uint32_t seq = 0; seq < SEQ_MAX && !atomic_load(&t->stop_send); seq++) {
                size_t size = zero_copy ? 5000 + (seq * 7919) % 60000 : copy_sizes[seq % 7];
                struct shmz_msg m = { .type = sa->id, .fd = -1, .size = size };
                struct hdr h = { .sender = sa->id, .seq = seq, .size = (uint32_t) size };
                uint8_t *data;
                int r;

                if (zero_copy) {
                        data = shmz_port_buf_wait(t->tx, size, 1000 * MS);
                        if (!data) {
                                if (errno == ETIMEDOUT) {
                                        atomic_fetch_add(&t->eagain, 1);
                                        seq--;
                                        continue;
                                }
                                FAIL(&t->v, "sender %u: shmz_port_buf_wait: %s", sa->id, strerror(errno));
                                break;
                        }
                } else
                        data = scratch;
                for (size_t i = sizeof(h); i < size; i++)
                        data[i] = pattern(sa->id, seq, i);
                h.check = size > sizeof(h) ? data[size - 1] : 0;
                memcpy(data, &h, sizeof(h));
                m.data = data;
                /* Copying senders mostly do not wait: -EAGAIN is their backpressure, and they retry. */
                for (;;) {
                        r = shmz_port_send(t->tx, &m, zero_copy || seq % 4 == 0 ? 1000 * MS : 0);
                        if (r != -EAGAIN && r != -ETIMEDOUT)
                                break;
                        atomic_fetch_add(&t->eagain, 1);
                        if (atomic_load(&t->stop_send))
                                break;
                }
                if (r < 0) {
                        if (zero_copy)
                                shmz_port_buf_free(t->tx, data);
                        if (r != -EAGAIN && r != -ETIMEDOUT)
                                FAIL(&t->v, "sender %u: shmz_port_send: %s", sa->id, strerror(-r));
                        break;
                }
                atomic_fetch_add(&t->sent[sa->id], 1);
        }
        free(scratch);
        return NULL;
}

static void traffic_check(struct traffic *t, struct shmz_msg *m) {
        struct hdr h;

        if (m->size < sizeof(h)) {
                FAIL(&t->v, "a message of %zu bytes", m->size);
                return;
        }
        memcpy(&h, m->data, sizeof(h));
        if (h.sender >= SENDERS || h.seq >= SEQ_MAX || h.size != m->size || m->type != h.sender) {
                FAIL(&t->v, "a message with a bad header (sender %u seq %u size %u/%zu)", h.sender, h.seq, h.size,
                     m->size);
                return;
        }
        for (size_t i = sizeof(h); i < m->size; i++)
                if (((const uint8_t *) m->data)[i] != pattern(h.sender, h.seq, i)) {
                        FAIL(&t->v, "sender %u seq %u: byte %zu corrupted", h.sender, h.seq, i);
                        return;
                }
        if (atomic_exchange(&t->seen[h.sender][h.seq], 1))
                FAIL(&t->v, "sender %u seq %u received twice", h.sender, h.seq);
        atomic_fetch_add(&t->got[h.sender], 1);
}

static void *traffic_recv(void *arg) {
        struct traffic *t = arg;

        while (!atomic_load(&t->stop_recv)) {
                struct shmz_msg m;
                int r = shmz_port_recv(t->rx, &m, 20 * MS);

                if (r == -ETIMEDOUT || r == -EAGAIN)
                        continue;
                if (r < 0) {
                        FAIL(&t->v, "shmz_port_recv: %s", strerror(-r));
                        break;
                }
                traffic_check(t, &m);
                /* Every fourth message is kept a while, and released by another thread. */
                pthread_mutex_lock(&t->qlock);
                if (m.size > 4096 && t->qn < 256 && (m.size & 3) == 0) {
                        t->q[t->qn++] = m;
                        m.handle = 0;
                }
                pthread_mutex_unlock(&t->qlock);
                shmz_msg_release(t->rx, &m);
        }
        return NULL;
}

static void *traffic_release(void *arg) {
        struct traffic *t = arg;

        for (;;) {
                struct shmz_msg m = { .handle = 0 };
                bool stop = atomic_load(&t->stop_recv);

                pthread_mutex_lock(&t->qlock);
                if (t->qn > 0)
                        m = t->q[--t->qn];
                pthread_mutex_unlock(&t->qlock);
                if (m.handle)
                        shmz_msg_release(t->rx, &m);
                else if (stop)
                        return NULL;
                else
                        usleep(200);
        }
}

static void phase_traffic(struct shmz_client *c) {
        struct traffic *t = calloc(1, sizeof(*t));
        pthread_t ts[SENDERS], tr[RECEIVERS], tl[RELEASERS];
        struct sender_arg sa[SENDERS];
        uint64_t sent = 0, got = 0, end;
        char figures[160];
        int r;

        pthread_mutex_init(&t->v.lock, NULL);
        pthread_mutex_init(&t->qlock, NULL);
        r = port_pair(c, "stress-traffic", &t->tx, &t->rx);
        if (r < 0) {
                FAIL(&t->v, "no port: %s", strerror(-r));
                report("traffic", &t->v, "");
                return;
        }
        for (int i = 0; i < SENDERS; i++)
                t->seen[i] = calloc(SEQ_MAX, 1);
        for (int i = 0; i < RECEIVERS; i++)
                pthread_create(&tr[i], NULL, traffic_recv, t);
        for (int i = 0; i < RELEASERS; i++)
                pthread_create(&tl[i], NULL, traffic_release, t);
        for (int i = 0; i < SENDERS; i++) {
                sa[i] = (struct sender_arg){ .t = t, .id = (uint32_t) i };
                pthread_create(&ts[i], NULL, traffic_send, &sa[i]);
        }
        usleep((useconds_t) (phase_ns(0.3) / 1000));
        atomic_store(&t->stop_send, true);
        for (int i = 0; i < SENDERS; i++)
                pthread_join(ts[i], NULL);
        for (int i = 0; i < SENDERS; i++)
                sent += atomic_load(&t->sent[i]);
        /* Whatever was sent arrives. */
        end = mono_ns() + 10000 * MS;
        for (;;) {
                got = 0;
                for (int i = 0; i < SENDERS; i++)
                        got += atomic_load(&t->got[i]);
                if (got >= sent || mono_ns() > end)
                        break;
                usleep(1000);
        }
        atomic_store(&t->stop_recv, true);
        for (int i = 0; i < RECEIVERS; i++)
                pthread_join(tr[i], NULL);
        for (int i = 0; i < RELEASERS; i++)
                pthread_join(tl[i], NULL);
        for (int i = 0; i < SENDERS; i++)
                if (atomic_load(&t->got[i]) != atomic_load(&t->sent[i]))
                        FAIL(&t->v, "sender %d: %" PRIu64 " sent, %" PRIu64 " received", i,
                             (uint64_t) atomic_load(&t->sent[i]), (uint64_t) atomic_load(&t->got[i]));
        snprintf(figures, sizeof(figures), "%" PRIu64 " messages from %d senders, %" PRIu64 " waits for memory", sent,
                 SENDERS, (uint64_t) atomic_load(&t->eagain));
        report("traffic", &t->v, figures);
        shmz_port_close(t->tx);
        shmz_port_close(t->rx);
        for (int i = 0; i < SENDERS; i++)
                free(t->seen[i]);
        free(t);
}

/* ---- RPC: callers with short deadlines, one dispatcher, one plain receiver ------------------------- */

#define CALLERS 8
#define CALLS_MAX (1u << 18)
#define LATE_NS (2000 * MS) /* a handler called this long after its deadline is late */
#define DISPATCH_NS (50 * MS)

enum { CALL_NONE, CALL_PENDING, CALL_REPLIED, CALL_TIMED_OUT };

struct rpc {
        struct shmz_port *cp, *sp; /* the callers' end, the server's */
        struct verdict v;
        atomic_bool stop, stop_recv, stop_server;
        _Atomic uint8_t *state[CALLERS];
        atomic_uint_fast64_t calls, replied, timed_out, late_replies, plain, dispatches;
        _Atomic uint64_t worst_dispatch_ns, worst_late_ns;
};

struct call_ctx {
        struct rpc *rpc;
        uint32_t caller, seq;
        uint64_t deadline;
        atomic_bool ended;
};

static void max_store(_Atomic uint64_t *m, uint64_t v) {
        uint64_t old = atomic_load(m);

        while (v > old && !atomic_compare_exchange_weak(m, &old, v))
                ;
}

static void on_call_end(struct shmz_port *p, int error, struct shmz_msg *reply, void *userdata) {
        struct call_ctx *cc = userdata;
        struct rpc *rpc = cc->rpc;
        uint64_t now = mono_ns();
        uint8_t final, old;

        if (error == 0) {
                uint32_t id[2] = { UINT32_MAX, UINT32_MAX };
                bool last = reply->flags & SHMZ_MSG_LAST;

                if (reply->size == sizeof(id))
                        memcpy(id, reply->data, sizeof(id));
                if (id[0] != cc->caller || id[1] != cc->seq)
                        FAIL(&rpc->v, "caller %u call %u: a reply for %u/%u", cc->caller, cc->seq, id[0], id[1]);
                shmz_msg_release(p, reply);
                if (!last)
                        return; /* more to come */
                final = CALL_REPLIED;
                atomic_fetch_add(&rpc->replied, 1);
        } else if (error == -ETIMEDOUT) {
                if (now > cc->deadline)
                        max_store(&rpc->worst_late_ns, now - cc->deadline);
                if (now > cc->deadline + LATE_NS)
                        FAIL(&rpc->v, "caller %u call %u: timed out %" PRIu64 " ms after its deadline", cc->caller,
                             cc->seq, (now - cc->deadline) / MS);
                if (now < cc->deadline)
                        FAIL(&rpc->v, "caller %u call %u: timed out before its deadline", cc->caller, cc->seq);
                final = CALL_TIMED_OUT;
                atomic_fetch_add(&rpc->timed_out, 1);
        } else {
                FAIL(&rpc->v, "caller %u call %u: ended with %s", cc->caller, cc->seq, strerror(-error));
                final = CALL_TIMED_OUT;
        }
        old = atomic_exchange(&rpc->state[cc->caller][cc->seq], final);
        if (old != CALL_PENDING)
                FAIL(&rpc->v, "caller %u call %u: ended twice", cc->caller, cc->seq);
        atomic_store(&cc->ended, true); /* the last touch: the caller frees it */
}

/* The server: answers most requests at once (some in two replies), leaves every seventh unanswered. */
static void serve(struct shmz_port *p, struct shmz_msg *m, void *userdata) {
        struct rpc *rpc = userdata;
        uint32_t id[2] = { 0, 0 };

        if (m->size == sizeof(id))
                memcpy(id, m->data, sizeof(id));
        shmz_msg_release(p, m);
        if (id[1] % 7 == 3)
                return;
        if (id[1] % 5 == 1) {
                struct shmz_msg r1 = { .type = 2, .stream = m->stream, .data = id, .size = sizeof(id), .fd = -1 };

                (void) shmz_port_send(p, &r1, 100 * MS);
        }
        {
                struct shmz_msg r = {
                        .type = 2, .stream = m->stream, .flags = SHMZ_MSG_LAST, .data = id, .size = sizeof(id), .fd = -1
                };

                (void) shmz_port_send(p, &r, 100 * MS);
        }
        /* Now and then a message of the server's own: the callers' plain receiver takes those. */
        if (id[1] % 11 == 0) {
                struct shmz_msg n = { .type = 3, .data = "n", .size = 2, .fd = -1 };

                (void) shmz_port_send(p, &n, 0);
        }
        (void) rpc;
}

static void *rpc_server(void *arg) {
        struct rpc *rpc = arg;

        while (!atomic_load(&rpc->stop_server)) {
                int r = shmz_port_dispatch(rpc->sp, 20 * MS);

                if (r < 0 && r != -ETIMEDOUT && r != -EAGAIN) {
                        FAIL(&rpc->v, "server: shmz_port_dispatch: %s", strerror(-r));
                        break;
                }
        }
        return NULL;
}

struct caller_arg {
        struct rpc *rpc;
        uint32_t id;
};

static void *rpc_caller(void *arg) {
        struct caller_arg *ca = arg;
        struct rpc *rpc = ca->rpc;

        for (uint32_t seq = 0; seq < CALLS_MAX && !atomic_load(&rpc->stop); seq++) {
                /* On the heap: a handler that never comes would write it after we gave up on it. */
                struct call_ctx *ccp = calloc(1, sizeof(*ccp)),
                                cc_fields = { .rpc = rpc, .caller = ca->id, .seq = seq };
                uint32_t id[2] = { ca->id, seq };
                struct shmz_msg req = { .type = 1, .data = id, .size = sizeof(id), .fd = -1 };
                uint64_t give_up;
                int r;

                cc_fields.deadline = mono_ns() + (1 + (seq * 13 + ca->id) % 20) * MS;
                *ccp = cc_fields;
                atomic_store(&rpc->state[ca->id][seq], CALL_PENDING);
                r = shmz_port_call(rpc->cp, &req, ccp->deadline, on_call_end, ccp, NULL);
                if (r == -ETIMEDOUT || r == -EAGAIN) {
                        atomic_store(&rpc->state[ca->id][seq], CALL_TIMED_OUT);
                        free(ccp);
                        continue;
                }
                if (r < 0) {
                        FAIL(&rpc->v, "caller %u: shmz_port_call: %s", ca->id, strerror(-r));
                        atomic_store(&rpc->state[ca->id][seq], CALL_TIMED_OUT);
                        free(ccp);
                        break;
                }
                atomic_fetch_add(&rpc->calls, 1);
                /* The handler runs in the dispatcher (or the plain receiver): wait for it, boundedly. */
                give_up = ccp->deadline + 3 * LATE_NS;
                while (!atomic_load(&ccp->ended) && mono_ns() < give_up)
                        usleep(200);
                if (!atomic_load(&ccp->ended)) {
                        FAIL(&rpc->v, "caller %u call %u: no handler call %" PRIu64 " ms after its deadline", ca->id,
                             seq, 3 * LATE_NS / MS);
                        continue; /* ccp is left to the handler, if it ever comes */
                }
                free(ccp);
        }
        return NULL;
}

static void *rpc_dispatcher(void *arg) {
        struct rpc *rpc = arg;

        while (!atomic_load(&rpc->stop_recv)) {
                uint64_t t0 = mono_ns(), took;
                int r = shmz_port_dispatch(rpc->cp, (int64_t) DISPATCH_NS);

                took = mono_ns() - t0;
                max_store(&rpc->worst_dispatch_ns, took);
                atomic_fetch_add(&rpc->dispatches, 1);
                if (took > DISPATCH_NS + LATE_NS)
                        FAIL(&rpc->v, "shmz_port_dispatch(50 ms) took %" PRIu64 " ms", took / MS);
                if (r < 0 && r != -ETIMEDOUT && r != -EAGAIN) {
                        FAIL(&rpc->v, "shmz_port_dispatch: %s", strerror(-r));
                        break;
                }
        }
        return NULL;
}

/* Beside the dispatcher: it must never get a reply to a call still pending. */
static void *rpc_plain(void *arg) {
        struct rpc *rpc = arg;

        while (!atomic_load(&rpc->stop_recv)) {
                struct shmz_msg m;
                uint32_t id[2];
                int r = shmz_port_recv(rpc->cp, &m, 10 * MS);

                if (r == -ETIMEDOUT || r == -EAGAIN)
                        continue;
                if (r < 0) {
                        FAIL(&rpc->v, "shmz_port_recv: %s", strerror(-r));
                        break;
                }
                if (m.stream == 0) {
                        atomic_fetch_add(&rpc->plain, 1);
                        shmz_msg_release(rpc->cp, &m);
                        continue;
                }
                /* A reply here is one whose call had ended (timed out) when it came. The handler of that
                 * timeout may still be on its way: give it a moment. */
                memcpy(id, m.data, sizeof(id));
                shmz_msg_release(rpc->cp, &m); /* flags stay */
                if (id[0] >= CALLERS || id[1] >= CALLS_MAX) {
                        FAIL(&rpc->v, "recv: a reply of no call (%u/%u)", id[0], id[1]);
                        continue;
                }
                for (int k = 0; k < 1000 && atomic_load(&rpc->state[id[0]][id[1]]) == CALL_PENDING; k++)
                        usleep(1000);
                if (atomic_load(&rpc->state[id[0]][id[1]]) != CALL_TIMED_OUT)
                        FAIL(&rpc->v, "recv took a reply (%s) of call %u/%u, which is %s",
                             m.flags & SHMZ_MSG_LAST ? "last" : "not last", id[0], id[1],
                             (const char *[]){ "not made", "pending", "replied",
                                               "timed out" }[atomic_load(&rpc->state[id[0]][id[1]])]);
                atomic_fetch_add(&rpc->late_replies, 1);
        }
        return NULL;
}

static void phase_rpc(struct shmz_client *c) {
        struct rpc *rpc = calloc(1, sizeof(*rpc));
        pthread_t tc[CALLERS], td, tp, tsrv;
        struct caller_arg ca[CALLERS];
        char figures[256];
        int r;

        pthread_mutex_init(&rpc->v.lock, NULL);
        r = port_pair(c, "stress-rpc", &rpc->cp, &rpc->sp);
        if (r < 0) {
                FAIL(&rpc->v, "no port: %s", strerror(-r));
                report("rpc", &rpc->v, "");
                return;
        }
        for (int i = 0; i < CALLERS; i++)
                rpc->state[i] = calloc(CALLS_MAX, 1);
        shmz_port_set_handler(rpc->sp, serve, rpc);
        pthread_create(&tsrv, NULL, rpc_server, rpc);
        pthread_create(&td, NULL, rpc_dispatcher, rpc);
        pthread_create(&tp, NULL, rpc_plain, rpc);
        for (int i = 0; i < CALLERS; i++) {
                ca[i] = (struct caller_arg){ .rpc = rpc, .id = (uint32_t) i };
                pthread_create(&tc[i], NULL, rpc_caller, &ca[i]);
        }
        usleep((useconds_t) (phase_ns(0.3) / 1000));
        atomic_store(&rpc->stop, true);
        for (int i = 0; i < CALLERS; i++)
                pthread_join(tc[i], NULL);
        atomic_store(&rpc->stop_recv, true);
        pthread_join(td, NULL);
        pthread_join(tp, NULL);
        atomic_store(&rpc->stop_server, true);
        pthread_join(tsrv, NULL);
        if (atomic_load(&rpc->replied) + atomic_load(&rpc->timed_out) != atomic_load(&rpc->calls))
                FAIL(&rpc->v, "%" PRIu64 " calls, %" PRIu64 " replied, %" PRIu64 " timed out",
                     (uint64_t) atomic_load(&rpc->calls), (uint64_t) atomic_load(&rpc->replied),
                     (uint64_t) atomic_load(&rpc->timed_out));
        snprintf(figures, sizeof(figures),
                 "%" PRIu64 " calls: %" PRIu64 " replied, %" PRIu64 " timed out (at worst %" PRIu64
                 " ms late), %" PRIu64 " late replies and %" PRIu64 " plain messages to recv; %" PRIu64
                 " dispatches, the longest %" PRIu64 " ms",
                 (uint64_t) atomic_load(&rpc->calls), (uint64_t) atomic_load(&rpc->replied),
                 (uint64_t) atomic_load(&rpc->timed_out), atomic_load(&rpc->worst_late_ns) / MS,
                 (uint64_t) atomic_load(&rpc->late_replies), (uint64_t) atomic_load(&rpc->plain),
                 (uint64_t) atomic_load(&rpc->dispatches), atomic_load(&rpc->worst_dispatch_ns) / MS);
        report("rpc", &rpc->v, figures);
        shmz_port_close(rpc->cp);
        shmz_port_close(rpc->sp);
        for (int i = 0; i < CALLERS; i++)
                free(rpc->state[i]);
        free(rpc);
}

/* ---- closes under threads asleep in every kind of call ---------------------------------------- */

enum inside { IN_RECV, IN_DISPATCH, IN_BUF_WAIT, IN_SEND, IN_SEND_CHUNKED, IN_SET_SPIN, IN_KINDS };

struct insider {
        struct shmz_port *p;
        enum inside what;
        atomic_bool started;
        atomic_int r;
};

static void *call_inside(void *arg) {
        struct insider *in = arg;
        struct shmz_msg m = { .type = 5, .fd = -1 };
        static uint8_t big[3 * 4096];
        void *buf;
        int r;

        atomic_store(&in->started, true);
        switch (in->what) {
        case IN_RECV:
                r = shmz_port_recv(in->p, &m, -1);
                if (r == 0)
                        shmz_msg_release(in->p, &m);
                break;
        case IN_DISPATCH:
                r = shmz_port_dispatch(in->p, -1);
                break;
        case IN_BUF_WAIT:
                buf = shmz_port_buf_wait(in->p, 4096, -1);
                r = buf ? 0 : -errno;
                break;
        case IN_SEND:
                r = shmz_port_send(in->p, &m, -1);
                break;
        case IN_SEND_CHUNKED:
                m.data = big;
                m.size = sizeof(big);
                r = shmz_port_send(in->p, &m, -1);
                break;
        default:
                /* In and out of short calls until the close; its -EPIPE ends them. */
                do
                        r = shmz_port_dispatch(in->p, 1 * MS);
                while (r == -ETIMEDOUT || r == -EAGAIN || r >= 0);
                break;
        }
        atomic_store(&in->r, r);
        return NULL;
}

static void ignore_reply(struct shmz_port *p, int error, struct shmz_msg *reply, void *userdata) {
        atomic_int *ended = userdata;

        if (reply)
                shmz_msg_release(p, reply);
        if (error == -EPIPE)
                atomic_fetch_add(ended, 1);
}

static void phase_close(struct shmz_client *c) {
        struct verdict v = { .lock = PTHREAD_MUTEX_INITIALIZER };
        uint64_t end = mono_ns() + phase_ns(0.2);
        unsigned rounds = 0, woken = 0;
        char figures[128];

        while (mono_ns() < end && !v.failed) {
                struct insider in[2 * IN_KINDS];
                pthread_t t[2 * IN_KINDS];
                struct shmz_port *a, *b;
                struct shmz_msg req = { .type = 1, .data = "q", .size = 2, .fd = -1 };
                atomic_int ended = 0;
                int r;

                r = port_pair(c, "stress-close", &a, &b);
                if (r < 0) {
                        FAIL(&v, "no port: %s", strerror(-r));
                        break;
                }
                /* a's memory all held (senders for chunks wait), a call pending, a's ring full (small senders
                 * wait); b reads nothing and sends nothing (a's receivers wait). */
                while (shmz_port_buf(a, 64 * 4096))
                        ;
                if (shmz_port_call(a, &req, 0, ignore_reply, &ended, NULL) < 0)
                        FAIL(&v, "round %u: the call failed", rounds);
                for (uint32_t n = 0;; n++) {
                        struct shmz_msg m = { .type = n, .fd = -1 };

                        if (shmz_port_send(a, &m, 0) < 0)
                                break;
                }
                for (int i = 0; i < 2 * IN_KINDS; i++) {
                        in[i] = (struct insider){ .p = a, .what = (enum inside)(i % IN_KINDS), .r = 1 };
                        pthread_create(&t[i], NULL, call_inside, &in[i]);
                }
                for (int i = 0; i < 2 * IN_KINDS; i++)
                        while (!atomic_load(&in[i].started))
                                usleep(100);
                usleep(1000 + (rounds % 10) * 1000);
                shmz_port_close(a);
                for (int i = 0; i < 2 * IN_KINDS; i++) {
                        pthread_join(t[i], NULL);
                        r = atomic_load(&in[i].r);
                        /* A dispatch may end the pending call itself (-EPIPE to its handler) and count it. */
                        if (r == -EPIPE || (in[i].what == IN_DISPATCH && r == 1))
                                woken++;
                        else
                                FAIL(&v, "round %u: a thread in call kind %d returned %d", rounds, in[i].what, r);
                }
                if (atomic_load(&ended) != 1)
                        FAIL(&v, "round %u: the pending call ended %d times", rounds, atomic_load(&ended));
                /* The peer reads what was sent, then sees the end. */
                for (;;) {
                        struct shmz_msg m;

                        r = shmz_port_recv(b, &m, 1000 * MS);
                        if (r < 0)
                                break;
                        shmz_msg_release(b, &m);
                }
                if (r != -EPIPE)
                        FAIL(&v, "round %u: the peer's receive ended with %d", rounds, r);
                shmz_port_close(b);
                rounds++;
        }
        snprintf(figures, sizeof(figures), "%u closes, %u threads woken inside calls", rounds, woken);
        report("close", &v, figures);
}

/* ---- a zone's allocator and lock from threads of two processes ---------------------------------- */

#define ZONE_THREADS 4

struct zone_root {
        uint32_t inside; /* who is in the critical section: 0 or 1 + process * ZONE_THREADS + thread */
        uint64_t entries[2];
};

struct zone_arg {
        struct shmz_zone *z;
        struct zone_root *root;
        unsigned proc, thread;
        uint64_t until;
        struct verdict *v;
        uint64_t allocs;
};

static void *zone_worker(void *arg) {
        struct zone_arg *za = arg;
        uint32_t me = 1 + za->proc * ZONE_THREADS + za->thread;
        void *held[32] = {};
        unsigned n = 0, x = me * 2654435761u;

        while (mono_ns() < za->until) {
                struct shmz_mutex *m = shmz_zone_mutex(za->z);
                size_t size;
                int r;

                for (int k = 0; k < 16; k++) {
                        x = x * 1103515245u + 12345u;
                        size = 8 + (x >> 8) % (x & 0x100 ? 20000 : 300);
                        if (held[n % 32]) {
                                if (shmz_free_checked(za->z, held[n % 32]) < 0)
                                        FAIL(za->v, "process %u thread %u: a free failed", za->proc, za->thread);
                        }
                        held[n % 32] = shmz_alloc(za->z, size);
                        if (held[n % 32])
                                memset(held[n % 32], (int) me, size);
                        n++;
                        za->allocs++;
                }
                r = shmz_mutex_lock(m);
                if (r < 0) {
                        FAIL(za->v, "process %u thread %u: lock: %s", za->proc, za->thread, strerror(-r));
                        break;
                }
                if (__atomic_load_n(&za->root->inside, __ATOMIC_RELAXED) != 0)
                        FAIL(za->v, "%u inside the lock with %u", me, za->root->inside);
                __atomic_store_n(&za->root->inside, me, __ATOMIC_RELAXED);
                za->root->entries[za->proc]++;
                for (volatile int spin = 0; spin < 100; spin++)
                        ;
                if (__atomic_load_n(&za->root->inside, __ATOMIC_RELAXED) != me)
                        FAIL(za->v, "%u found %u inside the lock it holds", me, za->root->inside);
                __atomic_store_n(&za->root->inside, 0, __ATOMIC_RELAXED);
                (void) shmz_mutex_unlock(m);
        }
        for (unsigned i = 0; i < 32; i++)
                if (held[i])
                        shmz_free(za->z, held[i]);
        return NULL;
}

/* One process's half: ZONE_THREADS workers on the zone until `until`. Returns the failures. */
static int zone_half(unsigned proc, uint64_t until, struct verdict *v, uint64_t *ret_entries, uint64_t *ret_allocs) {
        struct zone_arg za[ZONE_THREADS];
        pthread_t t[ZONE_THREADS];
        struct shmz_client *c;
        struct shmz_zone *z;
        struct zone_root *root;
        int r;

        r = shmz_connect(sock_path, &c);
        if (r < 0) {
                FAIL(v, "process %u: connect: %s", proc, strerror(-r));
                return v->failed;
        }
        r = shmz_zone_open(c, "stress-zone", 8 << 20, "stress", SHMZ_CREATE, &z);
        if (r < 0) {
                FAIL(v, "process %u: zone: %s", proc, strerror(-r));
                shmz_disconnect(c);
                return v->failed;
        }
        /* The root is made once, under the lock, by whichever process comes first. */
        (void) shmz_mutex_lock(shmz_zone_mutex(z));
        root = shmz_zone_root(z);
        if (!root) {
                root = shmz_alloc_locked(z, sizeof(*root));
                if (root) {
                        memset(root, 0, sizeof(*root));
                        (void) shmz_zone_set_root(z, root);
                }
        }
        (void) shmz_mutex_unlock(shmz_zone_mutex(z));
        if (!root) {
                FAIL(v, "process %u: no root", proc);
                shmz_zone_close(z);
                shmz_disconnect(c);
                return v->failed;
        }
        for (unsigned i = 0; i < ZONE_THREADS; i++) {
                za[i] = (struct zone_arg){ .z = z, .root = root, .proc = proc, .thread = i, .until = until, .v = v };
                pthread_create(&t[i], NULL, zone_worker, &za[i]);
        }
        *ret_allocs = 0;
        for (unsigned i = 0; i < ZONE_THREADS; i++) {
                pthread_join(t[i], NULL);
                *ret_allocs += za[i].allocs;
        }
        *ret_entries = root->entries[proc];
        if (proc == 0) {
                r = shmz_zone_check(z);
                if (r != 0)
                        FAIL(v, "shmz_zone_check: %d", r);
        }
        shmz_zone_close(z);
        shmz_disconnect(c);
        return v->failed;
}

static void phase_zone(void) {
        struct verdict v = { .lock = PTHREAD_MUTEX_INITIALIZER };
        uint64_t until = mono_ns() + phase_ns(0.2), entries = 0, allocs = 0, e, a;
        char figures[128];
        int status;
        pid_t child;

        fflush(stdout);
        child = fork();
        if (child == 0) {
                struct verdict cv = { .lock = PTHREAD_MUTEX_INITIALIZER };

                if (zone_half(1, until, &cv, &e, &a) > 0)
                        fprintf(stderr, "stress zone (child): %s\n", cv.first);
                _exit(cv.failed > 0 ? 1 : 0);
        }
        /* The child's own workers first make the root, or we do: either way both use one. */
        (void) zone_half(0, until, &v, &entries, &allocs);
        if (child < 0 || waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
                FAIL(&v, "the other process failed");
        snprintf(figures, sizeof(figures), "%" PRIu64 " lock entries and %" PRIu64 " allocations in this process",
                 entries, allocs);
        report("zone", &v, figures);
}

int main(int argc, char *argv[]) {
        struct shmz_client *c;
        int r;

        if (argc > 1)
                seconds = atof(argv[1]);
        if (seconds <= 0)
                seconds = 10;
        setvbuf(stdout, NULL, _IOLBF, 0);
        r = daemon_start();
        if (r < 0) {
                printf("stress daemon: FAILED (%s)\n", strerror(-r));
                daemon_stop();
                return 1;
        }
        /* First, while this process has no thread: it forks. */
        phase_zone();
        r = shmz_connect(sock_path, &c);
        if (r < 0) {
                printf("stress connect: FAILED (%s)\n", strerror(-r));
                daemon_stop();
                return 1;
        }
        phase_traffic(c);
        phase_rpc(c);
        phase_close(c);
        shmz_disconnect(c);
        daemon_stop();
        return failures > 0 ? 1 : 0;
}
