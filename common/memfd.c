/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <sys/mman.h>
#include <sys/stat.h>

#include "memfd.h"
#include "util.h"

int memfd_new_sealed(const char *name, uint64_t size, bool owner_only, int *ret_fd) {
        _cleanup_close_ int fd = -EBADF;

        if (size == 0 || size > (uint64_t) INT64_MAX)
                return -EINVAL;
        fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
        if (fd < 0)
                return -errno;
        if (ftruncate(fd, (off_t) size) < 0)
                return -errno;
        if (fcntl(fd, F_ADD_SEALS, MEMFD_SEALS) < 0)
                return -errno;
        if (owner_only && fchmod(fd, 0400) < 0)
                return -errno;
        *ret_fd = TAKE_FD(fd);
        return 0;
}
