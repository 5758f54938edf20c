/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The config file parser: each input is a whole file, parsed by config_load()
 * from a memfd through its /proc path (the parser wants a path, and a memfd
 * costs no disk and leaves nothing behind). A config it accepts must hold
 * what the daemon relies on without checking again.
 */
#include <sys/mman.h>
#include <unistd.h>

#include "conf-file.h"
#include "fuzz-util.h"
#include "log.h"
#include "util.h"

static int memfd = -EBADF;
static char path[64];

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv) {
        /* Every refused line is logged at LOG_ERR: silence, or the fuzzer spends its time writing stderr. */
        log_max_level = LOG_EMERG - 1;
        memfd = memfd_create("fuzz-config", MFD_CLOEXEC);
        if (memfd < 0)
                abort();
        (void) snprintf(path, sizeof(path), "/proc/self/fd/%d", memfd);
        return 0;
}

static void check_config(const struct config *c) {
        fuzz_assert(c->socket_path && c->socket_path[0] == '/', "socket '%s'", c->socket_path ?: "(null)");
        fuzz_assert(!c->mount_path || c->mount_path[0] == '/', "mount '%s'", c->mount_path);
        fuzz_assert(c->threads <= 64, "threads %u", c->threads);
        fuzz_assert(c->limits.budget > 0 && c->limits.quota > 0 && c->limits.max_zones > 0, "a zero limit");
        fuzz_assert(c->max_clients > 0 && c->uid_max_clients > 0 && c->hello_timeout > 0, "a zero client limit");
        fuzz_assert(c->n_zones == 0 || c->zones, "%zu zones, no array", c->n_zones);
        for (size_t i = 0; i < c->n_zones; i++) {
                const struct zone_decl *z = &c->zones[i];

                fuzz_assert(buf_is_cstr(z->name, sizeof(z->name)) && name_is_valid(z->name), "zone %zu: bad name", i);
                fuzz_assert(buf_is_cstr(z->tag, sizeof(z->tag)) && tag_is_valid(z->tag), "zone '%s': bad tag", z->name);
                fuzz_assert(z->size > 0, "zone '%s': no size", z->name);
                fuzz_assert(z->mode <= 0777, "zone '%s': mode %o", z->name, z->mode);
                for (size_t k = 0; k < i; k++)
                        fuzz_assert(!streq(c->zones[k].name, z->name), "zone '%s' twice", z->name);
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct config *c = NULL;
        int r;

        /* A config is a few KiB; megabytes would measure fgets(), not the parser. */
        if (size > 64 * 1024)
                return 0;
        if (ftruncate(memfd, 0) < 0 || (size > 0 && pwrite(memfd, data, size, 0) != (ssize_t) size))
                abort();
        r = config_load(path, &c);
        fuzz_assert(r == 0 || r == -EINVAL, "config_load() = %s", strerror(-r));
        fuzz_assert((r == 0) == (c != NULL), "result %d with config %p", r, (void *) c);
        if (c)
                check_config(c);
        config_free(c);
        return 0;
}
