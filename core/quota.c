/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The memory budget (all zones together) and what each uid may take: bytes
 * and zones. Every zone costs the daemon an fd, however small, so zones are
 * counted too. Lock held throughout.
 */
#include <stdlib.h>

#include "registry-internal.h"

static struct quota_entry *quota_entry(struct registry *reg, uid_t uid, bool create) {
        struct quota_entry *q;

        assert_locked(reg);
        for (size_t i = 0; i < reg->n_quotas; i++)
                if (reg->quotas[i].uid == uid)
                        return &reg->quotas[i];
        if (!create)
                return NULL;
        q = realloc(reg->quotas, (reg->n_quotas + 1) * sizeof(*q));
        if (!q)
                return NULL;
        reg->quotas = q;
        q[reg->n_quotas] = (struct quota_entry){ .uid = uid };
        return &q[reg->n_quotas++];
}

/*
 * Charges map_size more bytes to the budget and, for zones a client made
 * (z->counted), to the quota of the uid that made them. Declared zones are the
 * administrator's: they count against nobody's quota.
 */
int quota_charge(struct registry *reg, const struct zone *z, uint64_t map_size) {
        struct quota_entry *q = NULL;

        assert_locked(reg);
        if (map_size > reg->budget || reg->budget_used > reg->budget - map_size)
                return -ENOSPC;
        if (z->counted) {
                q = quota_entry(reg, z->charged_uid, true);
                if (!q)
                        return -ENOMEM;
                if (map_size > reg->quota || q->used > reg->quota - map_size)
                        return -EDQUOT;
                q->used += map_size;
        }
        reg->budget_used += map_size;
        return 0;
}

void quota_uncharge(struct registry *reg, const struct zone *z, uint64_t map_size) {
        struct quota_entry *q = z->counted ? quota_entry(reg, z->charged_uid, false) : NULL;

        assert_locked(reg);
        if (q)
                q->used -= MIN(q->used, map_size);
        reg->budget_used -= MIN(reg->budget_used, map_size);
}

/* Every zone costs the daemon an fd and some memory, whatever its size: count them per uid too. */
int quota_count_zone(struct registry *reg, uid_t uid) {
        struct quota_entry *q = quota_entry(reg, uid, true);

        assert_locked(reg);
        if (!q)
                return -ENOMEM;
        if (q->zones >= reg->max_zones)
                return -EDQUOT;
        q->zones++;
        return 0;
}

void quota_uncount_zone(struct registry *reg, uid_t uid) {
        struct quota_entry *q = quota_entry(reg, uid, false);

        assert_locked(reg);
        if (q && q->zones > 0)
                q->zones--;
}

int quota_adopt(struct registry *reg, const struct zone *z) {
        struct quota_entry *q = NULL;
        int r = 0;

        assert_locked(reg);
        if (z->counted) {
                q = quota_entry(reg, z->charged_uid, true);
                if (!q)
                        return -ENOMEM;
                if (q->zones >= reg->max_zones || q->used > reg->quota || z->map_size > reg->quota - q->used)
                        r = -EDQUOT;
                q->zones++;
                q->used += z->map_size;
        }
        if (reg->budget_used > reg->budget || z->map_size > reg->budget - reg->budget_used)
                r = -ENOSPC;
        reg->budget_used += z->map_size;
        return r;
}
