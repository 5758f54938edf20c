/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <grp.h>
#include <inttypes.h>
#include <ini.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdio.h>

#include "conf-file.h"
#include "log.h"
#include "shmzone.h"

#define DEFAULT_BUDGET (UINT64_C(1) << 30)
#define DEFAULT_QUOTA (UINT64_C(256) << 20)
#define DEFAULT_MAX_ZONES 4096u
/* Each connection costs an fd and a bounded queue of replies (worker.c). */
#define DEFAULT_MAX_CLIENTS 4096u
#define DEFAULT_UID_MAX_CLIENTS 256u
#define DEFAULT_HELLO_TIMEOUT 10u
#define MAX_THREADS 64u
/* Ports: segments of 64 chunks of 64 KiB (4 MiB, the largest message), 64 MiB per direction of a port. */
#define DEFAULT_CHUNK_SIZE (UINT32_C(64) << 10)
#define DEFAULT_SEGMENT_CHUNKS 64u
#define DEFAULT_PORT_MEMORY (UINT64_C(64) << 20)
#define DEFAULT_MAX_PORTS_PER_UID 256u
#define DEFAULT_PORT_BACKLOG 64u
/* Connections of one uid to one published name: what one user can make a service hold for it. */
#define DEFAULT_PORT_UID_CONNECTIONS 64u
#define MAX_CHUNK_SIZE (UINT64_C(64) << 20)
#define MAX_SEGMENT_BYTES (UINT64_C(1) << 30)
#define MAX_PORT_MEMORY (UINT64_C(64) << 30)
/* Segments of all ports, and of one uid's sending sides: what a local user can make the host give. */
#define DEFAULT_SEGMENT_MEMORY (UINT64_C(4) << 30)
#define DEFAULT_UID_SEGMENT_MEMORY (UINT64_C(1) << 30)

/* A hostile file cannot make us keep more errors than this; the rest are counted. */
#define MAX_ERRORS 64u

struct parse_error {
        unsigned line;
        char msg[256];
};

struct parse_state {
        struct config *cfg;
        FILE *f;
        const char *path;
        unsigned line;         /* counted by our reader: inih does not tell handlers */
        unsigned ports_line;   /* the last key of [daemon] that check_ports() weighs */
        unsigned section_line; /* where the last section header was */
        struct parse_error errors[MAX_ERRORS];
        unsigned n_errors, n_dropped;
        bool oom;
        char section[256];
        struct zone_decl *zone; /* the zone section being read */
        unsigned zone_line;
        struct port_decl *port; /* the port section being read */
        bool zone_size_seen;
};

int config_new_default(struct config **ret) {
        struct config *c;

        c = calloc(1, sizeof(*c));
        if (!c)
                return -ENOMEM;
        c->socket_path = strdup(SHMZ_DEFAULT_SOCKET);
        c->mount_path = strdup(SHMZ_DEFAULT_MOUNT);
        if (!c->socket_path || !c->mount_path) {
                config_free(c);
                return -ENOMEM;
        }
        c->limits.budget = DEFAULT_BUDGET;
        c->limits.quota = DEFAULT_QUOTA;
        c->limits.max_zones = DEFAULT_MAX_ZONES;
        c->max_clients = DEFAULT_MAX_CLIENTS;
        c->uid_max_clients = DEFAULT_UID_MAX_CLIENTS;
        c->hello_timeout = DEFAULT_HELLO_TIMEOUT;
        c->state_directory = strdup(SHMZ_DEFAULT_STATE_DIR);
        if (!c->state_directory) {
                config_free(c);
                return -ENOMEM;
        }
        c->ports = (struct ports_limits){
                .chunk_size = DEFAULT_CHUNK_SIZE,
                .segment_chunks = DEFAULT_SEGMENT_CHUNKS,
                .port_memory = DEFAULT_PORT_MEMORY,
                .max_ports_per_uid = DEFAULT_MAX_PORTS_PER_UID,
                .backlog = DEFAULT_PORT_BACKLOG,
                .uid_connections = DEFAULT_PORT_UID_CONNECTIONS,
                .segment_memory = DEFAULT_SEGMENT_MEMORY,
                .uid_segment_memory = DEFAULT_UID_SEGMENT_MEMORY,
        };
        *ret = c;
        return 0;
}

struct config *config_free(struct config *c) {
        if (!c)
                return NULL;
        free(c->socket_path);
        free(c->mount_path);
        free(c->state_directory);
        free(c->zones);
        free(c->port_decls);
        free(c);
        return NULL;
}

_printf_(2, 3) static int fail(struct parse_state *s, const char *fmt, ...);
/* Opens the section of a "[name]" line (the reader sees each one, keys or not). */
static void open_section(struct parse_state *s, const char *p);
/* A section that could not be opened: its keys are ignored. */
static void refuse_section(struct parse_state *s);

static char *reader(char *buf, int size, void *userdata) {
        struct parse_state *s = userdata;
        char *p = fgets(buf, size, s->f);
        size_t n;

        if (!p)
                return NULL;
        s->line++;
        n = strlen(p);
        /* inih would read a longer line in pieces, each taken for a line of its own. */
        if (n > 0 && p[n - 1] != '\n' && !feof(s->f)) {
                int ch;

                (void) fail(s, "line too long (at most %d bytes)", size - 2);
                while ((ch = fgetc(s->f)) != EOF && ch != '\n')
                        ;
                /* A section header that long is refused with its keys; they add no errors of their own. */
                if (p[strspn(p, " \t")] == '[')
                        refuse_section(s);
                return p;
        }
        /* inih reports only its first syntax error: every bad line is found here. */
        if (*p != ' ' && *p != '\t') {
                size_t k = strcspn(p, "\r\n");

                if (*p == '[' && !memchr(p, ']', k))
                        (void) fail(s, "syntax error: no ']' closes the section name");
                else if (k > 0 && *p != '[' && *p != ';' && *p != '#' && !memchr(p, '=', k) && !memchr(p, ':', k))
                        (void) fail(s, "syntax error: expected 'key = value'");
        }
        p += strspn(p, " \t");
        if (*p == '[') {
                s->section_line = s->line;
                open_section(s, p + 1);
        }
        return buf;
}

/* Records an error at the current line; every one is kept (up to MAX_ERRORS), not only the first. */
_printf_(2, 3) static int fail(struct parse_state *s, const char *fmt, ...) {
        struct parse_error *e;
        va_list ap;

        if (s->n_errors >= MAX_ERRORS) {
                s->n_dropped++;
                return 0;
        }
        e = &s->errors[s->n_errors++];
        e->line = s->line;
        va_start(ap, fmt);
        (void) vsnprintf(e->msg, sizeof(e->msg), fmt, ap);
        va_end(ap);
        return 0; /* inih: handler failed */
}

/* A user or group by number or by name. */
static int parse_id(const char *v, bool group, uint32_t *ret) {
        char buf[4096], *end;
        unsigned long n;

        errno = 0;
        n = strtoul(v, &end, 10);
        if (*v && *end == 0 && errno == 0 && n < UINT32_MAX) {
                *ret = (uint32_t) n;
                return 0;
        }
        if (group) {
                struct group gr, *p = NULL;

                if (getgrnam_r(v, &gr, buf, sizeof(buf), &p) != 0 || !p)
                        return -ENOENT;
                *ret = p->gr_gid;
        } else {
                struct passwd pw, *p = NULL;

                if (getpwnam_r(v, &pw, buf, sizeof(buf), &p) != 0 || !p)
                        return -ENOENT;
                *ret = p->pw_uid;
        }
        return 0;
}

/* 1, 0, or -EINVAL: the words a systemd unit takes for a boolean. */
static int parse_boolean(const char *v) {
        static const char *const yes[] = { "yes", "true", "on", "1" }, *const no[] = { "no", "false", "off", "0" };

        for (size_t i = 0; i < ELEMENTSOF(yes); i++) {
                if (streq(v, yes[i]))
                        return 1;
                if (streq(v, no[i]))
                        return 0;
        }
        return -EINVAL;
}

static int set_string(char **p, const char *v) {
        char *n = strdup(v);

        if (!n)
                return -ENOMEM;
        free(*p);
        *p = n;
        return 0;
}

static int daemon_key(struct parse_state *s, const char *key, const char *value) {
        struct config *c = s->cfg;
        uint64_t u;
        char *end;

        if (streq(key, "chunk_size") || streq(key, "segment_chunks") || streq(key, "port_memory") ||
            streq(key, "segment_memory") || streq(key, "uid_segment_memory"))
                s->ports_line = s->line;
        if (streq(key, "state_directory")) {
                if (value[0] != '/')
                        return fail(s, "state_directory must be an absolute path");
                return set_string(&c->state_directory, value) < 0 ? fail(s, "out of memory") : 1;
        }
        if (streq(key, "persist_interval")) {
                unsigned long n;

                errno = 0;
                n = strtoul(value, &end, 10);
                if (!*value || *end || errno || n > 86400)
                        return fail(s, "persist_interval must be a number of seconds from 0 (off) to 86400");
                c->persist_interval = (unsigned) n;
                return 1;
        }

        if (streq(key, "socket")) {
                if (value[0] != '/')
                        return fail(s, "socket must be an absolute path");
                return set_string(&c->socket_path, value) < 0 ? fail(s, "out of memory") : 1;
        }
        if (streq(key, "mount")) {
                if (streq(value, "no") || streq(value, "")) {
                        free(c->mount_path);
                        c->mount_path = NULL;
                        return 1;
                }
                if (value[0] != '/')
                        return fail(s, "mount must be an absolute path or \"no\"");
                return set_string(&c->mount_path, value) < 0 ? fail(s, "out of memory") : 1;
        }
        if (streq(key, "threads")) {
                unsigned long n;

                errno = 0;
                n = strtoul(value, &end, 10);
                if (!*value || *end || errno || n > MAX_THREADS)
                        return fail(s, "threads must be a number from 0 (automatic) to %u", MAX_THREADS);
                c->threads = (unsigned) n;
                return 1;
        }
        if (streq(key, "uid_max_zones") || streq(key, "max_clients") || streq(key, "uid_max_clients") ||
            streq(key, "hello_timeout")) {
                unsigned long long n, max = streq(key, "hello_timeout") ? 3600 : 1000000;

                errno = 0;
                n = strtoull(value, &end, 10);
                if (!*value || *end || errno || n == 0 || n > max)
                        return fail(s, "%s must be a number from 1 to %llu", key, max);
                if (streq(key, "max_clients"))
                        c->max_clients = (unsigned) n;
                else if (streq(key, "uid_max_clients"))
                        c->uid_max_clients = (unsigned) n;
                else if (streq(key, "hello_timeout"))
                        c->hello_timeout = (unsigned) n;
                else
                        c->limits.max_zones = n;
                return 1;
        }
        if (streq(key, "memory_budget") || streq(key, "uid_quota")) {
                if (parse_size(value, &u) < 0 || u == 0)
                        return fail(s, "%s: bad size '%s' (a number with an optional K, M, G or T suffix)", key, value);
                *(streq(key, "memory_budget") ? &c->limits.budget : &c->limits.quota) = u;
                return 1;
        }
        if (streq(key, "chunk_size")) {
                if (parse_size(value, &u) < 0 || u < 4096 || u > MAX_CHUNK_SIZE || (u & (u - 1)) != 0)
                        return fail(s, "chunk_size must be a power of two from 4K to 64M, not '%s'", value);
                c->ports.chunk_size = (uint32_t) u;
                return 1;
        }
        if (streq(key, "port_memory")) {
                if (parse_size(value, &u) < 0 || u == 0 || u > MAX_PORT_MEMORY)
                        return fail(
                                s,
                                "port_memory: bad size '%s' (a number with an optional K, M or G suffix, at most 64G)",
                                value);
                c->ports.port_memory = u;
                return 1;
        }
        if (streq(key, "segment_memory") || streq(key, "uid_segment_memory")) {
                if (parse_size(value, &u) < 0 || u == 0)
                        return fail(s, "%s: bad size '%s' (a number with an optional K, M, G or T suffix)", key, value);
                *(streq(key, "segment_memory") ? &c->ports.segment_memory : &c->ports.uid_segment_memory) = u;
                return 1;
        }
        if (streq(key, "segment_chunks") || streq(key, "max_ports_per_uid") || streq(key, "port_backlog") ||
            streq(key, "port_uid_connections")) {
                unsigned long long n, max = streq(key, "segment_chunks") ? SHMZ_SEGMENT_MAX_CHUNKS
                                            : streq(key, "port_backlog") ? 65536
                                                                         : 1000000;

                errno = 0;
                n = strtoull(value, &end, 10);
                if (!*value || *end || errno || n == 0 || n > max)
                        return fail(s, "%s must be a number from 1 to %llu", key, max);
                if (streq(key, "segment_chunks"))
                        c->ports.segment_chunks = (uint32_t) n;
                else if (streq(key, "port_backlog"))
                        c->ports.backlog = (uint32_t) n;
                else if (streq(key, "port_uid_connections"))
                        c->ports.uid_connections = (uint32_t) n;
                else
                        c->ports.max_ports_per_uid = (uint32_t) n;
                return 1;
        }
        return fail(s, "unknown key '%s' in [daemon]", key);
}

/* Keys that constrain each other, once all are read; reported at the last of them the file set. */
static void check_ports(struct parse_state *s) {
        const struct ports_limits *p = &s->cfg->ports;
        uint64_t seg = (uint64_t) p->chunk_size * p->segment_chunks;
        unsigned line = s->line;

        s->line = s->ports_line;
        if (seg > MAX_SEGMENT_BYTES)
                (void) fail(s, "chunk_size * segment_chunks = %" PRIu64 " bytes; a segment may have 1G at most", seg);
        else if (p->port_memory < seg)
                (void) fail(s,
                            "port_memory (%" PRIu64
                            ") must hold at least one segment (chunk_size * segment_chunks = %" PRIu64 ")",
                            p->port_memory, seg);
        else if (p->segment_memory < seg + SHMZ_SEGMENT_HEADER_SIZE ||
                 p->uid_segment_memory < seg + SHMZ_SEGMENT_HEADER_SIZE)
                (void) fail(s,
                            "segment_memory and uid_segment_memory must hold at least one segment (%" PRIu64
                            " bytes with its header)",
                            seg + SHMZ_SEGMENT_HEADER_SIZE);
        s->line = line;
}

/*
 * The keys zones and ports share, their owner and mode: the inih handler's
 * answer (1, or 0 with the error recorded), -ENOENT for any other key.
 */
static int owner_key(struct parse_state *s, const char *what, const char *name, const char *key, const char *value,
                     uint32_t *uid, uint32_t *gid, uint32_t *mode) {
        if (streq(key, "user"))
                return parse_id(value, false, uid) < 0 ? fail(s, "%s '%s': unknown user '%s'", what, name, value) : 1;
        if (streq(key, "group"))
                return parse_id(value, true, gid) < 0 ? fail(s, "%s '%s': unknown group '%s'", what, name, value) : 1;
        if (streq(key, "mode")) {
                unsigned long m;
                char *end;

                errno = 0;
                m = strtoul(value, &end, 8);
                if (!*value || *end || errno || m > 0777)
                        return fail(s, "%s '%s': mode must be octal, 0 to 0777", what, name);
                *mode = (uint32_t) m;
                return 1;
        }
        return -ENOENT;
}

static int zone_key(struct parse_state *s, const char *key, const char *value) {
        struct zone_decl *z = s->zone;
        int r;

        if (streq(key, "size")) {
                s->zone_size_seen = true; /* a bad one is its own error, not "has no size" as well */
                if (parse_size(value, &z->size) < 0 || z->size == 0)
                        return fail(s, "zone '%s': bad size '%s' (a number with an optional K, M, G or T suffix)",
                                    z->name, value);
                return 1;
        }
        if (streq(key, "tag")) {
                if (!tag_is_valid(value))
                        return fail(s, "zone '%s': tag must be printable and at most %u bytes", z->name, SHMZ_TAG_MAX);
                strncpy_buf(z->tag, sizeof(z->tag), value);
                return 1;
        }
        if (streq(key, "persist")) {
                int b = parse_boolean(value);

                if (b < 0)
                        return fail(s, "zone '%s': persist must be yes or no", z->name);
                z->persist = b;
                return 1;
        }
        r = owner_key(s, "zone", z->name, key, value, &z->uid, &z->gid, &z->mode);
        return r != -ENOENT ? r : fail(s, "zone '%s': unknown key '%s'", z->name, key);
}

static int zone_section_done(struct parse_state *s) {
        if (s->zone && s->zone->size == 0 && !s->zone_size_seen) {
                unsigned line = s->line;

                /* Report it where the section began, not where the next one does. */
                s->line = s->zone_line;
                (void) fail(s, "zone '%s' has no size", s->zone->name);
                s->line = line;
                return -EINVAL;
        }
        return 0;
}

static int new_zone_section(struct parse_state *s, const char *name) {
        struct config *c = s->cfg;
        struct zone_decl *v;

        if (!name_is_valid(name))
                return fail(s, "bad zone name '%s' (use A-Z a-z 0-9 . _ -, at most %u bytes)", name, SHMZ_NAME_MAX);
        for (size_t i = 0; i < c->n_zones; i++)
                if (streq(c->zones[i].name, name))
                        return fail(s, "zone '%s' declared twice", name);
        v = realloc(c->zones, (c->n_zones + 1) * sizeof(*v));
        if (!v)
                return fail(s, "out of memory");
        c->zones = v;
        s->zone = &v[c->n_zones++];
        *s->zone = (struct zone_decl){ .uid = 0, .gid = 0, .mode = 0600 };
        strncpy_buf(s->zone->name, sizeof(s->zone->name), name);
        s->zone_line = s->section_line;
        s->zone_size_seen = false;
        return 1;
}

/* [port NAME]: a reserved name, with the keys zones have for their owner and mode. */
static int port_key(struct parse_state *s, const char *key, const char *value) {
        struct port_decl *pd = s->port;
        int r = owner_key(s, "port", pd->name, key, value, &pd->uid, &pd->gid, &pd->mode);

        return r != -ENOENT ? r : fail(s, "port '%s': unknown key '%s'", pd->name, key);
}

static int new_port_section(struct parse_state *s, const char *name) {
        struct config *c = s->cfg;
        struct port_decl *v;

        if (!name_is_valid(name))
                return fail(s, "bad port name '%s' (use A-Z a-z 0-9 . _ -, at most %u bytes)", name, SHMZ_NAME_MAX);
        for (size_t i = 0; i < c->n_port_decls; i++)
                if (streq(c->port_decls[i].name, name))
                        return fail(s, "port '%s' declared twice", name);
        v = realloc(c->port_decls, (c->n_port_decls + 1) * sizeof(*v));
        if (!v)
                return fail(s, "out of memory");
        c->port_decls = v;
        s->port = &v[c->n_port_decls++];
        *s->port = (struct port_decl){ .uid = 0, .gid = 0, .mode = 0600 };
        strncpy_buf(s->port->name, sizeof(s->port->name), name);
        return 1;
}

static void refuse_section(struct parse_state *s) {
        (void) zone_section_done(s);
        s->zone = NULL;
        s->port = NULL;
        strncpy_buf(s->section, sizeof(s->section), "?");
}

static void open_section(struct parse_state *s, const char *p) {
        const char *e = strchr(p, ']');
        char name[256];

        if (!e) {
                refuse_section(s); /* the reader reports the line */
                return;
        }
        if ((size_t) (e - p) >= sizeof(name)) {
                (void) fail(s, "section name too long");
                refuse_section(s);
                return;
        }
        memcpy(name, p, (size_t) (e - p));
        name[e - p] = 0;
        (void) zone_section_done(s);
        s->zone = NULL;
        s->port = NULL;
        strncpy_buf(s->section, sizeof(s->section), name);
        if (strncmp(name, "zone ", 5) == 0)
                (void) new_zone_section(s, name + 5);
        else if (strncmp(name, "port ", 5) == 0)
                (void) new_port_section(s, name + 5);
        else if (!streq(name, "daemon"))
                (void) fail(s, "unknown section [%s] (expected [daemon], [zone NAME] or [port NAME])", name);
}

static int handler(void *userdata, const char *section, const char *key, const char *value) {
        struct parse_state *s = userdata;

        /* Sections are the reader's (inih truncates long section names): section is not used. */
        if (!key)
                return 1;
        if (streq(s->section, "daemon"))
                return daemon_key(s, key, value);
        if (s->port)
                return port_key(s, key, value);
        if (!s->section[0])
                return fail(s, "key '%s' outside a section ([daemon], [zone NAME] or [port NAME])", key);
        if (!s->zone)
                return 1; /* the section was refused already: its keys add nothing to that error */
        return zone_key(s, key, value);
}

static int error_cmp(const void *a, const void *b) {
        const struct parse_error *x = a, *y = b;

        /* Stable for equal lines: the order they were found in, by address within the array. */
        return x->line < y->line ? -1 : x->line > y->line ? 1 : x < y ? -1 : x > y;
}

/* "path:line: message\n" for each error, in line order. */
static int format_errors(struct parse_state *s, char **ret) {
        char *buf = NULL;
        size_t len = 0;
        FILE *f;

        qsort(s->errors, s->n_errors, sizeof(s->errors[0]), error_cmp);
        f = open_memstream(&buf, &len);
        if (!f)
                return -ENOMEM;
        for (unsigned i = 0; i < s->n_errors; i++)
                fprintf(f, "%s:%u: %s\n", s->path, s->errors[i].line, s->errors[i].msg);
        if (s->n_dropped > 0)
                fprintf(f, "%s: %u more error(s) not shown\n", s->path, s->n_dropped);
        if (fclose(f) != 0 || !buf) {
                free(buf);
                return -ENOMEM;
        }
        *ret = buf;
        return 0;
}

int config_parse(const char *path, struct config **ret, char **ret_errors) {
        _cleanup_(config_freep) struct config *c = NULL;
        struct parse_state s = { .path = path };
        int r;

        *ret_errors = NULL;
        r = config_new_default(&c);
        if (r < 0)
                return r;
        s.cfg = c;
        s.f = fopen(path, "re");
        if (!s.f)
                return -errno;
        r = ini_parse_stream(reader, &s, handler, &s);
        if (r >= 0)
                (void) zone_section_done(&s);
        (void) fclose(s.f);
        if (r < 0)
                return -ENOMEM;
        /* inih's first syntax error; the reader found it too unless it is one only inih knows. */
        if (r > 0) {
                bool known = false;

                for (unsigned i = 0; i < s.n_errors; i++)
                        known = known || s.errors[i].line == (unsigned) r;
                if (!known) {
                        s.line = (unsigned) r;
                        (void) fail(&s, "syntax error");
                }
        }
        if (s.n_errors == 0)
                check_ports(&s);
        if (s.n_errors > 0) {
                r = format_errors(&s, ret_errors);
                return r < 0 ? r : -EINVAL;
        }
        *ret = TAKE_PTR(c);
        return 0;
}

int config_load(const char *path, struct config **ret) {
        _cleanup_free_ char *errors = NULL;
        int r;

        r = config_parse(path, ret, &errors);
        if (r == -ENOMEM)
                return log_error_errno(ENOMEM, "%s: cannot read it.", path);
        for (char *p = errors, *e; p && *p; p = e + 1) {
                e = strchrnul(p, '\n');
                log_error("%.*s", (int) (e - p), p);
                if (!*e)
                        break;
        }
        return r;
}
