/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Who may do what to a zone. The same rules answer the control socket and the
 * FUSE view (whose opens the kernel checks with default_permissions, by the
 * same mode bits): a test holds both to the same answers.
 */
#include <unistd.h>

#include "registry-internal.h"

bool acl_in_group(const struct caller *c, gid_t gid) {
        if (c->gid == gid)
                return true;
        for (size_t i = 0; i < c->n_groups; i++)
                if (c->groups[i] == gid)
                        return true;
        return false;
}

int acl_check_access(const struct caller *c, uint32_t uid, uint32_t gid, uint32_t mode, int want) {
        unsigned bits, need = 0;

        if (c->uid == 0)
                return 0;
        if (c->uid == uid)
                bits = (mode >> 6) & 7;
        else if (acl_in_group(c, gid))
                bits = (mode >> 3) & 7;
        else
                bits = mode & 7;
        if (want & R_OK)
                need |= 4;
        if (want & W_OK)
                need |= 2;
        return (bits & need) == need ? 0 : -EACCES;
}

bool acl_owns(const struct caller *c, const struct zone *z) {
        return c->uid == 0 || c->uid == z->uid;
}

int acl_check_setattr(const struct caller *c, const struct zone *z, uint32_t mask, uint32_t uid, uint32_t gid) {
        /* chown(2) rules: only root gives a zone away; the owner may pick one of its groups. */
        if ((mask & SHMZ_SETATTR_UID) && uid != z->uid && c->uid != 0)
                return -EPERM;
        if ((mask & SHMZ_SETATTR_GID) && gid != z->gid && c->uid != 0 && !(c->uid == z->uid && acl_in_group(c, gid)))
                return -EPERM;
        if (mask != 0 && !acl_owns(c, z))
                return -EPERM;
        return 0;
}
