/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * A C service for the Python tests: echo-service SOCKET NAME listens on NAME,
 * says "ready" on stdout, serves one connection until its peer goes. Every
 * message is answered on its stream: type 1 with one reply (the payload
 * echoed, flagged LAST), type 2 with three replies "0", "1", "2" (the last
 * flagged LAST), type 3 never (for deadlines).
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <shmzone.h>

static int reply(struct shmz_port *p, const struct shmz_msg *m, const void *data, size_t size, uint32_t flags) {
        struct shmz_msg r = { .type = m->type, .stream = m->stream, .flags = flags, .fd = -1 };
        void *buf = NULL;

        if (size > 0) {
                buf = shmz_port_buf_wait(p, size, -1);
                if (!buf)
                        return -errno;
                memcpy(buf, data, size);
        }
        r.data = buf;
        r.size = size;
        return shmz_port_send(p, &r, -1);
}

int main(int argc, char *argv[]) {
        struct shmz_listener *l;
        struct shmz_client *c;
        struct shmz_port *p;
        struct shmz_msg m;
        int r;

        if (argc != 3) {
                fprintf(stderr, "usage: %s SOCKET NAME\n", argv[0]);
                return 2;
        }
        r = shmz_connect(argv[1], &c);
        if (r >= 0)
                r = shmz_port_listen(c, argv[2], 0666, &l);
        if (r < 0) {
                fprintf(stderr, "listen: %s\n", strerror(-r));
                return 1;
        }
        printf("ready\n");
        fflush(stdout);
        r = shmz_port_accept(l, 30LL * 1000 * 1000 * 1000, &p);
        shmz_listener_close(l);
        if (r < 0) {
                fprintf(stderr, "accept: %s\n", strerror(-r));
                return 1;
        }
        while ((r = shmz_port_recv(p, &m, -1)) == 0) {
                if (m.type == 1)
                        r = reply(p, &m, m.data, m.size, SHMZ_MSG_LAST);
                else if (m.type == 2)
                        for (int i = 0; i < 3 && r >= 0; i++)
                                r = reply(p, &m, (char[]){ (char) ('0' + i) }, 1, i == 2 ? SHMZ_MSG_LAST : 0);
                if (m.fd >= 0)
                        (void) close(m.fd);
                shmz_msg_release(p, &m);
                if (r < 0)
                        break;
        }
        shmz_port_close(p);
        shmz_disconnect(c);
        printf("done %s\n", strerror(-r));
        return r == -EPIPE ? 0 : 1;
}
