/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The port table (listeners and ports, one mutex) and the segment table
 * (lock-free lookup by id). See ports.h.
 *
 * Segment table: a fixed top array of pointers to blocks of pointers to
 * segment records. A slot's record is allocated once and reused for later
 * segments; records and blocks are only freed with the table. So a reader
 * that loaded a record pointer may always touch it: it takes a reference only
 * if the count is not zero, then checks that the id is still the one it
 * wanted (a reused slot carries a new id: slot in the low bits, the slot's
 * generation above).
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "memfd.h"
#include "ports.h"
#include "registry-internal.h"

#define SEG_BLOCK 1024u
#define SEG_MAX_BLOCKS 1024u
#define SEG_SLOT_BITS 20u /* SEG_BLOCK * SEG_MAX_BLOCKS slots */
#define SEG_SLOT_MASK ((UINT64_C(1) << SEG_SLOT_BITS) - 1)
/* Inode numbers (PORTS_INO_SEGMENT_BASE + id) must stay below PORTS_INO_END: generations wrap below 2^23. */
#define SEG_GEN_MASK ((UINT64_C(1) << 23) - 1)
/* New slots are used before freed ones are reused, up to this many, so that generations grow slowly. */
#define SEG_FRESH_SLOTS 1024u

struct segment {
        _Atomic uint64_t id; /* 0: free slot */
        atomic_uint refs;    /* the port's (while linked), the view's */
        atomic_bool linked;  /* in its port: lookups by id find it */
        uint32_t slot;
        uint32_t gen;
        uint32_t next_free; /* free list (UINT32_MAX: end), lock held */
        int fd;
        const struct shmz_segment_header *map; /* read-only, the whole memfd: figures and the view */
        struct shmz_msg_segment_info info;     /* chunks_used is counted when asked */
        uid_t peer_uid;                        /* the receiving side's: it decides when chunks come back */
};

struct uid_count {
        uid_t uid;
        uint32_t n;
};

/* What one connecting uid holds of one listener: its share is bounded, so others still get in. */
struct peer_count {
        uid_t uid;
        uint32_t live, pending;
};

/* Segment bytes charged to a uid (kept apart: a segment can outlive its ports, while the view reads it). */
struct uid_bytes {
        uid_t uid;
        uint64_t bytes;
};

/*
 * And of those, what its ports to one receiving uid hold: a receiver keeps
 * chunks as long as it likes, so one peer uid may make a sender's uid hold at
 * most half its uid_segment_memory, and the rest stays for everyone else.
 */
struct pair_bytes {
        uid_t uid, peer;
        uint64_t bytes;
};

struct listener {
        char name[SHMZ_NAME_BUF];
        uint32_t uid, gid, mode;   /* the publisher's (the acceptor's), and who may connect */
        uint32_t acl_uid, acl_gid; /* whom the mode is read against: the publisher, or the reservation */
        pid_t pid;
        void *owner;
        uint64_t serial;
        uint64_t created_usec;
        uint32_t backlog;         /* ports not accepted yet */
        uint64_t connections;     /* live ports */
        struct peer_count *peers; /* live and unaccepted ports per connecting uid */
        size_t n_peers;
};

struct port {
        uint64_t id;
        uint64_t token[2];
        char name[SHMZ_NAME_BUF];
        uint32_t mode;
        pid_t pid[2];
        uid_t uid[2];
        gid_t gid[2];
        struct listener *listener; /* NULL once unlistened */
        bool accepted;
        uint64_t created_usec;
        uint32_t chunk_size, segment_chunks;
        uint64_t port_memory;
        int channel_fd;
        const struct shmz_channel *channel; /* read-only mapping: figures */
        /* The highest figures read from the channel so far: its writers may lower them, our counters never go down. */
        uint64_t seen_messages[2], seen_bytes[2];
        struct segment **segs[2]; /* per direction, by slot */
        uint32_t n_segs[2], cap_segs[2];
        /* Rejoined after a restart (ports_rejoin()): the sides that came back, the channel's inode they
         * proved, whether the connector's uid is charged for it (only once the connector came back). */
        bool rejoined, joined[2], charged, dropping;
        dev_t channel_dev;
        ino_t channel_ino;
};

struct ports_change {
        enum ports_event ev;
        uint64_t ino;
        char name[SHMZ_NAME_BUF];
};

struct ports {
        pthread_mutex_t lock;
        struct ports_limits lim;
        struct listener **listeners; /* sorted by name */
        size_t n_listeners, cap_listeners;
        struct port **ports; /* sorted by id (ids only grow: appended) */
        size_t n_ports, cap_ports;
        struct uid_count *uids;
        size_t n_uids;
        struct uid_bytes *uid_bytes;
        size_t n_uid_bytes;
        struct pair_bytes *pair_bytes;
        size_t n_pair_bytes;
        struct port_decl *reserved; /* sorted by name */
        size_t n_reserved;
        uint64_t next_port_id, next_listener_serial;
        uint64_t ports_closed, peers_died;
        uint64_t ended_messages, ended_bytes; /* of the ports that ended, as last seen: counters stay monotonic */
        uint64_t n_segments, segment_bytes, chunks;

        /* The segment table: blocks published with release stores, read with acquire loads. */
        struct segment **_Atomic seg_blocks[SEG_MAX_BLOCKS];
        uint32_t seg_slots; /* slots made so far */
        uint32_t free_head, free_tail;

        ports_observer_t observer;
        void *observer_data;
        struct ports_change *changes; /* made under the lock, told after it */
        size_t n_changes, cap_changes;
};

static bool limits_valid(const struct ports_limits *lim) {
        return lim->chunk_size >= 4096 && (lim->chunk_size & (lim->chunk_size - 1)) == 0 && lim->segment_chunks >= 1 &&
               lim->segment_chunks <= SHMZ_SEGMENT_MAX_CHUNKS &&
               (uint64_t) lim->chunk_size * lim->segment_chunks <= lim->port_memory && lim->max_ports_per_uid >= 1 &&
               lim->backlog >= 1 && lim->uid_connections >= 1 && lim->segment_memory > 0 && lim->uid_segment_memory > 0;
}

int ports_new(const struct ports_limits *lim, struct ports **ret) {
        struct ports *pt;

        if (!lim || !ret || !limits_valid(lim))
                return -EINVAL;
        pt = calloc(1, sizeof(*pt));
        if (!pt)
                return -ENOMEM;
        (void) pthread_mutex_init(&pt->lock, NULL);
        pt->lim = *lim;
        pt->next_port_id = 1;
        pt->next_listener_serial = 1;
        pt->free_head = pt->free_tail = UINT32_MAX;
        *ret = pt;
        return 0;
}

static void segment_release(struct segment *s) {
        if (s->map)
                (void) munmap((void *) s->map, s->info.map_size);
        s->map = NULL;
        s->fd = safe_close(s->fd);
}

static void port_destroy(struct port *p) {
        if (p->channel)
                (void) munmap((void *) p->channel, SHMZ_CHANNEL_HEADER_SIZE);
        safe_close(p->channel_fd);
        free(p->segs[0]);
        free(p->segs[1]);
        free(p);
}

static void listener_free(struct listener *l) {
        if (!l)
                return;
        free(l->peers);
        free(l);
}

static struct segment *seg_slot(struct ports *pt, uint32_t slot) {
        struct segment **b = atomic_load_explicit(&pt->seg_blocks[slot / SEG_BLOCK], memory_order_acquire);

        return b ? b[slot % SEG_BLOCK] : NULL;
}

struct ports *ports_free(struct ports *pt) {
        if (!pt)
                return NULL;
        /* The front ends are gone: whatever is left goes now. */
        for (size_t i = 0; i < pt->n_ports; i++)
                port_destroy(pt->ports[i]);
        for (size_t i = 0; i < pt->n_listeners; i++)
                listener_free(pt->listeners[i]);
        for (uint32_t b = 0; b < SEG_MAX_BLOCKS; b++) {
                struct segment **blk = atomic_load(&pt->seg_blocks[b]);

                if (!blk)
                        continue;
                for (uint32_t i = 0; i < SEG_BLOCK; i++)
                        if (blk[i]) {
                                segment_release(blk[i]);
                                free(blk[i]);
                        }
                free(blk);
        }
        free(pt->ports);
        free(pt->listeners);
        free(pt->uids);
        free(pt->uid_bytes);
        free(pt->pair_bytes);
        free(pt->reserved);
        free(pt->changes);
        (void) pthread_mutex_destroy(&pt->lock);
        free(pt);
        return NULL;
}

void ports_set_limits(struct ports *pt, const struct ports_limits *lim) {
        if (!limits_valid(lim))
                return;
        pthread_mutex_lock(&pt->lock);
        pt->lim = *lim;
        pthread_mutex_unlock(&pt->lock);
}

void ports_set_observer(struct ports *pt, ports_observer_t cb, void *userdata) {
        pthread_mutex_lock(&pt->lock);
        pt->observer = cb;
        pt->observer_data = userdata;
        pthread_mutex_unlock(&pt->lock);
}

/* Lock held. Lost if out of memory: the view then misses one invalidation (its entries time out). */
static void changed(struct ports *pt, enum ports_event ev, const char *name, uint64_t ino) {
        if (!pt->observer)
                return;
        if (pt->n_changes == pt->cap_changes) {
                size_t cap = MAX(pt->cap_changes * 2, 8u);
                struct ports_change *v = realloc(pt->changes, cap * sizeof(*v));

                if (!v)
                        return;
                pt->changes = v;
                pt->cap_changes = cap;
        }
        pt->changes[pt->n_changes] = (struct ports_change){ .ev = ev, .ino = ino };
        strncpy_buf(pt->changes[pt->n_changes].name, SHMZ_NAME_BUF, name);
        pt->n_changes++;
}

/* Releases the lock, then tells the observer (which may call back in). */
static void unlock(struct ports *pt) {
        struct ports_change *v = pt->changes;
        size_t n = pt->n_changes;
        ports_observer_t cb = pt->observer;
        void *data = pt->observer_data;

        pt->changes = NULL;
        pt->n_changes = pt->cap_changes = 0;
        pthread_mutex_unlock(&pt->lock);
        for (size_t i = 0; cb && i < n; i++)
                cb(data, v[i].ev, v[i].name, v[i].ino);
        free(v);
}

static struct uid_count *uid_find(struct ports *pt, uid_t uid) {
        for (size_t i = 0; i < pt->n_uids; i++)
                if (pt->uids[i].uid == uid)
                        return &pt->uids[i];
        return NULL;
}

static uint32_t uid_held(struct ports *pt, uid_t uid) {
        struct uid_count *u = uid_find(pt, uid);

        return u ? u->n : 0;
}

static int uid_charge(struct ports *pt, uid_t uid) {
        struct uid_count *u = uid_find(pt, uid);

        if (!u) {
                u = realloc(pt->uids, (pt->n_uids + 1) * sizeof(*u));
                if (!u)
                        return -ENOMEM;
                pt->uids = u;
                u = &pt->uids[pt->n_uids++];
                *u = (struct uid_count){ .uid = uid };
        }
        u->n++;
        return 0;
}

static void uid_uncharge(struct ports *pt, uid_t uid) {
        struct uid_count *u = uid_find(pt, uid);

        if (!u)
                return;
        if (--u->n == 0)
                *u = pt->uids[--pt->n_uids];
}

static uint64_t *uid_bytes_find(struct ports *pt, uid_t uid) {
        for (size_t i = 0; i < pt->n_uid_bytes; i++)
                if (pt->uid_bytes[i].uid == uid)
                        return &pt->uid_bytes[i].bytes;
        return NULL;
}

static int uid_bytes_charge(struct ports *pt, uid_t uid, uint64_t bytes) {
        uint64_t *b = uid_bytes_find(pt, uid);

        if (!b) {
                struct uid_bytes *v = realloc(pt->uid_bytes, (pt->n_uid_bytes + 1) * sizeof(*v));

                if (!v)
                        return -ENOMEM;
                pt->uid_bytes = v;
                v[pt->n_uid_bytes] = (struct uid_bytes){ .uid = uid };
                b = &v[pt->n_uid_bytes++].bytes;
        }
        *b += bytes;
        return 0;
}

static void uid_bytes_uncharge(struct ports *pt, uid_t uid, uint64_t bytes) {
        uint64_t *b = uid_bytes_find(pt, uid);

        if (!b)
                return;
        *b -= MIN(*b, bytes);
        if (*b == 0)
                for (size_t i = 0; i < pt->n_uid_bytes; i++)
                        if (pt->uid_bytes[i].uid == uid) {
                                pt->uid_bytes[i] = pt->uid_bytes[--pt->n_uid_bytes];
                                break;
                        }
}

static struct peer_count *peer_find(struct listener *l, uid_t uid) {
        for (size_t i = 0; i < l->n_peers; i++)
                if (l->peers[i].uid == uid)
                        return &l->peers[i];
        return NULL;
}

/*
 * Whether c may take one more of l's connections: the name's owner and root
 * may take all; any other uid at most uid_connections live ones, and at most
 * half the backlog (rounded up) not accepted yet, so that one uid never
 * fills a service's backlog or its process's fds for everyone else.
 */
static bool peer_share_left(struct ports *pt, struct listener *l, const struct caller *c) {
        struct peer_count *u;

        if (c->uid == 0 || c->uid == l->uid)
                return true;
        u = peer_find(l, c->uid);
        return !u || (u->live < pt->lim.uid_connections && u->pending < (pt->lim.backlog + 1) / 2);
}

static int peer_charge(struct listener *l, uid_t uid) {
        struct peer_count *u = peer_find(l, uid);

        if (!u) {
                u = realloc(l->peers, (l->n_peers + 1) * sizeof(*u));
                if (!u)
                        return -ENOMEM;
                l->peers = u;
                u = &l->peers[l->n_peers++];
                *u = (struct peer_count){ .uid = uid };
        }
        u->live++;
        u->pending++;
        return 0;
}

/* The port from uid was accepted (live stays), or ended (both go). */
static void peer_uncharge(struct listener *l, uid_t uid, bool live, bool pending) {
        struct peer_count *u = peer_find(l, uid);

        if (!u)
                return;
        if (live && u->live > 0)
                u->live--;
        if (pending && u->pending > 0)
                u->pending--;
        if (u->live == 0 && u->pending == 0)
                *u = l->peers[--l->n_peers];
}

static struct pair_bytes *pair_find(struct ports *pt, uid_t uid, uid_t peer) {
        for (size_t i = 0; i < pt->n_pair_bytes; i++)
                if (pt->pair_bytes[i].uid == uid && pt->pair_bytes[i].peer == peer)
                        return &pt->pair_bytes[i];
        return NULL;
}

static uint64_t pair_held(struct ports *pt, uid_t uid, uid_t peer) {
        struct pair_bytes *b = pair_find(pt, uid, peer);

        return b ? b->bytes : 0;
}

static int pair_charge(struct ports *pt, uid_t uid, uid_t peer, uint64_t bytes) {
        struct pair_bytes *b = pair_find(pt, uid, peer);

        if (!b) {
                struct pair_bytes *v = realloc(pt->pair_bytes, (pt->n_pair_bytes + 1) * sizeof(*v));

                if (!v)
                        return -ENOMEM;
                pt->pair_bytes = v;
                b = &v[pt->n_pair_bytes++];
                *b = (struct pair_bytes){ .uid = uid, .peer = peer };
        }
        b->bytes += bytes;
        return 0;
}

static void pair_uncharge(struct ports *pt, uid_t uid, uid_t peer, uint64_t bytes) {
        struct pair_bytes *b = pair_find(pt, uid, peer);

        if (!b)
                return;
        b->bytes -= MIN(b->bytes, bytes);
        if (b->bytes == 0)
                *b = pt->pair_bytes[--pt->n_pair_bytes];
}

/* Index of the listener called name, or where it would go (*found false). */
static size_t listener_pos(struct ports *pt, const char *name, bool *found) {
        return sorted_name_index((void *const *) pt->listeners, pt->n_listeners, offsetof(struct listener, name), name,
                                 found);
}

static size_t port_pos(struct ports *pt, uint64_t id, bool *found) {
        size_t lo = 0, hi = pt->n_ports;

        while (lo < hi) {
                size_t mid = (lo + hi) / 2;

                if (pt->ports[mid]->id == id) {
                        *found = true;
                        return mid;
                }
                if (pt->ports[mid]->id < id)
                        lo = mid + 1;
                else
                        hi = mid;
        }
        *found = false;
        return lo;
}

static struct port *port_by_id(struct ports *pt, uint64_t id) {
        bool found;
        size_t i = port_pos(pt, id, &found);

        return found ? pt->ports[i] : NULL;
}

static int decl_cmp(const void *a, const void *b) {
        return strcmp(((const struct port_decl *) a)->name, ((const struct port_decl *) b)->name);
}

int ports_set_reserved(struct ports *pt, const struct port_decl *v, size_t n) {
        struct port_decl *copy = NULL;

        for (size_t i = 0; i < n; i++)
                if (!name_is_valid(v[i].name) || (v[i].mode & ~0777u))
                        return -EINVAL;
        if (n > 0) {
                copy = malloc(n * sizeof(*copy));
                if (!copy)
                        return -ENOMEM;
                memcpy(copy, v, n * sizeof(*copy));
                qsort(copy, n, sizeof(*copy), decl_cmp);
        }
        pthread_mutex_lock(&pt->lock);
        free(pt->reserved);
        pt->reserved = copy;
        pt->n_reserved = n;
        pthread_mutex_unlock(&pt->lock);
        return 0;
}

/* Lock held. */
static const struct port_decl *reserved_find(struct ports *pt, const char *name) {
        struct port_decl key;

        if (pt->n_reserved == 0)
                return NULL;
        strncpy_buf(key.name, sizeof(key.name), name);
        return bsearch(&key, pt->reserved, pt->n_reserved, sizeof(key), decl_cmp);
}

/* Whether c may publish the reserved name rd: its user, root, or a member of its group if the mode says so. */
static bool reserved_may_publish(const struct caller *c, const struct port_decl *rd) {
        return c->uid == 0 || c->uid == rd->uid || ((rd->mode & 0020) && acl_in_group(c, rd->gid));
}

int ports_listen(struct ports *pt, const struct caller *c, const char *name, uint32_t mode, void *owner,
                 struct listener **ret) {
        const struct port_decl *rd;
        struct listener *l;
        bool found;
        size_t i;
        int r;

        if (!name || !name_is_valid(name) || (mode & ~0777u))
                return -EINVAL;
        l = calloc(1, sizeof(*l));
        if (!l)
                return -ENOMEM;
        pthread_mutex_lock(&pt->lock);
        i = listener_pos(pt, name, &found);
        if (found) {
                r = -EADDRINUSE;
                goto fail;
        }
        rd = reserved_find(pt, name);
        if (rd && !reserved_may_publish(c, rd)) {
                r = -EACCES;
                goto fail;
        }
        if (uid_held(pt, c->uid) >= pt->lim.max_ports_per_uid) {
                r = -EUSERS;
                goto fail;
        }
        if (pt->n_listeners == pt->cap_listeners) {
                size_t cap = MAX(pt->cap_listeners * 2, 16u);
                struct listener **v = realloc(pt->listeners, cap * sizeof(*v));

                if (!v) {
                        r = -ENOMEM;
                        goto fail;
                }
                pt->listeners = v;
                pt->cap_listeners = cap;
        }
        r = uid_charge(pt, c->uid);
        if (r < 0)
                goto fail;
        strncpy_buf(l->name, sizeof(l->name), name);
        l->uid = c->uid;
        l->gid = c->gid;
        l->mode = rd ? rd->mode : mode;
        l->acl_uid = rd ? rd->uid : c->uid;
        l->acl_gid = rd ? rd->gid : c->gid;
        l->pid = c->pid;
        l->owner = owner;
        l->serial = pt->next_listener_serial++;
        l->created_usec = now_usec(CLOCK_REALTIME);
        memmove(&pt->listeners[i + 1], &pt->listeners[i], (pt->n_listeners - i) * sizeof(l));
        pt->listeners[i] = l;
        pt->n_listeners++;
        changed(pt, PORTS_LISTENER_ADDED, l->name, PORTS_INO_LISTENER_BASE + l->serial);
        unlock(pt);
        if (ret)
                *ret = l;
        return 0;
fail:
        pthread_mutex_unlock(&pt->lock);
        free(l);
        return r;
}

void ports_unlisten(struct ports *pt, struct listener *l) {
        bool found;
        size_t i;

        if (!l)
                return;
        pthread_mutex_lock(&pt->lock);
        i = listener_pos(pt, l->name, &found);
        if (found && pt->listeners[i] == l) {
                memmove(&pt->listeners[i], &pt->listeners[i + 1], (pt->n_listeners - i - 1) * sizeof(l));
                pt->n_listeners--;
        }
        /* Its ports live on (accepted or not, until the front end drops them); they just lose their listener. */
        for (size_t k = 0; k < pt->n_ports; k++)
                if (pt->ports[k]->listener == l)
                        pt->ports[k]->listener = NULL;
        uid_uncharge(pt, l->uid);
        changed(pt, PORTS_LISTENER_REMOVED, l->name, PORTS_INO_LISTENER_BASE + l->serial);
        unlock(pt);
        listener_free(l);
}

int ports_connect(struct ports *pt, const struct caller *c, const char *name, struct port **ret, void **ret_owner) {
        struct listener *l;
        struct port *p;
        bool found;
        size_t i;
        int r;

        if (!name || !name_is_valid(name))
                return -EINVAL;
        p = calloc(1, sizeof(*p));
        if (!p)
                return -ENOMEM;
        p->channel_fd = -EBADF;
        /* Tokens are secrets: from the kernel's random pool, before the lock. */
        if (getrandom(p->token, sizeof(p->token), 0) != (ssize_t) sizeof(p->token)) {
                free(p);
                return -EIO;
        }
        pthread_mutex_lock(&pt->lock);
        i = listener_pos(pt, name, &found);
        if (!found) {
                r = -ENOENT;
                goto fail;
        }
        l = pt->listeners[i];
        r = acl_check_access(c, l->acl_uid, l->acl_gid, l->mode, W_OK);
        if (r < 0)
                goto fail;
        if (l->backlog >= pt->lim.backlog) {
                r = -EAGAIN;
                goto fail;
        }
        /* The connector pays for the port: the listener's uid is not charged for being connected to. */
        if (uid_held(pt, c->uid) >= pt->lim.max_ports_per_uid || !peer_share_left(pt, l, c)) {
                r = -EUSERS;
                goto fail;
        }
        if (pt->n_ports == pt->cap_ports) {
                size_t cap = MAX(pt->cap_ports * 2, 16u);
                struct port **v = realloc(pt->ports, cap * sizeof(*v));

                if (!v) {
                        r = -ENOMEM;
                        goto fail;
                }
                pt->ports = v;
                pt->cap_ports = cap;
        }
        r = uid_charge(pt, c->uid);
        if (r < 0)
                goto fail;
        r = peer_charge(l, c->uid);
        if (r < 0) {
                uid_uncharge(pt, c->uid);
                goto fail;
        }
        p->id = pt->next_port_id++;
        strncpy_buf(p->name, sizeof(p->name), l->name);
        p->mode = l->mode;
        p->pid[SHMZ_PORT_SIDE_CONNECTOR] = c->pid;
        p->uid[SHMZ_PORT_SIDE_CONNECTOR] = c->uid;
        p->gid[SHMZ_PORT_SIDE_CONNECTOR] = c->gid;
        p->pid[SHMZ_PORT_SIDE_ACCEPTOR] = l->pid;
        p->uid[SHMZ_PORT_SIDE_ACCEPTOR] = l->uid;
        p->gid[SHMZ_PORT_SIDE_ACCEPTOR] = l->gid;
        p->listener = l;
        p->created_usec = now_usec(CLOCK_REALTIME);
        p->chunk_size = pt->lim.chunk_size;
        p->segment_chunks = pt->lim.segment_chunks;
        p->port_memory = pt->lim.port_memory;
        l->backlog++;
        l->connections++;
        pt->ports[pt->n_ports++] = p;
        changed(pt, PORTS_PORT_ADDED, p->name, PORTS_INO_PORT_BASE + p->id);
        if (ret_owner)
                *ret_owner = l->owner;
        unlock(pt);
        *ret = p;
        return 0;
fail:
        pthread_mutex_unlock(&pt->lock);
        free(p);
        return r;
}

void ports_port_peer(struct ports *pt, struct port *p, uint32_t side, struct shmz_msg_port_peer *ret) {
        uint32_t peer = side == SHMZ_PORT_SIDE_CONNECTOR ? SHMZ_PORT_SIDE_ACCEPTOR : SHMZ_PORT_SIDE_CONNECTOR;

        pthread_mutex_lock(&pt->lock);
        *ret = (struct shmz_msg_port_peer){
                .port_id = p->id,
                .token = p->token[side & 1],
                .side = side & 1,
                .pid = (uint32_t) p->pid[peer],
                .uid = p->uid[peer],
                .gid = p->gid[peer],
                .chunk_size = p->chunk_size,
                .segment_chunks = p->segment_chunks,
                .port_memory = p->port_memory,
        };
        strncpy_buf(ret->name, sizeof(ret->name), p->name);
        pthread_mutex_unlock(&pt->lock);
}

int ports_port_set_channel(struct ports *pt, struct port *p, int channel_fd) {
        struct stat st;
        void *m;
        int fd;

        if (fstat(channel_fd, &st) < 0)
                return -errno;
        if (st.st_size != SHMZ_CHANNEL_SIZE)
                return -EINVAL;
        fd = fcntl(channel_fd, F_DUPFD_CLOEXEC, 3);
        if (fd < 0)
                return -errno;
        m = mmap(NULL, SHMZ_CHANNEL_HEADER_SIZE, PROT_READ, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED) {
                safe_close(fd);
                return -errno;
        }
        pthread_mutex_lock(&pt->lock);
        if (p->channel) {
                pthread_mutex_unlock(&pt->lock);
                (void) munmap(m, SHMZ_CHANNEL_HEADER_SIZE);
                safe_close(fd);
                return -EBUSY;
        }
        p->channel_fd = fd;
        p->channel = m;
        pthread_mutex_unlock(&pt->lock);
        return 0;
}

int ports_accepted(struct ports *pt, struct listener *l, uint64_t port_id) {
        struct port *p;
        int r = 0;

        pthread_mutex_lock(&pt->lock);
        p = port_by_id(pt, port_id);
        if (!p || p->listener != l || !l)
                r = -ENOENT;
        else if (p->accepted)
                r = -EALREADY;
        else {
                p->accepted = true;
                l->backlog--;
                peer_uncharge(l, p->uid[SHMZ_PORT_SIDE_CONNECTOR], false, true);
        }
        pthread_mutex_unlock(&pt->lock);
        return r;
}

/* Drops the table's reference; the last one closes the memory and frees the slot. */
static void segment_unref_internal(struct ports *pt, struct segment *s) {
        if (atomic_fetch_sub_explicit(&s->refs, 1, memory_order_acq_rel) != 1)
                return;
        pthread_mutex_lock(&pt->lock);
        segment_release(s);
        pt->n_segments--;
        pt->segment_bytes -= s->info.map_size;
        uid_bytes_uncharge(pt, s->info.owner_uid, s->info.map_size);
        pair_uncharge(pt, s->info.owner_uid, s->peer_uid, s->info.map_size);
        pt->chunks -= s->info.n_chunks;
        /* The slot goes to the back of the free queue: reused last, its generation grows slowly. */
        atomic_store_explicit(&s->id, 0, memory_order_release);
        s->next_free = UINT32_MAX;
        if (pt->free_tail != UINT32_MAX)
                seg_slot(pt, pt->free_tail)->next_free = s->slot;
        else
                pt->free_head = s->slot;
        pt->free_tail = s->slot;
        pthread_mutex_unlock(&pt->lock);
}

static uint64_t sat_add(uint64_t a, uint64_t b) {
        return a + b < a ? UINT64_MAX : a + b;
}

/* Reads the channel's figures into the port's highest-seen ones (lock held). */
static void port_see_figures(struct port *p) {
        if (!p->channel)
                return;
        for (unsigned d = 0; d < 2; d++) {
                p->seen_messages[d] =
                        MAX(p->seen_messages[d], __atomic_load_n(&p->channel->dir[d].messages, __ATOMIC_RELAXED));
                p->seen_bytes[d] = MAX(p->seen_bytes[d], __atomic_load_n(&p->channel->dir[d].bytes, __ATOMIC_RELAXED));
        }
}

void ports_port_drop(struct ports *pt, struct port *p, bool died) {
        struct segment **gone = NULL;
        size_t n_gone = 0, total;
        bool found;
        size_t i;

        if (!p)
                return;
        pthread_mutex_lock(&pt->lock);
        i = port_pos(pt, p->id, &found);
        if (found && pt->ports[i] == p) {
                memmove(&pt->ports[i], &pt->ports[i + 1], (pt->n_ports - i - 1) * sizeof(p));
                pt->n_ports--;
        }
        if (p->listener) {
                if (!p->accepted)
                        p->listener->backlog--;
                p->listener->connections--;
                peer_uncharge(p->listener, p->uid[SHMZ_PORT_SIDE_CONNECTOR], true, !p->accepted);
        }
        if (!p->rejoined || p->charged)
                uid_uncharge(pt, p->uid[SHMZ_PORT_SIDE_CONNECTOR]);
        /* Its messages stay counted: a counter that fell when a port ended would look like a restart. */
        port_see_figures(p);
        for (unsigned d = 0; d < 2; d++) {
                pt->ended_messages = sat_add(pt->ended_messages, p->seen_messages[d]);
                pt->ended_bytes = sat_add(pt->ended_bytes, p->seen_bytes[d]);
        }
        pt->ports_closed++;
        if (died)
                pt->peers_died++;
        changed(pt, PORTS_PORT_REMOVED, p->name, PORTS_INO_PORT_BASE + p->id);
        total = (size_t) p->n_segs[0] + p->n_segs[1];
        if (total > 0)
                gone = malloc(total * sizeof(*gone));
        for (unsigned d = 0; d < 2; d++)
                for (uint32_t k = 0; k < p->n_segs[d]; k++) {
                        struct segment *s = p->segs[d][k];

                        /* Out of lookups at once; the memory stays while the view holds a reference. */
                        atomic_store_explicit(&s->linked, false, memory_order_release);
                        changed(pt, PORTS_SEGMENT_REMOVED, p->name,
                                PORTS_INO_SEGMENT_BASE + atomic_load_explicit(&s->id, memory_order_relaxed));
                        if (gone)
                                gone[n_gone++] = s;
                }
        unlock(pt);
        for (size_t k = 0; k < n_gone; k++)
                segment_unref_internal(pt, gone[k]);
        /* Out of memory for the list: drop them one by one from the port's own arrays. */
        if (!gone)
                for (unsigned d = 0; d < 2; d++)
                        for (uint32_t k = 0; k < p->n_segs[d]; k++)
                                segment_unref_internal(pt, p->segs[d][k]);
        free(gone);
        port_destroy(p);
}

void ports_port_drop_id(struct ports *pt, uint64_t id, bool died) {
        struct port *p;

        pthread_mutex_lock(&pt->lock);
        p = port_by_id(pt, id);
        if (p && p->dropping)
                p = NULL;
        if (p)
                p->dropping = true; /* one caller drops it: another finds it dropping, then gone */
        pthread_mutex_unlock(&pt->lock);
        ports_port_drop(pt, p, died);
}

int ports_rejoin(struct ports *pt, const struct caller *c, uint32_t side, int channel_fd, uint32_t chunk_size,
                 uint32_t segment_chunks, struct shmz_msg_port_peer *ret) {
        _cleanup_close_ int fd = -EBADF;
        struct port *p = NULL, *fresh;
        uint64_t token;
        struct stat st;
        void *m;
        int r;

        if (side > SHMZ_PORT_SIDE_ACCEPTOR)
                return -EINVAL;
        if (fstat(channel_fd, &st) < 0)
                return -errno;
        fresh = calloc(1, sizeof(*fresh));
        if (!fresh)
                return -ENOMEM;
        fresh->channel_fd = -EBADF;
        if (getrandom(fresh->token, sizeof(fresh->token), 0) != (ssize_t) sizeof(fresh->token) ||
            getrandom(&token, sizeof(token), 0) != (ssize_t) sizeof(token)) {
                free(fresh);
                return -EIO;
        }
        fd = fcntl(channel_fd, F_DUPFD_CLOEXEC, 3);
        m = fd >= 0 ? mmap(NULL, SHMZ_CHANNEL_HEADER_SIZE, PROT_READ, MAP_SHARED, fd, 0) : MAP_FAILED;
        if (m == MAP_FAILED) {
                free(fresh);
                return -errno;
        }

        pthread_mutex_lock(&pt->lock);
        /* Segments the sides already hold were cut this way: new ones must be too. */
        if (chunk_size != pt->lim.chunk_size || segment_chunks != pt->lim.segment_chunks) {
                r = -ESTALE;
                goto fail;
        }
        for (size_t i = 0; i < pt->n_ports; i++)
                if (pt->ports[i]->rejoined && pt->ports[i]->channel_dev == st.st_dev &&
                    pt->ports[i]->channel_ino == st.st_ino && !pt->ports[i]->dropping) {
                        p = pt->ports[i];
                        break;
                }
        if (p && p->joined[side]) {
                r = -EEXIST;
                goto fail;
        }
        if (!p && pt->n_ports == pt->cap_ports) {
                size_t cap = MAX(pt->cap_ports * 2, 16u);
                struct port **v = realloc(pt->ports, cap * sizeof(*v));

                if (!v) {
                        r = -ENOMEM;
                        goto fail;
                }
                pt->ports = v;
                pt->cap_ports = cap;
        }
        /* As for a connect: the connector's uid pays for the port, within its bound. */
        if (side == SHMZ_PORT_SIDE_CONNECTOR) {
                if (uid_held(pt, c->uid) >= pt->lim.max_ports_per_uid) {
                        r = -EUSERS;
                        goto fail;
                }
                r = uid_charge(pt, c->uid);
                if (r < 0)
                        goto fail;
        }
        if (!p) {
                p = TAKE_PTR(fresh);
                p->id = pt->next_port_id++;
                p->rejoined = true;
                p->accepted = true;
                p->mode = 0;
                p->created_usec = now_usec(CLOCK_REALTIME);
                p->chunk_size = pt->lim.chunk_size;
                p->segment_chunks = pt->lim.segment_chunks;
                p->port_memory = pt->lim.port_memory;
                p->channel_dev = st.st_dev;
                p->channel_ino = st.st_ino;
                p->channel_fd = TAKE_FD(fd);
                p->channel = m;
                m = NULL;
                pt->ports[pt->n_ports++] = p;
                changed(pt, PORTS_PORT_ADDED, p->name, PORTS_INO_PORT_BASE + p->id);
        } else
                p->token[side] = token;
        p->joined[side] = true;
        if (side == SHMZ_PORT_SIDE_CONNECTOR)
                p->charged = true;
        p->pid[side] = c->pid;
        p->uid[side] = c->uid;
        p->gid[side] = c->gid;
        *ret = (struct shmz_msg_port_peer){
                .port_id = p->id,
                .token = p->token[side],
                .side = side,
                .pid = (uint32_t) p->pid[!side],
                .uid = p->joined[!side] ? p->uid[!side] : UINT32_MAX,
                .gid = p->joined[!side] ? p->gid[!side] : UINT32_MAX,
                .chunk_size = p->chunk_size,
                .segment_chunks = p->segment_chunks,
                .port_memory = p->port_memory,
        };
        unlock(pt);
        if (m)
                (void) munmap(m, SHMZ_CHANNEL_HEADER_SIZE);
        free(fresh);
        return 0;
fail:
        pthread_mutex_unlock(&pt->lock);
        (void) munmap(m, SHMZ_CHANNEL_HEADER_SIZE);
        free(fresh);
        return r;
}

/* A free slot's record (lock held): a queued free one, or a new one. NULL: -ENOMEM or -ENOSPC in *ret_r. */
static struct segment *slot_get(struct ports *pt, int *ret_r) {
        struct segment *s;
        uint32_t slot;

        if (pt->free_head != UINT32_MAX &&
            (pt->seg_slots >= SEG_FRESH_SLOTS || pt->seg_slots >= SEG_BLOCK * SEG_MAX_BLOCKS)) {
                s = seg_slot(pt, pt->free_head);
                pt->free_head = s->next_free;
                if (pt->free_head == UINT32_MAX)
                        pt->free_tail = UINT32_MAX;
                s->gen = (s->gen + 1) & (uint32_t) SEG_GEN_MASK;
                return s;
        }
        if (pt->seg_slots >= SEG_BLOCK * SEG_MAX_BLOCKS - 1) {
                *ret_r = -ENOSPC;
                return NULL;
        }
        slot = pt->seg_slots;
        if (!atomic_load_explicit(&pt->seg_blocks[slot / SEG_BLOCK], memory_order_relaxed)) {
                struct segment **b = calloc(SEG_BLOCK, sizeof(*b));

                if (!b) {
                        *ret_r = -ENOMEM;
                        return NULL;
                }
                atomic_store_explicit(&pt->seg_blocks[slot / SEG_BLOCK], b, memory_order_release);
        }
        s = calloc(1, sizeof(*s));
        if (!s) {
                *ret_r = -ENOMEM;
                return NULL;
        }
        s->slot = slot;
        s->fd = -EBADF;
        /* Published before anyone can learn an id naming it. */
        __atomic_store_n(
                &atomic_load_explicit(&pt->seg_blocks[slot / SEG_BLOCK], memory_order_relaxed)[slot % SEG_BLOCK], s,
                __ATOMIC_RELEASE);
        pt->seg_slots++;
        return s;
}

/* Gives a slot taken by slot_get() back (lock held), unused. */
static void slot_put(struct ports *pt, struct segment *s) {
        s->next_free = pt->free_head;
        pt->free_head = s->slot;
        if (pt->free_tail == UINT32_MAX)
                pt->free_tail = s->slot;
}

static int segment_memory_make(struct segment *s, struct port *p, uint32_t side, int *ret_fd) {
        _cleanup_close_ int fd = -EBADF;
        struct shmz_segment_header h = {};
        char memfd_name[64];
        uint64_t map_size = SHMZ_SEGMENT_HEADER_SIZE + (uint64_t) p->chunk_size * p->segment_chunks;
        void *m;
        int nfd, r;

        (void) snprintf(memfd_name, sizeof(memfd_name), "shmzone-segment:%" PRIu64, s->info.id);
        /* Nobody but the daemon's uid reopens it through /proc: the sides pass the fd itself. */
        r = memfd_new_sealed(memfd_name, map_size, true, &fd);
        if (r < 0)
                return r;
        h.magic = SHMZ_SEGMENT_MAGIC;
        h.abi_version = SHMZ_ABI_VERSION;
        h.header_size = SHMZ_SEGMENT_HEADER_SIZE;
        h.map_size = map_size;
        h.id = s->info.id;
        h.port_id = p->id;
        h.side = side;
        h.slot = p->n_segs[side];
        h.chunk_size = p->chunk_size;
        h.n_chunks = p->segment_chunks;
        if (pwrite(fd, &h, sizeof(h), 0) != (ssize_t) sizeof(h))
                return -EIO;
        m = mmap(NULL, map_size, PROT_READ, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED)
                return -errno;
        nfd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
        if (nfd < 0) {
                (void) munmap(m, map_size);
                return -errno;
        }
        s->map = m;
        s->fd = TAKE_FD(fd);
        s->info.map_size = map_size;
        *ret_fd = nfd;
        return 0;
}

int ports_segment_create(struct ports *pt, uint64_t port_id, uint64_t token, uint32_t side,
                         struct shmz_msg_segment_info *ret_info, int *ret_fd) {
        struct segment *s;
        struct port *p;
        uint64_t seg_bytes;
        int fd = -EBADF, r = 0;

        if (side > SHMZ_PORT_SIDE_ACCEPTOR)
                return -EINVAL;
        pthread_mutex_lock(&pt->lock);
        p = port_by_id(pt, port_id);
        if (!p) {
                r = -ENOENT;
                goto out;
        }
        if (token != p->token[side]) {
                r = -EPERM;
                goto out;
        }
        seg_bytes = (uint64_t) p->chunk_size * p->segment_chunks;
        if ((uint64_t) (p->n_segs[side] + 1) * seg_bytes > p->port_memory) {
                r = -ENOSPC;
                goto out;
        }
        {
                /* Whole memfds count here (header page included): what the host gives. */
                uint64_t map_size = SHMZ_SEGMENT_HEADER_SIZE + seg_bytes, *held = uid_bytes_find(pt, p->uid[side]);

                uid_t peer = p->uid[!side];

                if (pt->segment_bytes + map_size > pt->lim.segment_memory ||
                    (held ? *held : 0) + map_size > pt->lim.uid_segment_memory ||
                    (peer != p->uid[side] &&
                     pair_held(pt, p->uid[side], peer) + map_size > MAX(pt->lim.uid_segment_memory / 2, map_size))) {
                        r = -ENOSPC;
                        goto out;
                }
        }
        if (p->n_segs[side] == p->cap_segs[side]) {
                uint32_t cap = MAX(p->cap_segs[side] * 2, 4u);
                struct segment **v = realloc(p->segs[side], cap * sizeof(*v));

                if (!v) {
                        r = -ENOMEM;
                        goto out;
                }
                p->segs[side] = v;
                p->cap_segs[side] = cap;
        }
        s = slot_get(pt, &r);
        if (!s)
                goto out;
        s->info = (struct shmz_msg_segment_info){
                .id = ((uint64_t) s->gen << SEG_SLOT_BITS) | (s->slot + 1),
                .port_id = p->id,
                .side = side,
                .slot = p->n_segs[side],
                .chunk_size = p->chunk_size,
                .n_chunks = p->segment_chunks,
                .owner_pid = (uint32_t) p->pid[side],
                .owner_uid = p->uid[side],
                .owner_gid = p->gid[side],
                .created_usec = now_usec(CLOCK_REALTIME),
        };
        r = segment_memory_make(s, p, side, &fd);
        if (r < 0) {
                segment_release(s);
                slot_put(pt, s);
                goto out;
        }
        s->peer_uid = p->uid[!side];
        r = uid_bytes_charge(pt, s->info.owner_uid, s->info.map_size);
        if (r >= 0) {
                r = pair_charge(pt, s->info.owner_uid, s->peer_uid, s->info.map_size);
                if (r < 0)
                        uid_bytes_uncharge(pt, s->info.owner_uid, s->info.map_size);
        }
        if (r < 0) {
                segment_release(s);
                slot_put(pt, s);
                safe_close(fd);
                goto out;
        }
        p->segs[side][p->n_segs[side]++] = s;
        pt->n_segments++;
        pt->segment_bytes += s->info.map_size;
        pt->chunks += s->info.n_chunks;
        /* Readers take a reference only when refs is not 0, then check the id: id first, refs last. */
        atomic_store_explicit(&s->linked, true, memory_order_relaxed);
        atomic_store_explicit(&s->id, s->info.id, memory_order_release);
        atomic_store_explicit(&s->refs, 1, memory_order_release);
        changed(pt, PORTS_SEGMENT_ADDED, p->name, PORTS_INO_SEGMENT_BASE + s->info.id);
        if (ret_info)
                *ret_info = s->info;
        *ret_fd = fd;
        unlock(pt);
        return 0;
out:
        pthread_mutex_unlock(&pt->lock);
        return r;
}

uint64_t segment_chunks_used(const struct shmz_segment_header *h, uint32_t n_chunks) {
        uint64_t n = 0;

        n_chunks = MIN(n_chunks, SHMZ_SEGMENT_MAX_CHUNKS);
        for (uint32_t i = 0; i * 64 < n_chunks; i++) {
                uint64_t w = __atomic_load_n(&h->used[i], __ATOMIC_RELAXED);

                /* Bits past n_chunks are the sender's scribbles: not chunks. */
                if (n_chunks - i * 64 < 64)
                        w &= (UINT64_C(1) << (n_chunks - i * 64)) - 1;
                n += (uint64_t) __builtin_popcountll(w);
        }
        return n;
}

static uint64_t count_used(const struct segment *s) {
        return s->map ? segment_chunks_used(s->map, s->info.n_chunks) : 0;
}

void ports_get_stats(struct ports *pt, struct ports_stats *ret) {
        pthread_mutex_lock(&pt->lock);
        *ret = (struct ports_stats){
                .listeners = pt->n_listeners,
                .ports = pt->n_ports,
                .segments = pt->n_segments,
                .segment_bytes = pt->segment_bytes,
                .chunks = pt->chunks,
                .messages = pt->ended_messages,
                .message_bytes = pt->ended_bytes,
                .ports_closed = pt->ports_closed,
                .peers_died = pt->peers_died,
        };
        for (size_t i = 0; i < pt->n_ports; i++) {
                struct port *p = pt->ports[i];

                /* The sides write these: figures only, never lower than read before, summed without overflow. */
                port_see_figures(p);
                for (unsigned d = 0; d < 2; d++) {
                        for (uint32_t k = 0; k < p->n_segs[d]; k++)
                                ret->chunks_used += count_used(p->segs[d][k]);
                        ret->messages = sat_add(ret->messages, p->seen_messages[d]);
                        ret->message_bytes = sat_add(ret->message_bytes, p->seen_bytes[d]);
                }
        }
        pthread_mutex_unlock(&pt->lock);
}

static void listener_info_fill(const struct listener *l, struct shmz_msg_port_info *ret) {
        *ret = (struct shmz_msg_port_info){
                .mode = l->mode,
                .uid = l->acl_uid,
                .gid = l->acl_gid,
                .pid = { 0, (uint32_t) l->pid },
                .uid_side = { 0, l->uid },
                .backlog = l->backlog,
                .connections = l->connections,
                .created_usec = l->created_usec,
        };
        strncpy_buf(ret->name, sizeof(ret->name), l->name);
}

static void port_info_fill(const struct port *p, struct shmz_msg_port_info *ret) {
        *ret = (struct shmz_msg_port_info){
                .port_id = p->id,
                .mode = p->mode,
                .uid = p->uid[SHMZ_PORT_SIDE_ACCEPTOR],
                .gid = p->gid[SHMZ_PORT_SIDE_ACCEPTOR],
                .pid = { (uint32_t) p->pid[0], (uint32_t) p->pid[1] },
                .uid_side = { p->uid[0], p->uid[1] },
                .backlog = p->accepted ? 0 : 1,
                .segments = p->n_segs[0] + p->n_segs[1],
                .created_usec = p->created_usec,
        };
        for (unsigned d = 0; d < 2; d++) {
                if (p->channel) {
                        ret->messages[d] = __atomic_load_n(&p->channel->dir[d].messages, __ATOMIC_RELAXED);
                        ret->bytes[d] = __atomic_load_n(&p->channel->dir[d].bytes, __ATOMIC_RELAXED);
                }
                for (uint32_t k = 0; k < p->n_segs[d]; k++)
                        ret->chunks_in_flight[d] += count_used(p->segs[d][k]);
        }
        strncpy_buf(ret->name, sizeof(ret->name), p->name);
}

int ports_list_listeners(struct ports *pt, struct shmz_msg_port_info **ret, size_t *ret_n) {
        struct shmz_msg_port_info *v;

        pthread_mutex_lock(&pt->lock);
        v = calloc(MAX(pt->n_listeners, 1u), sizeof(*v));
        if (!v) {
                pthread_mutex_unlock(&pt->lock);
                return -ENOMEM;
        }
        for (size_t i = 0; i < pt->n_listeners; i++)
                listener_info_fill(pt->listeners[i], &v[i]);
        *ret_n = pt->n_listeners;
        pthread_mutex_unlock(&pt->lock);
        *ret = v;
        return 0;
}

/* Ports of listener l (NULL: all), by id. */
static int list_ports(struct ports *pt, const char *name, struct shmz_msg_port_info **ret, size_t *ret_n) {
        struct shmz_msg_port_info *v;
        struct listener *l = NULL;
        size_t n = 0;

        pthread_mutex_lock(&pt->lock);
        if (name) {
                bool found;
                size_t i = listener_pos(pt, name, &found);

                if (!found) {
                        pthread_mutex_unlock(&pt->lock);
                        return -ENOENT;
                }
                l = pt->listeners[i];
        }
        v = calloc(MAX(pt->n_ports, 1u), sizeof(*v));
        if (!v) {
                pthread_mutex_unlock(&pt->lock);
                return -ENOMEM;
        }
        for (size_t i = 0; i < pt->n_ports; i++)
                if (!l || pt->ports[i]->listener == l)
                        port_info_fill(pt->ports[i], &v[n++]);
        pthread_mutex_unlock(&pt->lock);
        *ret = v;
        *ret_n = n;
        return 0;
}

int ports_list_connections(struct ports *pt, const char *name, struct shmz_msg_port_info **ret, size_t *ret_n) {
        if (!name)
                return -EINVAL;
        return list_ports(pt, name, ret, ret_n);
}

int ports_list_ports(struct ports *pt, struct shmz_msg_port_info **ret, size_t *ret_n) {
        return list_ports(pt, NULL, ret, ret_n);
}

int ports_listener_info(struct ports *pt, const char *name, struct shmz_msg_port_info *ret, uint64_t *ret_ino) {
        bool found;
        size_t i;

        if (!name)
                return -EINVAL;
        pthread_mutex_lock(&pt->lock);
        i = listener_pos(pt, name, &found);
        if (!found) {
                pthread_mutex_unlock(&pt->lock);
                return -ENOENT;
        }
        if (ret)
                listener_info_fill(pt->listeners[i], ret);
        if (ret_ino)
                *ret_ino = PORTS_INO_LISTENER_BASE + pt->listeners[i]->serial;
        pthread_mutex_unlock(&pt->lock);
        return 0;
}

int ports_listener_info_by_ino(struct ports *pt, uint64_t ino, struct shmz_msg_port_info *ret) {
        int r = -ENOENT;

        if (ino < PORTS_INO_LISTENER_BASE)
                return -ENOENT;
        /* By name is how they are kept; names are few next to lookups, and this copies nothing else. */
        pthread_mutex_lock(&pt->lock);
        for (size_t i = 0; i < pt->n_listeners; i++)
                if (pt->listeners[i]->serial == ino - PORTS_INO_LISTENER_BASE) {
                        listener_info_fill(pt->listeners[i], ret);
                        r = 0;
                        break;
                }
        pthread_mutex_unlock(&pt->lock);
        return r;
}

int ports_connection_info(struct ports *pt, const char *listener, uint64_t port_id, struct shmz_msg_port_info *ret) {
        struct port *p;
        bool found;
        size_t i;
        int r = -ENOENT;

        if (!listener)
                return -EINVAL;
        pthread_mutex_lock(&pt->lock);
        i = listener_pos(pt, listener, &found);
        p = found ? port_by_id(pt, port_id) : NULL;
        /* A port of an earlier listener of the same name is not this one's. */
        if (p && p->listener == pt->listeners[i]) {
                port_info_fill(p, ret);
                r = 0;
        }
        pthread_mutex_unlock(&pt->lock);
        return r;
}

int ports_port_info(struct ports *pt, uint64_t port_id, struct shmz_msg_port_info *ret) {
        struct port *p;

        pthread_mutex_lock(&pt->lock);
        p = port_by_id(pt, port_id);
        if (p)
                port_info_fill(p, ret);
        pthread_mutex_unlock(&pt->lock);
        return p ? 0 : -ENOENT;
}

static int cmp_segment_info(const void *a, const void *b) {
        const struct shmz_msg_segment_info *x = a, *y = b;

        return x->id < y->id ? -1 : x->id > y->id;
}

int ports_list_segments(struct ports *pt, struct shmz_msg_segment_info **ret, size_t *ret_n) {
        struct shmz_msg_segment_info *v;
        size_t n = 0;

        pthread_mutex_lock(&pt->lock);
        v = calloc(MAX(pt->n_segments, 1u), sizeof(*v));
        if (!v) {
                pthread_mutex_unlock(&pt->lock);
                return -ENOMEM;
        }
        for (size_t i = 0; i < pt->n_ports; i++)
                for (unsigned d = 0; d < 2; d++)
                        for (uint32_t k = 0; k < pt->ports[i]->n_segs[d] && n < pt->n_segments; k++) {
                                struct segment *s = pt->ports[i]->segs[d][k];

                                v[n] = s->info;
                                v[n].chunks_used = (uint32_t) count_used(s);
                                n++;
                        }
        pthread_mutex_unlock(&pt->lock);
        qsort(v, n, sizeof(*v), cmp_segment_info);
        *ret = v;
        *ret_n = n;
        return 0;
}

int ports_list_listeners_page(struct ports *pt, const char *after, struct shmz_msg_port_info *ret, size_t max,
                              size_t *ret_n) {
        bool found;
        size_t i, n = 0;

        if (!after || !ret_n)
                return -EINVAL;
        pthread_mutex_lock(&pt->lock);
        i = listener_pos(pt, after, &found);
        if (found)
                i++;
        for (; i < pt->n_listeners && n < max; i++)
                listener_info_fill(pt->listeners[i], &ret[n++]);
        pthread_mutex_unlock(&pt->lock);
        *ret_n = n;
        return 0;
}

int ports_list_ports_page(struct ports *pt, uint64_t after_id, struct shmz_msg_port_info *ret, size_t max,
                          size_t *ret_n) {
        bool found;
        size_t i, n = 0;

        if (!ret_n)
                return -EINVAL;
        pthread_mutex_lock(&pt->lock);
        i = port_pos(pt, after_id, &found);
        if (found)
                i++;
        for (; i < pt->n_ports && n < max; i++)
                port_info_fill(pt->ports[i], &ret[n++]);
        pthread_mutex_unlock(&pt->lock);
        *ret_n = n;
        return 0;
}

int ports_list_segments_page(struct ports *pt, uint64_t after_id, struct shmz_msg_segment_info *ret, size_t max,
                             size_t *ret_n) {
        size_t n = 0;

        if (!ret_n)
                return -EINVAL;
        pthread_mutex_lock(&pt->lock);
        /* The max smallest ids past after_id, kept sorted in ret (ids are not in creation order). */
        for (size_t i = 0; i < pt->n_ports && max > 0; i++)
                for (unsigned d = 0; d < 2; d++)
                        for (uint32_t k = 0; k < pt->ports[i]->n_segs[d]; k++) {
                                const struct segment *s = pt->ports[i]->segs[d][k];
                                size_t at;

                                if (s->info.id <= after_id || (n == max && s->info.id >= ret[n - 1].id))
                                        continue;
                                for (at = n; at > 0 && ret[at - 1].id > s->info.id; at--)
                                        ;
                                if (n < max)
                                        n++;
                                memmove(&ret[at + 1], &ret[at], (n - 1 - at) * sizeof(*ret));
                                ret[at] = s->info;
                        }
        for (size_t i = 0; i < n; i++) {
                uint64_t slot1 = ret[i].id & SEG_SLOT_MASK;

                ret[i].chunks_used = (uint32_t) count_used(seg_slot(pt, (uint32_t) (slot1 - 1)));
        }
        pthread_mutex_unlock(&pt->lock);
        *ret_n = n;
        return 0;
}

/* Lock-free: a reference on the segment with that id, if it is in the table (linked or, with any, not). */
static struct segment *segment_get(struct ports *pt, uint64_t id, bool any) {
        uint64_t slot1 = id & SEG_SLOT_MASK;
        struct segment *s;
        unsigned refs;

        if (slot1 == 0 || slot1 > SEG_BLOCK * SEG_MAX_BLOCKS || id >= PORTS_INO_END - PORTS_INO_SEGMENT_BASE)
                return NULL;
        s = seg_slot(pt, (uint32_t) (slot1 - 1));
        if (!s)
                return NULL;
        refs = atomic_load_explicit(&s->refs, memory_order_acquire);
        do
                if (refs == 0)
                        return NULL;
        while (!atomic_compare_exchange_weak_explicit(&s->refs, &refs, refs + 1, memory_order_acquire,
                                                      memory_order_acquire));
        if (atomic_load_explicit(&s->id, memory_order_acquire) != id ||
            (!any && !atomic_load_explicit(&s->linked, memory_order_acquire))) {
                segment_unref_internal(pt, s);
                return NULL;
        }
        return s;
}

int ports_segment_info(struct ports *pt, uint64_t id, struct shmz_msg_segment_info *ret) {
        struct segment *s = segment_get(pt, id, false);

        if (!s)
                return -ENOENT;
        *ret = s->info;
        ret->chunks_used = (uint32_t) count_used(s);
        segment_unref_internal(pt, s);
        return 0;
}

int ports_segment_ref(struct ports *pt, uint64_t id, struct segment **ret) {
        struct segment *s = segment_get(pt, id, false);

        if (!s)
                return -ENOENT;
        *ret = s;
        return 0;
}

void ports_segment_unref(struct ports *pt, struct segment *s) {
        if (s)
                segment_unref_internal(pt, s);
}

int segment_view_map(struct segment *s, const void **ret, size_t *ret_size) {
        if (!s->map)
                return -EBADF;
        *ret = s->map;
        if (ret_size)
                *ret_size = s->info.map_size;
        return 0;
}
