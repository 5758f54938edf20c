/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * ports/ and segments/ of the FUSE view, and shmzctl's ports and segments,
 * against a real shmzoned and a real mount: a listener in this process (root),
 * a connector in a child process of another uid (nobody) that sends through a
 * segment, both through the library. The view must show the listener, the
 * connection and the segment with the right owners and figures, the segment
 * file must hold exactly the bytes of the sender's mapping, nothing may be
 * changed, and everything must go when the processes let go.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <inttypes.h>
#include <json-c/json.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "port.h"
#include "shmzone-abi.h"
#include "shmzone.h"
#include "util.h"

#define NOBODY 65534
#define OTHER 4242 /* a uid that owns nothing here */
#define MSG_SIZE 100000u
#define SEC INT64_C(1000000000)

static struct daemon_proc d;

static void start(void) {
        (void) unsetenv("SHMZONE_SOCKET");
        harness_init(&d, "[daemon]\nmemory_budget = 64M\nuid_quota = 32M\n");
        cr_assert_eq(harness_start(&d, NULL, true), 0, "daemon did not start: %s", harness_log(&d));
}

/* Whether one line of out is exactly s (ids are short numbers: a substring proves nothing). */
static bool has_line(const char *out, const char *s) {
        size_t n = strlen(s);

        for (const char *p = out; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL)
                if (strncmp(p, s, n) == 0 && (p[n] == '\n' || p[n] == '\0'))
                        return true;
        return false;
}

/* Exit 0, and nothing from the sanitizers: the daemon leaked nothing of what the test made. */
static void stop(void) {
        harness_stop_clean(&d);
}

TestSuite(portview, .init = start, .fini = stop, .timeout = 120);

/* Runs a shell command; its stdout (NUL-terminated) in out; returns the exit status. */
_printf_(3, 4) static int run(char *out, size_t size, const char *fmt, ...) {
        char cmd[4096], sink[4096];
        size_t n;
        va_list ap;
        FILE *p;
        int st;

        va_start(ap, fmt);
        vsnprintf(cmd, sizeof(cmd), fmt, ap);
        va_end(ap);
        p = popen(cmd, "re");
        cr_assert_not_null(p);
        if (out) {
                n = fread(out, 1, size - 1, p);
                out[n] = 0;
        }
        while (fread(sink, 1, sizeof(sink), p) > 0)
                ;
        st = pclose(p);
        return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

_printf_(1, 2) static const char *mpath(const char *fmt, ...) {
        static char buf[4][512];
        static int i;
        char rel[256];
        va_list ap;

        i = (i + 1) % 4;
        va_start(ap, fmt);
        vsnprintf(rel, sizeof(rel), fmt, ap);
        va_end(ap);
        snprintf(buf[i], sizeof(buf[i]), "%s/%s", d.mount, rel);
        return buf[i];
}

/* Waits (up to 5 s) until path exists (want true) or is gone. */
static bool wait_path(const char *path, bool want) {
        for (int i = 0; i < 500; i++) {
                struct stat st;
                bool there = stat(path, &st) == 0;

                if (there == want)
                        return true;
                usleep(10000);
        }
        return false;
}

static uint64_t xattr_u64(const char *path, const char *name) {
        char buf[64];
        ssize_t n = getxattr(path, name, buf, sizeof(buf) - 1);

        cr_assert_gt(n, 0, "getxattr %s %s: %s", path, name, strerror(errno));
        buf[n] = 0;
        return strtoull(buf, NULL, 10);
}

/* The number after key at the start of a line of text ("key   value"), or UINT64_MAX. */
static uint64_t text_value(const char *text, const char *key) {
        size_t k = strlen(key);

        for (const char *p = text; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL)
                if (strncmp(p, key, k) == 0 && (p[k] == ' ' || p[k] == '\t'))
                        return strtoull(p + k, NULL, 10);
        return UINT64_MAX;
}

/* A side's line of a port file: pid uid messages bytes chunks_in_flight. */
static void port_side(const char *text, const char *side, uint64_t ret[5]) {
        size_t k = strlen(side);

        for (const char *p = text; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL)
                if (strncmp(p, side, k) == 0 && p[k] == ' ') {
                        cr_assert_eq(sscanf(p + k, "%" SCNu64 " %" SCNu64 " %" SCNu64 " %" SCNu64 " %" SCNu64, &ret[0],
                                            &ret[1], &ret[2], &ret[3], &ret[4]),
                                     5, "%s", text);
                        return;
                }
        cr_assert_fail("no %s line in %s", side, text);
}

struct seg_find {
        pid_t owner;
        struct shmz_msg_segment_info si;
        int n;
};

static int find_segment(const struct shmz_msg_segment_info *si, void *userdata) {
        struct seg_find *f = userdata;

        if ((pid_t) si->owner_pid == f->owner) {
                f->si = *si;
                f->n++;
        }
        return 0;
}

struct port_find {
        uint64_t port_id;
        int listeners, ports;
};

static int find_port(const struct shmz_msg_port_info *pi, void *userdata) {
        struct port_find *f = userdata;

        if (!streq(pi->name, "echo"))
                return 0;
        if (pi->port_id == 0)
                f->listeners++;
        else {
                f->ports++;
                f->port_id = pi->port_id;
        }
        return 0;
}

/* ---- the connector: a child of another uid ---------------------------------------------------------- */

/*
 * Steps, each started by a byte from the parent and answered with one
 * (0 = done, else the line number of the failure):
 *   'c' connect to "echo" and fill a shmz_port_buf() of MSG_SIZE;
 *   'm' compare segments/<id> with the mapping around that buffer;
 *   's' send it;  'q' close the port and exit.
 */
#define CHECK(x)                                                                                                       \
        do {                                                                                                           \
                if (!(x)) {                                                                                            \
                        fprintf(stderr, "child: %s failed (line %d)\n", #x, __LINE__);                                 \
                        return 1;                                                                                      \
                }                                                                                                      \
        } while (0)

/* A whole file, without criterion (the child may not assert). NULL on error. */
static void *child_slurp(const char *path, size_t *ret_len) {
        size_t cap = 1 << 16, len = 0;
        char *buf = malloc(cap);
        int fd = open(path, O_RDONLY | O_CLOEXEC);

        if (!buf || fd < 0)
                goto fail;
        for (;;) {
                ssize_t n;

                if (len == cap) {
                        char *nb = realloc(buf, cap * 2);

                        if (!nb)
                                goto fail;
                        buf = nb;
                        cap *= 2;
                }
                n = read(fd, buf + len, cap - len);
                if (n < 0)
                        goto fail;
                if (n == 0)
                        break;
                len += (size_t) n;
        }
        close(fd);
        *ret_len = len;
        return buf;
fail:
        fprintf(stderr, "child: reading %s: %s\n", path, strerror(errno));
        if (fd >= 0)
                close(fd);
        free(buf);
        return NULL;
}

/* The mapping of this process that holds p: its start and length, from /proc/self/maps. */
static int mapping_of(const void *p, uintptr_t *ret_start, size_t *ret_len) {
        char line[512];
        FILE *f = fopen("/proc/self/maps", "re");
        int r = -ENOENT;

        if (!f)
                return -errno;
        while (fgets(line, sizeof(line), f)) {
                uintptr_t a, b;

                if (sscanf(line, "%" SCNxPTR "-%" SCNxPTR, &a, &b) == 2 && (uintptr_t) p >= a && (uintptr_t) p < b) {
                        *ret_start = a;
                        *ret_len = b - a;
                        r = 0;
                        break;
                }
        }
        fclose(f);
        return r;
}

static int child_step(struct shmz_client *c, struct shmz_port **p, void **buf, char step) {
        switch (step) {
        case 'c':
                CHECK(shmz_port_connect(c, "echo", p) == 0);
                *buf = shmz_port_buf(*p, MSG_SIZE);
                CHECK(*buf);
                for (size_t i = 0; i < MSG_SIZE; i++)
                        ((unsigned char *) *buf)[i] = (unsigned char) (i * 7 + 3);
                return 0;
        case 'm': {
                struct seg_find f = { .owner = getpid() };
                uintptr_t start = 0;
                size_t len = 0, flen = 0;
                _cleanup_free_ void *file = NULL;
                char path[512];

                CHECK(shmz_segment_list(c, find_segment, &f) == 0);
                CHECK(f.n == 1);
                /* The segment is mapped whole; the buffer lies in it. */
                CHECK(mapping_of(*buf, &start, &len) == 0);
                CHECK(len == f.si.map_size);
                snprintf(path, sizeof(path), "%s/segments/%" PRIu64, d.mount, f.si.id);
                file = child_slurp(path, &flen);
                CHECK(file);
                CHECK(flen == len);
                CHECK(memcmp(file, (const void *) start, len) == 0);
                /* The header is the daemon's: its magic and id. */
                CHECK(((const struct shmz_segment_header *) file)->magic == SHMZ_SEGMENT_MAGIC);
                CHECK(((const struct shmz_segment_header *) file)->id == f.si.id);
                return 0;
        }
        case 's': {
                struct shmz_msg m = { .type = 7, .data = *buf, .size = MSG_SIZE, .fd = -1 };

                CHECK(shmz_port_send(*p, &m, 5 * SEC) == 0);
                *buf = NULL;
                return 0;
        }
        case 'q':
                shmz_port_close(*p);
                *p = NULL;
                return 0;
        }
        return 1;
}

static void child_main(int in, int out) {
        struct shmz_client *c = NULL;
        struct shmz_port *p = NULL;
        void *buf = NULL;
        char step;
        unsigned char res;

        if (setgroups(0, NULL) < 0 || setgid(NOBODY) < 0 || setuid(NOBODY) < 0)
                _exit(100);
        if (shmz_connect(d.socket, &c) < 0)
                _exit(101);
        while (read(in, &step, 1) == 1) {
                res = (unsigned char) child_step(c, &p, &buf, step);
                if (write(out, &res, 1) != 1)
                        _exit(102);
                if (step == 'q' || res != 0)
                        break;
        }
        shmz_port_close(p);
        shmz_disconnect(c);
        _exit(0);
}

struct child {
        pid_t pid;
        int to, from;
};

static void child_start(struct child *ch) {
        int a[2], b[2];

        cr_assert_eq(pipe2(a, O_CLOEXEC), 0);
        cr_assert_eq(pipe2(b, O_CLOEXEC), 0);
        ch->pid = fork();
        cr_assert_geq(ch->pid, 0);
        if (ch->pid == 0) {
                close(a[1]);
                close(b[0]);
                child_main(a[0], b[1]);
        }
        close(a[0]);
        close(b[1]);
        ch->to = a[1];
        ch->from = b[0];
}

static void child_do(struct child *ch, char step) {
        unsigned char res = 0xff;

        cr_assert_eq(write(ch->to, &step, 1), 1);
        cr_assert_eq(read(ch->from, &res, 1), 1, "the child died at step %c", step);
        cr_assert_eq(res, 0, "child step %c failed (its line is on stderr)", step);
}

static void child_end(struct child *ch) {
        int st = 0;

        close(ch->to);
        close(ch->from);
        cr_assert_eq(waitpid(ch->pid, &st, 0), ch->pid);
        cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %d", st);
}

/* ---- tests ----------------------------------------------------------------------------------------- */

static int try_open_segment(void *userdata) {
        int fd = open(userdata, O_RDONLY | O_CLOEXEC);

        if (fd >= 0)
                return 0;
        return errno == EACCES ? 1 : 2;
}

Test(portview, listener_connection_segment) {
        struct shmz_client *c = harness_connect(&d);
        struct shmz_listener *l = NULL;
        struct shmz_port *pa = NULL;
        struct shmz_msg m;
        struct port_find pf = {};
        struct seg_find sf = {};
        struct child ch;
        struct stat st;
        char out[16384], id[32], sid[32];
        char seg[512], pfile[512]; /* mpath() rotates its buffers */
        int fd;

        cr_assert_not_null(c);
        /* Empty at first. */
        cr_assert_eq(run(out, sizeof(out), "ls -A %s/ports %s/segments", d.mount, d.mount), 0);
        cr_assert(!strstr(out, "echo"), "%s", out);

        cr_assert_eq(shmz_port_listen(c, "echo", 0666, &l), 0);
        cr_assert(wait_path(mpath("ports/echo"), true));
        cr_assert_eq(run(out, sizeof(out), "ls %s/ports", d.mount), 0);
        cr_assert_str_eq(out, "echo\n");
        cr_assert_eq(stat(mpath("ports/echo"), &st), 0);
        cr_assert(S_ISDIR(st.st_mode));
        cr_assert_eq(st.st_mode & 07777, 0777, "0666 listener: rw plus x where r: %o", st.st_mode);
        cr_assert_eq(st.st_uid, 0);
        cr_assert_eq(stat(mpath("ports"), &st), 0);
        cr_assert_eq(st.st_nlink, 3, "ports/ counts its subdirectory");
        cr_assert_eq(run(out, sizeof(out), "ls -A %s/ports/echo", d.mount), 0);
        cr_assert_str_eq(out, "");

        /* A connector of another uid, in another process; it claims chunks of a new segment of its side. */
        child_start(&ch);
        child_do(&ch, 'c');
        cr_assert_eq(shmz_port_accept(l, 5 * SEC, &pa), 0);

        cr_assert_eq(shmz_port_list(c, find_port, &pf), 0);
        cr_assert_eq(pf.listeners, 1);
        cr_assert_eq(pf.ports, 1);
        snprintf(id, sizeof(id), "%" PRIu64, pf.port_id);
        snprintf(pfile, sizeof(pfile), "%s", mpath("ports/echo/%s", id));
        cr_assert_eq(run(out, sizeof(out), "ls %s/ports/echo", d.mount), 0);
        cr_assert_eq(strncmp(out, id, strlen(id)), 0, "%s vs %s", out, id);
        cr_assert_eq(stat(pfile, &st), 0);
        cr_assert(S_ISREG(st.st_mode));
        cr_assert_eq(st.st_mode & 07777, 0444);
        cr_assert_eq(st.st_uid, 0, "owned by the acceptor");
        cr_assert_eq(run(out, sizeof(out), "cat %s", pfile), 0);
        {
                uint64_t cs[5], as[5];

                cr_assert_eq(text_value(out, "port_id"), pf.port_id, "%s", out);
                cr_assert(strstr(out, "listener echo\n"), "%s", out);
                port_side(out, "connector", cs);
                port_side(out, "acceptor", as);
                cr_assert(cs[0] == (uint64_t) ch.pid && cs[1] == NOBODY && cs[2] == 0, "%s", out);
                cr_assert(as[0] == (uint64_t) getpid() && as[1] == 0, "%s", out);
                cr_assert_eq((size_t) st.st_size, strlen(out), "st_size is the text's");
        }
        /* Names that are no port of this listener. */
        cr_assert_neq(stat(mpath("ports/echo/0%s", id), &st), 0);
        cr_assert_neq(stat(mpath("ports/echo/999999"), &st), 0);
        cr_assert_neq(stat(mpath("ports/nosuch"), &st), 0);

        /* The segment: listed, its owner the sender, its size the memfd's. */
        sf.owner = ch.pid;
        cr_assert_eq(shmz_segment_list(c, find_segment, &sf), 0);
        cr_assert_eq(sf.n, 1);
        cr_assert_eq(sf.si.port_id, pf.port_id);
        cr_assert_eq(sf.si.side, SHMZ_PORT_SIDE_CONNECTOR);
        snprintf(sid, sizeof(sid), "%" PRIu64, sf.si.id);
        snprintf(seg, sizeof(seg), "%s", mpath("segments/%s", sid));
        cr_assert_eq(run(out, sizeof(out), "ls %s/segments", d.mount), 0);
        cr_assert(has_line(out, sid), "%s", out);
        cr_assert_eq(stat(seg, &st), 0);
        cr_assert(S_ISREG(st.st_mode));
        cr_assert_eq(st.st_mode & 07777, 0440);
        cr_assert_eq(st.st_uid, NOBODY);
        cr_assert_eq(st.st_gid, NOBODY);
        cr_assert_eq((uint64_t) st.st_size, sf.si.map_size);
        cr_assert_eq(sf.si.map_size, SHMZ_SEGMENT_HEADER_SIZE + (uint64_t) sf.si.n_chunks * sf.si.chunk_size);

        /* xattrs: owner, port, chunks: the buffer holds ceil(MSG_SIZE / chunk_size). */
        {
                uint64_t want = (MSG_SIZE + sf.si.chunk_size - 1) / sf.si.chunk_size;
                char names[512];
                ssize_t n = listxattr(seg, names, sizeof(names));

                cr_assert_gt(n, 0);
                cr_assert_eq(xattr_u64(seg, "user.shmz.owner_pid"), (uint64_t) ch.pid);
                cr_assert_eq(xattr_u64(seg, "user.shmz.port"), pf.port_id);
                cr_assert_eq(xattr_u64(seg, "user.shmz.chunks_used"), want);
                cr_assert_eq(xattr_u64(seg, "user.shmz.chunks_free"), sf.si.n_chunks - want);
                cr_assert(memmem(names, (size_t) n, "user.shmz.chunks_free", 22), "listxattr");
                cr_assert_eq(getxattr(seg, "user.shmz.nosuch", out, sizeof(out)), -1);
                cr_assert_eq(errno, ENODATA);
        }

        /* The sender compares the file with its own mapping of the segment, byte for byte. */
        child_do(&ch, 'm');
        /* The mode is the kernel's to enforce: another uid may not read it (root and the owner may). */
        cr_assert_eq(harness_run_as(OTHER, OTHER, try_open_segment, (void *) seg), 1, "0440 refuses others");
        cr_assert_eq(harness_run_as(NOBODY, NOBODY, try_open_segment, (void *) seg), 0, "the owner reads it");

        /* Nothing in there changes. */
        cr_assert_neq(chmod(seg, 0444), 0);
        cr_assert_eq(errno, EPERM);
        cr_assert_neq(chmod(pfile, 0644), 0);
        cr_assert_eq(errno, EPERM);
        cr_assert_neq(chmod(mpath("ports/echo"), 0700), 0);
        cr_assert_eq(errno, EPERM);
        cr_assert_neq(chown(seg, 0, 0), 0);
        cr_assert_neq(setxattr(seg, "user.shmz.port", "1", 1, 0), 0);
        cr_assert_eq(errno, EPERM);
        cr_assert_eq(open(seg, O_WRONLY | O_CLOEXEC), -1);
        cr_assert_eq(open(pfile, O_RDWR | O_CLOEXEC), -1);
        cr_assert_neq(unlink(seg), 0);
        cr_assert_neq(unlink(pfile), 0);
        cr_assert_neq(mkdir(mpath("ports/new"), 0755), 0);

        /* Sent and received: the figures move, the chunks come back on release. */
        child_do(&ch, 's');
        cr_assert_eq(shmz_port_recv(pa, &m, 5 * SEC), 0);
        cr_assert_eq(m.size, MSG_SIZE);
        cr_assert_eq(((unsigned char *) m.data)[12345], (unsigned char) (12345 * 7 + 3));
        cr_assert_eq(run(out, sizeof(out), "cat %s", pfile), 0);
        {
                uint64_t cs[5];

                port_side(out, "connector", cs);
                cr_assert(cs[2] == 1 && cs[3] == MSG_SIZE && cs[4] > 0, "sent, not released yet: %s", out);
        }
        cr_assert_gt(xattr_u64(seg, "user.shmz.chunks_used"), 0);
        shmz_msg_release(pa, &m);
        cr_assert_eq(xattr_u64(seg, "user.shmz.chunks_used"), 0);
        cr_assert_eq(xattr_u64(seg, "user.shmz.chunks_free"), sf.si.n_chunks);

        /* status and metrics count them. */
        cr_assert_eq(run(out, sizeof(out), "cat %s/status", d.mount), 0);
        cr_assert_eq(text_value(out, "listeners"), 1, "%s", out);
        cr_assert_eq(text_value(out, "ports"), 1, "%s", out);
        cr_assert_eq(text_value(out, "segments"), 1, "%s", out);
        cr_assert_eq(text_value(out, "chunks"), sf.si.n_chunks, "%s", out);
        cr_assert_eq(text_value(out, "chunks_used"), 0, "%s", out);
        cr_assert_eq(text_value(out, "messages_total"), 1, "%s", out);
        cr_assert_eq(run(out, sizeof(out), "cat %s/metrics", d.mount), 0);
        {
                char want[128];

                cr_assert(strstr(out, "\nshmzone_ports 1\n") && strstr(out, "\nshmzone_listeners 1\n") &&
                                  strstr(out, "\nshmzone_segments 1\n") && strstr(out, "\nshmzone_chunks_used 0\n") &&
                                  strstr(out, "\nshmzone_messages_total 1\n") &&
                                  strstr(out, "# TYPE shmzone_chunks_used gauge\n"),
                          "%s", out);
                snprintf(want, sizeof(want), "\nshmzone_chunks %u\n", sf.si.n_chunks);
                cr_assert(strstr(out, want), "%s", out);
        }

        /* An open file of the segment outlives the port: it reads on, with no link left. */
        fd = open(seg, O_RDONLY | O_CLOEXEC);
        cr_assert_geq(fd, 0);
        child_do(&ch, 'q');
        child_end(&ch);
        shmz_port_close(pa);
        cr_assert(wait_path(pfile, false), "ports/echo/<id> goes with the port");
        cr_assert(wait_path(seg, false), "segments/<id> goes with the port");
        cr_assert_eq(fstat(fd, &st), 0);
        cr_assert_eq(st.st_nlink, 0);
        cr_assert_eq((uint64_t) st.st_size, sf.si.map_size);
        {
                struct shmz_segment_header h;

                cr_assert_eq(pread(fd, &h, sizeof(h), 0), (ssize_t) sizeof(h));
                cr_assert_eq(h.magic, SHMZ_SEGMENT_MAGIC);
        }
        close(fd);
        cr_assert_eq(run(out, sizeof(out), "ls -A %s/segments", d.mount), 0);
        cr_assert(!has_line(out, sid), "%s", out);
        cr_assert_eq(run(out, sizeof(out), "ls -A %s/ports/echo", d.mount), 0);
        cr_assert(!has_line(out, id), "%s", out);

        shmz_listener_close(l);
        cr_assert(wait_path(mpath("ports/echo"), false), "ports/echo goes with its listener");
        cr_assert_eq(run(out, sizeof(out), "cat %s/status", d.mount), 0);
        cr_assert(text_value(out, "listeners") == 0 && text_value(out, "ports") == 0 &&
                          text_value(out, "segments") == 0,
                  "%s", out);
        /* Counters never go down: the ended port's messages stay counted (a fall would read as a restart). */
        cr_assert_eq(text_value(out, "messages_total"), 1, "%s", out);
        cr_assert_eq(text_value(out, "message_bytes_total"), MSG_SIZE, "%s", out);
        cr_assert_eq(text_value(out, "ports_closed_total"), 1, "%s", out);
        cr_assert_eq(run(out, sizeof(out), "cat %s/metrics", d.mount), 0);
        cr_assert(strstr(out, "\nshmzone_messages_total 1\n") && strstr(out, "\nshmzone_ports_closed_total 1\n"), "%s",
                  out);
        shmz_disconnect(c);
}

/* A listener's mode is its directory's: 0600 hides its connections from other uids. */
static int list_dir(void *userdata) {
        char out[4096];

        return run(out, sizeof(out), "ls %s 2>/dev/null", (const char *) userdata) == 0 ? 0 : 1;
}

Test(portview, listener_mode_and_owner) {
        struct shmz_client *c = harness_connect(&d);
        struct shmz_listener *l = NULL;
        struct stat st;

        cr_assert_not_null(c);
        cr_assert_eq(shmz_port_listen(c, "private", 0600, &l), 0);
        cr_assert(wait_path(mpath("ports/private"), true));
        cr_assert_eq(stat(mpath("ports/private"), &st), 0);
        cr_assert_eq(st.st_mode & 07777, 0700);
        cr_assert_eq(harness_run_as(OTHER, OTHER, list_dir, (void *) mpath("ports/private")), 1);
        cr_assert_eq(list_dir((void *) mpath("ports/private")), 0);
        shmz_listener_close(l);
        cr_assert(wait_path(mpath("ports/private"), false));
        shmz_disconnect(c);
}

/* shmzctl: tables, JSON, show, exit codes. */
/* What the metrics say, read from the view's status file (name without the shmzone_ prefix). */
static uint64_t status_value(const char *key) {
        char out[16384];

        cr_assert_eq(run(out, sizeof(out), "cat %s/status", d.mount), 0);
        return text_value(out, key);
}

/*
 * The channel's figures are the peers' to write: a peer that lowers them, or a
 * port that ends, never makes messages_total fall.
 */
Test(portview, counters_never_fall) {
        struct shmz_client *c = harness_connect(&d);
        struct shmz_listener *l = NULL;
        struct shmz_port *pc = NULL, *pa = NULL;
        struct shmz_channel *ch;
        char data[100] = "hello";

        cr_assert_not_null(c);
        cr_assert_eq(shmz_port_listen(c, "count", 0600, &l), 0);
        cr_assert_eq(shmz_port_connect(c, "count", &pc), 0);
        cr_assert_eq(shmz_port_accept(l, 5 * SEC, &pa), 0);
        for (int i = 0; i < 10; i++) {
                struct shmz_msg m = { .type = 1, .data = data, .size = sizeof(data), .fd = -1 };

                cr_assert_eq(shmz_port_send(pc, &m, 5 * SEC), 0);
                cr_assert_eq(shmz_port_recv(pa, &m, 5 * SEC), 0);
                shmz_msg_release(pa, &m);
        }
        cr_assert_eq(status_value("messages_total"), 10);
        cr_assert_eq(status_value("message_bytes_total"), 1000);
        /* A hostile sender rewinds its figures: the daemon keeps what it read before. */
        ch = port_channel(pc);
        __atomic_store_n(&ch->dir[SHMZ_PORT_SIDE_CONNECTOR].messages, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&ch->dir[SHMZ_PORT_SIDE_CONNECTOR].bytes, 0, __ATOMIC_RELAXED);
        cr_assert_eq(status_value("messages_total"), 10);
        cr_assert_eq(status_value("message_bytes_total"), 1000);
        /* The port ends: its messages stay counted. */
        shmz_port_close(pc);
        shmz_port_close(pa);
        for (int i = 0; i < 500 && status_value("ports") != 0; i++)
                usleep(10000);
        cr_assert_eq(status_value("ports"), 0);
        cr_assert_eq(status_value("messages_total"), 10);
        cr_assert_eq(status_value("message_bytes_total"), 1000);
        cr_assert_eq(status_value("ports_closed_total"), 1);
        shmz_listener_close(l);
        shmz_disconnect(c);
}

Test(portview, shmzctl) {
        const char *ctl = getenv("SHMZCTL");
        struct shmz_client *c = harness_connect(&d);
        struct shmz_listener *l = NULL;
        struct shmz_port *pc = NULL, *pa = NULL;
        struct shmz_msg m = { .type = 1, .fd = -1 };
        struct seg_find sf = { .owner = getpid() };
        struct json_object *j, *a, *o;
        char out[16384], want[64];
        void *buf;

        cr_assert_not_null(ctl);
        cr_assert_not_null(c);
        cr_assert_eq(shmz_port_listen(c, "svc", 0660, &l), 0);
        cr_assert_eq(shmz_port_connect(c, "svc", &pc), 0);
        cr_assert_eq(shmz_port_accept(l, 5 * SEC, &pa), 0);
        buf = shmz_port_buf(pc, 8192);
        cr_assert_not_null(buf);
        memset(buf, 'x', 8192);
        m.data = buf;
        m.size = 8192;
        cr_assert_eq(shmz_port_send(pc, &m, 5 * SEC), 0);
        cr_assert_eq(shmz_segment_list(c, find_segment, &sf), 0);
        cr_assert_eq(sf.n, 1);

        cr_assert_eq(run(out, sizeof(out), "%s -s %s ports", ctl, d.socket), 0, "%s", out);
        cr_assert(strstr(out, "NAME") && strstr(out, "svc") && strstr(out, "0660"), "%s", out);
        cr_assert_eq(run(out, sizeof(out), "%s -s %s ports --names", ctl, d.socket), 0);
        cr_assert_str_eq(out, "svc\n");
        cr_assert_eq(run(out, sizeof(out), "%s -s %s port show svc", ctl, d.socket), 0);
        cr_assert(strstr(out, "name: svc\n") && strstr(out, "mode: 0660\n") && strstr(out, "connections: 1\n"), "%s",
                  out);

        cr_assert_eq(run(out, sizeof(out), "%s -s %s ports --json", ctl, d.socket), 0);
        j = json_tokener_parse(out);
        cr_assert_not_null(j, "%s", out);
        cr_assert(json_object_object_get_ex(j, "listeners", &a) && json_object_array_length(a) == 1);
        o = json_object_array_get_idx(a, 0);
        cr_assert_str_eq(json_object_get_string(json_object_object_get(o, "name")), "svc");
        cr_assert_str_eq(json_object_get_string(json_object_object_get(o, "mode")), "0660");
        cr_assert(json_object_object_get_ex(j, "ports", &a) && json_object_array_length(a) == 1);
        o = json_object_array_get_idx(a, 0);
        cr_assert_eq(json_object_get_int64(json_object_object_get(json_object_object_get(o, "connector"), "pid")),
                     getpid());
        cr_assert_eq(json_object_get_uint64(json_object_object_get(json_object_object_get(o, "connector"), "bytes")),
                     8192);
        json_object_put(j);

        cr_assert_eq(run(out, sizeof(out), "%s -s %s segments", ctl, d.socket), 0);
        snprintf(want, sizeof(want), "%-8" PRIu64 " ", sf.si.id);
        cr_assert(strstr(out, "CHUNK_SIZE") && strstr(out, want) && strstr(out, "connector"), "%s", out);
        cr_assert_eq(run(out, sizeof(out), "%s -s %s segments --names", ctl, d.socket), 0);
        snprintf(want, sizeof(want), "%" PRIu64 "\n", sf.si.id);
        cr_assert_str_eq(out, want);
        cr_assert_eq(run(out, sizeof(out), "%s -s %s segment show %" PRIu64 " --json", ctl, d.socket, sf.si.id), 0);
        j = json_tokener_parse(out);
        cr_assert_not_null(j, "%s", out);
        cr_assert_eq(json_object_get_uint64(json_object_object_get(j, "id")), sf.si.id);
        cr_assert_eq(json_object_get_uint64(json_object_object_get(j, "map_size")), sf.si.map_size);
        cr_assert_eq(json_object_get_int64(json_object_object_get(j, "owner_pid")), getpid());
        json_object_put(j);
        cr_assert_eq(run(out, sizeof(out), "%s -s %s segment show %" PRIu64, ctl, d.socket, sf.si.id), 0);
        snprintf(want, sizeof(want), "id: %" PRIu64 "\n", sf.si.id);
        cr_assert(strstr(out, want) && strstr(out, "side: connector\n"), "%s", out);

        /* Exit codes: 3 not found, 2 usage. */
        cr_assert_eq(run(NULL, 0, "%s -s %s port show nosuch 2>/dev/null", ctl, d.socket), 3);
        cr_assert_eq(run(NULL, 0, "%s -s %s segment show 999999 2>/dev/null", ctl, d.socket), 3);
        cr_assert_eq(run(NULL, 0, "%s -s %s segment show abc 2>/dev/null", ctl, d.socket), 2);
        cr_assert_eq(run(NULL, 0, "%s -s %s segment show 2>/dev/null", ctl, d.socket), 2);
        cr_assert_eq(run(NULL, 0, "%s -s %s port svc 2>/dev/null", ctl, d.socket), 2);

        /* status grew the port figures. */
        cr_assert_eq(run(out, sizeof(out), "%s -s %s status --json", ctl, d.socket), 0);
        j = json_tokener_parse(out);
        cr_assert_not_null(j, "%s", out);
        cr_assert_eq(json_object_get_uint64(json_object_object_get(j, "listeners")), 1);
        cr_assert_eq(json_object_get_uint64(json_object_object_get(j, "ports")), 1);
        cr_assert_eq(json_object_get_uint64(json_object_object_get(j, "segments")), 1);
        json_object_put(j);

        /* Completion: "port show <TAB>" offers the names, "segment show <TAB>" the ids. */
        snprintf(out, sizeof(out), "%s.bash", ctl);
        if (access(out, R_OK) == 0 && access("/bin/bash", X_OK) == 0) {
                cr_assert_eq(run(out, sizeof(out),
                                 "PATH=$(dirname %s):$PATH bash -c 'source %s.bash && COMP_WORDS=(shmzctl --socket %s "
                                 "port show s) && COMP_CWORD=5 && _shmzctl && echo \"${COMPREPLY[@]}\" && "
                                 "COMP_WORDS=(shmzctl --socket %s segment s) && COMP_CWORD=4 && _shmzctl && "
                                 "echo \"${COMPREPLY[@]}\"' 2>&1",
                                 ctl, ctl, d.socket, d.socket),
                             0, "%s", out);
                cr_assert_str_eq(out, "svc\nshow\n");
        }

        cr_assert_eq(shmz_port_recv(pa, &m, 5 * SEC), 0);
        shmz_msg_release(pa, &m);
        shmz_port_close(pc);
        shmz_port_close(pa);
        shmz_listener_close(l);
        shmz_disconnect(c);
}

int main(int argc, char *argv[]) {
        return harness_main(argc, argv, true, true);
}
