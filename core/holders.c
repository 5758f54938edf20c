/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Who holds a zone, as ipcs(1) shows it for System V segments: one record per
 * attached process (its pid, credentials and name as the kernel gave them to
 * the front end), counting its attachments, so that a process that attaches a
 * thousand times costs one record. At most SHMZ_HOLDERS_MAX records per zone;
 * attachments of further processes are counted only.
 */
#include <time.h>

#include "registry-internal.h"

/* Where pid is in z->holders, or where it would go. */
static uint32_t holder_index(const struct zone *z, pid_t pid, bool *ret_found) {
        uint32_t lo = 0, hi = z->n_holders;

        while (lo < hi) {
                uint32_t mid = lo + (hi - lo) / 2;

                if (z->holders[mid].pid < pid)
                        lo = mid + 1;
                else
                        hi = mid;
        }
        *ret_found = lo < z->n_holders && z->holders[lo].pid == pid;
        return lo;
}

/* Printable ASCII only: the name ends up in JSON, xattrs and terminals. */
static void comm_copy(char dst[static SHMZ_COMM_BUF], const char *src) {
        size_t i = 0;

        for (; src && src[i] && i < SHMZ_COMM_BUF - 1; i++)
                dst[i] = src[i] >= 0x20 && src[i] < 0x7f ? src[i] : '?';
        dst[i] = 0;
}

static bool holders_grow(struct zone *z) {
        struct zone_holder *v;
        uint32_t cap;

        if (z->n_holders < z->cap_holders)
                return true;
        cap = MIN(MAX(z->cap_holders * 2, 4u), SHMZ_HOLDERS_MAX);
        if (cap <= z->n_holders)
                return false;
        v = realloc(z->holders, cap * sizeof(*v));
        if (!v)
                return false;
        z->holders = v;
        z->cap_holders = cap;
        return true;
}

void holders_attach(struct zone *z, const struct caller *c) {
        uint64_t now = now_usec(CLOCK_REALTIME);
        bool found;
        uint32_t i = holder_index(z, c->pid, &found);

        z->attach_usec = now;
        z->last_pid = c->pid;
        if (found) {
                if (z->holders[i].attachments < UINT32_MAX)
                        z->holders[i].attachments++;
                return;
        }
        if (!holders_grow(z)) {
                z->untracked++;
                return;
        }
        memmove(&z->holders[i + 1], &z->holders[i], (z->n_holders - i) * sizeof(z->holders[0]));
        z->n_holders++;
        z->holders[i] = (struct zone_holder){
                .pid = c->pid,
                .uid = c->uid,
                .gid = c->gid,
                .attachments = 1,
                .since_usec = now,
        };
        comm_copy(z->holders[i].comm, c->comm);
}

void holders_detach(struct zone *z, const struct caller *c) {
        pid_t pid = c ? c->pid : 0;
        bool found;
        uint32_t i = holder_index(z, pid, &found);

        z->detach_usec = now_usec(CLOCK_REALTIME);
        z->last_pid = pid;
        if (!found) {
                /* Attached while the records were full (or memory short). */
                if (z->untracked > 0)
                        z->untracked--;
                return;
        }
        if (--z->holders[i].attachments > 0)
                return;
        memmove(&z->holders[i], &z->holders[i + 1], (z->n_holders - i - 1) * sizeof(z->holders[0]));
        z->n_holders--;
}

uint32_t holders_processes(const struct zone *z) {
        /* Untracked attachments are of at least one process more (how many, nobody counted). */
        return z->n_holders + (z->untracked > 0 ? 1 : 0);
}

void holders_fill(const struct zone *z, uint32_t after_pid, struct shmz_msg_zone_holders *ret) {
        bool found;
        uint32_t i = holder_index(z, (pid_t) after_pid, &found);

        *ret = (struct shmz_msg_zone_holders){
                .creator_pid = (uint32_t) z->creator_pid,
                .creator_uid = z->charged_uid,
                .attach_usec = z->attach_usec,
                .detach_usec = z->detach_usec,
                .last_pid = (uint32_t) z->last_pid,
                .processes = holders_processes(z),
                .untracked = z->untracked,
        };
        /* The first page starts with pid 0 (a peer whose pid the kernel could not give us), if any. */
        if (after_pid == 0)
                i = 0;
        else if (found)
                i++;
        for (; i < z->n_holders && ret->n < SHMZ_HOLDERS_PER_MSG; i++) {
                const struct zone_holder *h = &z->holders[i];
                struct shmz_msg_zone_holder *o = &ret->holders[ret->n++];

                *o = (struct shmz_msg_zone_holder){
                        .pid = (uint32_t) h->pid,
                        .uid = h->uid,
                        .gid = h->gid,
                        .attachments = h->attachments,
                        .since_usec = h->since_usec,
                };
                memcpy(o->comm, h->comm, sizeof(o->comm));
        }
}

void holders_free(struct zone *z) {
        free(z->holders);
        z->holders = NULL;
        z->n_holders = z->cap_holders = 0;
}
