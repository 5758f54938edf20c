/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Tickets prove to the control socket that a process opened a zone's file in
 * the FUSE view: issued per open file, redeemed once, for the access that
 * open was granted, revoked when the file is released. A ticket holds a
 * reference on its zone, so it can never name another zone of the same name.
 */
#include <sys/random.h>

#include "registry-internal.h"

void tickets_free(struct registry *reg) {
        /* Tickets never redeemed still hold their zones (unlinked ones only through them). */
        for (size_t i = 0; i < reg->n_tickets; i++)
                if (--reg->tickets[i].zone->refs == 0)
                        zone_destroy(reg->tickets[i].zone);
        free(reg->tickets);
        reg->tickets = NULL;
        reg->n_tickets = 0;
}

int registry_ticket_issue(struct registry *reg, struct zone *z, bool writable, uint64_t ret_ticket[2]) {
        struct ticket *t;
        uint64_t id[2];

        /* 128 random bits: guessing one is not a way in. */
        if (getrandom(id, sizeof(id), 0) != (ssize_t) sizeof(id))
                return -EIO;
        registry_lock(reg);
        t = realloc(reg->tickets, (reg->n_tickets + 1) * sizeof(*t));
        if (!t) {
                registry_unlock(reg);
                return -ENOMEM;
        }
        reg->tickets = t;
        z->refs++;
        t[reg->n_tickets++] = (struct ticket){ .id = { id[0], id[1] }, .zone = z, .writable = writable };
        registry_unlock(reg);
        ret_ticket[0] = id[0];
        ret_ticket[1] = id[1];
        return 0;
}

static ssize_t ticket_find(struct registry *reg, const uint64_t id[2]) {
        assert_locked(reg);
        for (size_t i = 0; i < reg->n_tickets; i++)
                if (reg->tickets[i].id[0] == id[0] && reg->tickets[i].id[1] == id[1])
                        return (ssize_t) i;
        return -1;
}

static struct zone *ticket_take_locked(struct registry *reg, size_t i) {
        struct zone *z = reg->tickets[i].zone;

        assert_locked(reg);
        reg->tickets[i] = reg->tickets[--reg->n_tickets];
        return z;
}

void registry_ticket_revoke(struct registry *reg, const uint64_t ticket[2]) {
        ssize_t i;

        registry_lock(reg);
        i = ticket_find(reg, ticket);
        if (i >= 0)
                registry_unref_locked(reg, ticket_take_locked(reg, (size_t) i));
        registry_unlock(reg);
}

int registry_ticket_redeem(struct registry *reg, const struct caller *c, const uint64_t ticket[2], bool want_write,
                           struct zone **ret_zone, int *ret_fd, struct shmz_msg_zone_info *ret_info,
                           bool *ret_existed) {
        struct zone *z;
        bool writable;
        ssize_t i;
        int r;

        registry_lock(reg);
        i = ticket_find(reg, ticket);
        if (i < 0) {
                registry_unlock(reg);
                return -EACCES;
        }
        writable = reg->tickets[i].writable;
        z = ticket_take_locked(reg, (size_t) i); /* one use, whatever the outcome */
        if (want_write && !writable)
                r = -EACCES;
        else
                r = registry_attach_locked(reg, z, c, !want_write, ret_zone, ret_fd, ret_info, ret_existed);
        registry_unref_locked(reg, z);
        registry_unlock(reg);
        return r;
}
