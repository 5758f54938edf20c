/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <sys/mman.h>
#include <sys/socket.h>

#include "memfd.h"
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
        union {
                struct cmsghdr c;
                uint8_t buf[CMSG_SPACE(sizeof(int) * WIRE_FDS_MAX)];
        } control = {};
        struct msghdr mh = { .msg_iov = (struct iovec *) iov, .msg_iovlen = n_iov };

        if (n_fds > WIRE_FDS_MAX)
                return -E2BIG;
        if (n_fds > 0) {
                struct cmsghdr *c;

                mh.msg_control = &control;
                mh.msg_controllen = CMSG_SPACE(sizeof(int) * n_fds);
                c = CMSG_FIRSTHDR(&mh);
                c->cmsg_level = SOL_SOCKET;
                c->cmsg_type = SCM_RIGHTS;
                c->cmsg_len = CMSG_LEN(sizeof(int) * n_fds);
                memcpy(CMSG_DATA(c), fds, sizeof(int) * n_fds);
        }
        return sendmsg(sock, &mh, flags | MSG_NOSIGNAL) < 0 ? -errno : 0;
}
