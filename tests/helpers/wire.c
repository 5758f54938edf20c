/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <sys/mman.h>
#include <sys/socket.h>

#include "memfd.h"
#include "proto.h"
#include "wire.h"
#include "shmzone-abi.h"
#include "util.h"

int wire_memfd(size_t size, bool seal) {
        _cleanup_close_ int fd = -EBADF;
        int r;

        if (seal) {
                r = memfd_new_sealed("wire", size, false, &fd);
                return r < 0 ? r : TAKE_FD(fd);
        }
        fd = memfd_create("wire", MFD_CLOEXEC | MFD_ALLOW_SEALING);
        if (fd < 0)
                return -errno;
        if (ftruncate(fd, (off_t) size) < 0)
                return -errno;
        return TAKE_FD(fd);
}

int wire_channel_new(void) {
        const struct shmz_channel ch = {
                .magic = SHMZ_CHANNEL_MAGIC,
                .abi_version = SHMZ_ABI_VERSION,
                .size = SHMZ_CHANNEL_SIZE,
                .dir = { { .rx_sleep = SHMZ_RX_SLEEP_FD }, { .rx_sleep = SHMZ_RX_SLEEP_FD } },
        };
        _cleanup_close_ int fd = wire_memfd(SHMZ_CHANNEL_SIZE, true);

        if (fd < 0)
                return fd;
        if (pwrite(fd, &ch, sizeof(ch), 0) != (ssize_t) sizeof(ch))
                return -EIO;
        return TAKE_FD(fd);
}

int wire_send(int sock, const struct iovec *iov, size_t n_iov, const int *fds, size_t n_fds, int flags) {
        ssize_t n = proto_sendmsg(sock, iov, n_iov, fds, n_fds, flags);

        return n < 0 ? (int) n : 0;
}
