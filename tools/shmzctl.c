/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* shmzctl: look at and manage shmzoned's zones, look at its ports and segments; a client of libshmzone like any other.
 */
#include <errno.h>
#include <getopt.h>
#include <grp.h>
#include <inttypes.h>
#include <json-c/json.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "client.h"
#include "shmzone.h"
#include "util.h"

/* Exit codes, documented in shmzctl(1): scripts tell these apart. */
enum {
        EXIT_OK = 0,
        EXIT_ERROR = 1,
        EXIT_USAGE = 2,
        EXIT_NOTFOUND = 3,
        EXIT_PERMISSION = 4,
        EXIT_UNREACHABLE = 5,
};

static const char *arg_socket = NULL;
static const char *arg_tag = NULL;
static const char *arg_size = NULL;
static const char *arg_mode = NULL;
static bool arg_json = false;
static bool arg_names = false;

/*
 * What a failing command was about, for its error line: "shmzctl create demo:
 * zone exists with another tag". err_object is the name (zone, port, user),
 * err_what, if set, replaces strerror() for the error the command returns.
 */
static const char *err_object = NULL;
static const char *err_kind = "zone"; /* what err_object names: zone, port name, segment, user, group */
static char err_what[256];

/* What an error means for a request about a zone (or err_kind). */
static const char *describe(int r) {
        static char buf[64];

        switch (r) {
        case -ENOENT:
                (void) snprintf(buf, sizeof(buf), "no such %s", err_kind);
                return buf;
        case -EPERM:
                return "not yours: only its owner or root may do that";
        case -EACCES:
                return "permission denied";
        case -EEXIST:
                return "zone exists";
        case -ENOSPC:
                return "the daemon's memory budget is used up";
        case -EDQUOT:
                return "over your quota (bytes or zones per user, see shmzone.conf)";
        case -EINVAL:
                return "invalid name, size or argument";
        case -EAGAIN:
                return "the zone has no size yet (made in the view, not truncated)";
        default:
                return strerror(-r);
        }
}

static void help(void) {
        printf("Usage: shmzctl [OPTIONS] COMMAND ...\n\n"
               "Commands:\n"
               "  list                       zones, a table (--names: names only, --json)\n"
               "  show NAME                  one zone's figures (alias: info; --json)\n"
               "  create NAME --size SIZE    create a zone (K/M/G suffixes) [--tag TAG] [--mode MODE]\n"
               "  rm NAME...                 remove zone names (memory goes after the last detach)\n"
               "  chmod MODE NAME            change a zone's mode (octal)\n"
               "  chown USER[:GROUP] NAME    change a zone's owner (names or numbers)\n"
               "  status                     the daemon's figures (--json)\n"
               "  reload                     reload the configuration, wait, print its errors (root)\n"
               "  ports                      published port names and live connections (--names, --json)\n"
               "  port show NAME             one published name and its connections (--json)\n"
               "  segments                   shared-memory segments of live ports (--names: ids, --json)\n"
               "  segment show ID            one segment's figures (--json)\n\n"
               "Options:\n"
               "  -s, --socket PATH   control socket (default $SHMZONE_SOCKET, else /run/shmzone/shmzone.sock)\n"
               "  -S, --size SIZE     size for create\n"
               "  -t, --tag TAG       tag for create\n"
               "  -m, --mode MODE     mode for create (octal)\n"
               "  -j, --json          JSON output (list, show, status, ports, port show, segments, segment show)\n"
               "  -q, --names         list, ports: names only; segments: ids only; one a line\n"
               "  -h, --help          this help\n"
               "  -V, --version       the version\n\n"
               "Exit status: 0 ok, 1 other error, 2 usage, 3 not found, 4 permission denied,\n"
               "5 daemon unreachable.\n");
}

static int parse_mode(const char *s, mode_t *ret) {
        char *end;
        unsigned long mode;

        errno = 0;
        mode = strtoul(s, &end, 8);
        if (!*s || *end || errno || mode > 07777)
                return -EINVAL;
        *ret = (mode_t) mode;
        return 0;
}

/* A mode as ls and chmod write it: "0640" (JSON too: a number would be read as decimal 416). */
static const char *mode_str(uint32_t mode, char buf[static 8]) {
        (void) snprintf(buf, 8, "%04o", mode & 07777);
        return buf;
}

/* The user's name as ls -l shows it, else the number; the result is valid until the next call. */
static const char *user_name(uint32_t uid) {
        static char buf[16];
        struct passwd *p = getpwuid((uid_t) uid);

        if (p && p->pw_name && p->pw_name[0])
                return p->pw_name;
        (void) snprintf(buf, sizeof(buf), "%" PRIu32, uid);
        return buf;
}

static const char *group_name(uint32_t gid) {
        static char buf[16];
        struct group *g = getgrgid((gid_t) gid);

        if (g && g->gr_name && g->gr_name[0])
                return g->gr_name;
        (void) snprintf(buf, sizeof(buf), "%" PRIu32, gid);
        return buf;
}

/* Local time as ls -l --full-time writes it, or "-" for 0 (never). */
static const char *time_str(uint64_t usec, char buf[static 40]) {
        time_t t = (time_t) (usec / 1000000u);
        struct tm tm;

        if (usec == 0 || !localtime_r(&t, &tm) || strftime(buf, 40, "%Y-%m-%d %H:%M:%S %z", &tm) == 0)
                return "-";
        return buf;
}

/* uid and gid as numbers, and the names they have here (null if none). */
static void json_add_ids(struct json_object *o, const char *uid_key, uint32_t uid, const char *gid_key, uint32_t gid) {
        struct passwd *p;
        struct group *g;

        json_object_object_add(o, uid_key, json_object_new_int64(uid));
        p = getpwuid((uid_t) uid);
        json_object_object_add(o, streq(uid_key, "uid") ? "user" : "creator_user",
                               p && p->pw_name ? json_object_new_string(p->pw_name) : NULL);
        if (!gid_key)
                return;
        json_object_object_add(o, gid_key, json_object_new_int64(gid));
        g = getgrgid((gid_t) gid);
        json_object_object_add(o, "group", g && g->gr_name ? json_object_new_string(g->gr_name) : NULL);
}

static struct json_object *zone_json(const struct shmz_zone_stat *st) {
        struct json_object *o = json_object_new_object();
        char mode[8];

        json_object_object_add(o, "name", json_object_new_string(st->name));
        json_object_object_add(o, "tag", json_object_new_string(st->tag));
        json_object_object_add(o, "size", json_object_new_uint64(st->size));
        json_object_object_add(o, "map_size", json_object_new_uint64(st->map_size));
        json_object_object_add(o, "mode", json_object_new_string(mode_str(st->mode, mode)));
        json_add_ids(o, "uid", st->uid, "gid", st->gid);
        json_object_object_add(o, "attached", json_object_new_int64(st->attached));
        json_object_object_add(o, "processes", json_object_new_int64(st->holders));
        json_object_object_add(o, "generation", json_object_new_uint64(st->generation));
        json_object_object_add(o, "declared", json_object_new_boolean(!!(st->flags & SHMZ_ZONE_INFO_DECLARED)));
        json_object_object_add(o, "created_usec", json_object_new_uint64(st->created_usec));
        json_object_object_add(o, "mtime_usec", json_object_new_uint64(st->mtime_usec));
        json_object_object_add(o, "ctime_usec", json_object_new_uint64(st->ctime_usec));
        return o;
}

static void json_print(struct json_object *o) {
        puts(json_object_to_json_string_ext(o, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_NOSLASHESCAPE));
        json_object_put(o);
}

static int print_zone(const struct shmz_zone_stat *st, void *userdata) {
        struct json_object *array = userdata;

        if (array)
                json_object_array_add(array, zone_json(st));
        else if (arg_names)
                puts(st->name);
        else {
                char mode[8];

                printf("%-24s %10" PRIu64 " %4s %-8s ", st->name, st->size, mode_str(st->mode, mode),
                       user_name(st->uid));
                printf("%-8s %3u %5u %s%s\n", group_name(st->gid), st->attached, st->holders, st->tag,
                       (st->flags & SHMZ_ZONE_INFO_DECLARED) ? " (declared)" : "");
        }
        return 0;
}

static int cmd_list(struct shmz_client *c, int argc, char **argv) {
        struct json_object *array = NULL;
        int r;

        if (argc != 1)
                return -EUCLEAN; /* usage */
        if (arg_json)
                array = json_object_new_array();
        else if (!arg_names)
                printf("%-24s %10s %4s %-8s %-8s %3s %5s %s\n", "NAME", "SIZE", "MODE", "USER", "GROUP", "ATT", "PROCS",
                       "TAG");
        r = shmz_zone_list(c, print_zone, array);
        if (array) {
                if (r >= 0)
                        json_print(array);
                else
                        json_object_put(array);
        }
        return r;
}

/* A zone's holders, all pages of them; *ret_n entries in *ret (free() it), the zone's figures in *ret_head. */
static int get_holders(struct shmz_client *c, const char *name, struct shmz_msg_zone_holders *ret_head,
                       struct shmz_msg_zone_holder **ret, size_t *ret_n) {
        _cleanup_free_ struct shmz_msg_zone_holder *v = NULL;
        struct shmz_msg_zone_holders_req req = {};
        struct shmz_msg_zone_holders page;
        size_t n = 0;
        int r;

        strncpy_buf(req.name, sizeof(req.name), name);
        /* Bounded by the daemon's own bound, whatever a daemon sends. */
        for (unsigned pages = 0; pages <= SHMZ_HOLDERS_MAX / SHMZ_HOLDERS_PER_MSG + 1; pages++) {
                struct shmz_msg_zone_holder *nv;
                uint32_t k;

                r = client_request(c, SHMZ_MSG_ZONE_HOLDERS, &req, sizeof(req), &page, sizeof(page), NULL);
                if (r < 0)
                        return r;
                if (pages == 0)
                        *ret_head = page;
                k = MIN(page.n, SHMZ_HOLDERS_PER_MSG);
                nv = reallocarray(v, n + k + 1, sizeof(*v));
                if (!nv)
                        return -ENOMEM;
                v = nv;
                for (uint32_t i = 0; i < k; i++) {
                        /* Only pids above the last one: a daemon cannot make this loop forever. */
                        if (n > 0 && page.holders[i].pid <= v[n - 1].pid)
                                continue;
                        v[n] = page.holders[i];
                        v[n].comm[SHMZ_COMM_BUF - 1] = 0;
                        n++;
                }
                if (k < SHMZ_HOLDERS_PER_MSG || n == 0 || v[n - 1].pid == req.after_pid)
                        break;
                req.after_pid = v[n - 1].pid;
        }
        *ret = TAKE_PTR(v);
        *ret_n = n;
        return 0;
}

static int cmd_show(struct shmz_client *c, int argc, char **argv) {
        _cleanup_free_ struct shmz_msg_zone_holder *hv = NULL;
        struct shmz_msg_zone_holders hh = {};
        struct shmz_zone_stat st;
        char mode[8], t1[40], t2[40], t3[40];
        size_t hn = 0;
        int r;

        if (argc != 2)
                return -EUCLEAN;
        err_object = argv[1];
        r = shmz_zone_stat(c, argv[1], &st);
        if (r < 0)
                return r;
        /* Who holds it needs read permission (or a daemon that knows the request): the rest shows anyway. */
        r = get_holders(c, argv[1], &hh, &hv, &hn);
        if (r < 0 && r != -EACCES && r != -EOPNOTSUPP && r != -EBADMSG)
                return r;
        if (arg_json) {
                struct json_object *o = zone_json(&st), *a;

                if (r >= 0) {
                        json_add_ids(o, "creator_uid", hh.creator_uid, NULL, 0);
                        json_object_object_add(o, "creator_pid", json_object_new_int64(hh.creator_pid));
                        json_object_object_add(o, "attach_usec", json_object_new_uint64(hh.attach_usec));
                        json_object_object_add(o, "detach_usec", json_object_new_uint64(hh.detach_usec));
                        json_object_object_add(o, "last_pid", json_object_new_int64(hh.last_pid));
                        json_object_object_add(o, "untracked", json_object_new_int64(hh.untracked));
                        a = json_object_new_array();
                        for (size_t i = 0; i < hn; i++) {
                                struct json_object *h = json_object_new_object();

                                json_object_object_add(h, "pid", json_object_new_int64(hv[i].pid));
                                json_add_ids(h, "uid", hv[i].uid, "gid", hv[i].gid);
                                json_object_object_add(h, "comm", json_object_new_string(hv[i].comm));
                                json_object_object_add(h, "attachments", json_object_new_int64(hv[i].attachments));
                                json_object_object_add(h, "since_usec", json_object_new_uint64(hv[i].since_usec));
                                json_object_array_add(a, h);
                        }
                        json_object_object_add(o, "holders", a);
                }
                json_print(o);
                return 0;
        }
        printf("name: %s\ntag: %s\nsize: %" PRIu64 "\nmapped: %" PRIu64 "\nmode: %s\nowner: %s\n", st.name, st.tag,
               st.size, st.map_size, mode_str(st.mode, mode), user_name(st.uid));
        printf("group: %s\ncreated: %s\nmodified: %s\nchanged: %s\nattached: %u\ngeneration: %" PRIu64
               "\ndeclared: %s\n",
               group_name(st.gid), time_str(st.created_usec, t1), time_str(st.mtime_usec, t2),
               time_str(st.ctime_usec, t3), st.attached, st.generation,
               (st.flags & SHMZ_ZONE_INFO_DECLARED) ? "yes" : "no");
        if (r < 0) {
                printf("holders: (%s)\n", r == -EACCES ? "not readable by you" : "not known to this daemon");
                return 0;
        }
        if (st.flags & SHMZ_ZONE_INFO_DECLARED)
                printf("creator: the config file");
        else
                printf("creator: %s", user_name(hh.creator_uid));
        if (hh.creator_pid)
                printf(", pid %" PRIu32, hh.creator_pid);
        printf("\nlast attach: %s\nlast detach: %s\n", time_str(hh.attach_usec, t2), time_str(hh.detach_usec, t3));
        if (hh.last_pid)
                printf("last pid: %" PRIu32 "\n", hh.last_pid);
        printf("holders: %" PRIu32 "%s\n", hh.processes, hh.untracked ? " (some untracked: too many processes)" : "");
        if (hn > 0)
                printf("  %7s %-8s %-8s %-16s %5s %s\n", "PID", "USER", "GROUP", "COMMAND", "ATT", "SINCE");
        for (size_t i = 0; i < hn; i++) {
                printf("  %7" PRIu32 " %-8s ", hv[i].pid, user_name(hv[i].uid));
                printf("%-8s %-16s %5" PRIu32 " %s\n", group_name(hv[i].gid), hv[i].comm[0] ? hv[i].comm : "?",
                       hv[i].attachments, time_str(hv[i].since_usec, t1));
        }
        return 0;
}

static int cmd_create(struct shmz_client *c, int argc, char **argv) {
        struct shmz_zone *z;
        uint64_t size;
        mode_t mode = 0;
        int r;

        /* The size as an option, or as the old positional second argument. */
        if (argc == 3 && !arg_size)
                arg_size = argv[2];
        else if (argc != 2)
                return -EUCLEAN;
        if (!arg_size || parse_size(arg_size, &size) < 0 || size == 0)
                return -EUCLEAN;
        if (arg_mode && parse_mode(arg_mode, &mode) < 0)
                return -EUCLEAN;
        err_object = argv[1];
        r = shmz_zone_open(c, argv[1], size, arg_tag, SHMZ_CREATE | SHMZ_EXCL, &z);
        if (r == -EEXIST) {
                struct shmz_zone_stat st;

                /* What is there: the same declaration, or another's zone? */
                if (shmz_zone_stat(c, argv[1], &st) >= 0) {
                        if (streq(st.tag, arg_tag ?: ""))
                                (void) snprintf(err_what, sizeof(err_what), "zone exists (tag '%s', %" PRIu64 " bytes)",
                                                st.tag, st.size);
                        else
                                (void) snprintf(err_what, sizeof(err_what),
                                                "zone exists with another tag ('%s', %" PRIu64 " bytes)", st.tag,
                                                st.size);
                }
        }
        if (r < 0)
                return r;
        shmz_zone_close(z);
        /* Zones are born 0600; the mode is a second step, as with open(2) + fchmod(2). */
        if (arg_mode)
                return shmz_zone_chmod(c, argv[1], mode);
        return 0;
}

static int cmd_rm(struct shmz_client *c, int argc, char **argv) {
        int r = 0;

        if (argc < 2)
                return -EUCLEAN;
        for (int i = 1; i < argc && r >= 0; i++) {
                err_object = argv[i];
                r = shmz_zone_unlink(c, argv[i]);
        }
        return r;
}

static int cmd_chmod(struct shmz_client *c, int argc, char **argv) {
        mode_t mode;

        if (argc != 3 || parse_mode(argv[1], &mode) < 0)
                return -EUCLEAN;
        err_object = argv[2];
        return shmz_zone_chmod(c, argv[2], mode);
}

static int lookup_id(const char *s, bool group, uint32_t *ret) {
        char *end;
        unsigned long n;

        errno = 0;
        n = strtoul(s, &end, 10);
        if (*s && !*end && !errno && n < UINT32_MAX) {
                *ret = (uint32_t) n;
                return 0;
        }
        /* An unknown name is the user's mistake (usage), said with the name. */
        err_object = s;
        if (group) {
                struct group *g = getgrnam(s);

                if (!g) {
                        (void) snprintf(err_what, sizeof(err_what), "no such group");
                        return -EUCLEAN;
                }
                *ret = g->gr_gid;
        } else {
                struct passwd *p = getpwnam(s);

                if (!p) {
                        (void) snprintf(err_what, sizeof(err_what), "no such user");
                        return -EUCLEAN;
                }
                *ret = p->pw_uid;
        }
        return 0;
}

static int cmd_chown(struct shmz_client *c, int argc, char **argv) {
        uint32_t uid = (uint32_t) -1, gid = (uint32_t) -1;
        char *colon;
        int r;

        if (argc != 3)
                return -EUCLEAN;
        colon = strchr(argv[1], ':');
        if (colon) {
                *colon = 0;
                r = lookup_id(colon + 1, true, &gid);
                if (r < 0)
                        return r;
        }
        if (argv[1][0]) {
                r = lookup_id(argv[1], false, &uid);
                if (r < 0)
                        return r;
        }
        err_object = argv[2];
        return shmz_zone_chown(c, argv[2], (uid_t) uid, (gid_t) gid);
}

static int cmd_status(struct shmz_client *c, int argc, char **argv) {
        struct shmz_daemon_status st;
        int r;

        if (argc != 1)
                return -EUCLEAN;
        r = shmz_daemon_status(c, &st);
        if (r < 0)
                return r;
        if (arg_json) {
                struct json_object *o = json_object_new_object();

                json_object_object_add(o, "zones", json_object_new_uint64(st.zones));
                json_object_object_add(o, "zones_unlinked", json_object_new_uint64(st.zones_unlinked));
                json_object_object_add(o, "budget", json_object_new_uint64(st.budget));
                json_object_object_add(o, "budget_used", json_object_new_uint64(st.budget_used));
                json_object_object_add(o, "uid_quota", json_object_new_uint64(st.quota));
                json_object_object_add(o, "clients", json_object_new_uint64(st.clients));
                json_object_object_add(o, "requests", json_object_new_uint64(st.requests));
                json_object_object_add(o, "errors", json_object_new_uint64(st.errors));
                json_object_object_add(o, "uptime_usec", json_object_new_uint64(st.uptime_usec));
                json_object_object_add(o, "listeners", json_object_new_uint64(st.listeners));
                json_object_object_add(o, "ports", json_object_new_uint64(st.ports));
                json_object_object_add(o, "segments", json_object_new_uint64(st.segments));
                json_object_object_add(o, "segment_bytes", json_object_new_uint64(st.segment_bytes));
                json_object_object_add(o, "chunks", json_object_new_uint64(st.chunks));
                json_object_object_add(o, "chunks_used", json_object_new_uint64(st.chunks_used));
                json_object_object_add(o, "messages", json_object_new_uint64(st.messages));
                json_object_object_add(o, "message_bytes", json_object_new_uint64(st.message_bytes));
                json_object_object_add(o, "ports_closed", json_object_new_uint64(st.ports_closed));
                json_object_object_add(o, "peers_died", json_object_new_uint64(st.peers_died));
                json_print(o);
                return 0;
        }
        printf("zones: %" PRIu64 " (+%" PRIu64 " unlinked, still attached)\nbudget: %" PRIu64 " of %" PRIu64
               " bytes used\nuid quota: %" PRIu64 "\nclients: %" PRIu64 "\nrequests: %" PRIu64 "\nerrors: %" PRIu64
               "\nuptime: %" PRIu64 " s\n",
               st.zones, st.zones_unlinked, st.budget_used, st.budget, st.quota, st.clients, st.requests, st.errors,
               st.uptime_usec / 1000000);
        printf("listeners: %" PRIu64 "\nports: %" PRIu64 " (%" PRIu64 " closed since start, %" PRIu64
               " by a death)\nsegments: %" PRIu64 " (%" PRIu64 " bytes)\nchunks: %" PRIu64 " of %" PRIu64
               " used\nmessages: %" PRIu64 " (%" PRIu64 " bytes)\n",
               st.listeners, st.ports, st.ports_closed, st.peers_died, st.segments, st.segment_bytes, st.chunks_used,
               st.chunks, st.messages, st.message_bytes);
        return 0;
}

/* Reported already: exit 1 without another line. */
#define REPORTED ECANCELED

/* What systemctl reload runs: the daemon's outcome is ours, so that a refused file fails the reload. */
static int cmd_reload(struct shmz_client *c, int argc, char **argv) {
        struct shmz_msg_reload_reply out;
        int r;

        if (argc != 1)
                return -EUCLEAN;
        r = client_request(c, SHMZ_MSG_RELOAD, NULL, 0, &out, sizeof(out), NULL);
        if (r < 0)
                return r;
        out.errors[sizeof(out.errors) - 1] = 0;
        if (out.result < 0) {
                fputs(out.errors, stderr);
                fprintf(stderr, "shmzctl reload: the configuration was refused; shmzoned runs the one it had.\n");
                return -REPORTED;
        }
        if (out.refused > 0)
                fprintf(stderr,
                        "shmzctl reload: applied; %" PRIu32
                        " zone declaration(s) refused, their zones kept as they are (see the journal).\n",
                        out.refused);
        return 0;
}

/* ---- ports and segments ------------------------------------------------------------ */

static const char *const side_name[2] = { "connector", "acceptor" };

static struct json_object *listener_json(const struct shmz_msg_port_info *pi) {
        struct json_object *o = json_object_new_object();

        char mode[8];

        json_object_object_add(o, "kind", json_object_new_string("listener"));
        json_object_object_add(o, "name", json_object_new_string(pi->name));
        json_object_object_add(o, "mode", json_object_new_string(mode_str(pi->mode, mode)));
        json_add_ids(o, "uid", pi->uid, "gid", pi->gid);
        json_object_object_add(o, "pid", json_object_new_int64(pi->pid[SHMZ_PORT_SIDE_ACCEPTOR]));
        json_object_object_add(o, "backlog", json_object_new_int64(pi->backlog));
        json_object_object_add(o, "connections", json_object_new_uint64(pi->connections));
        json_object_object_add(o, "created_usec", json_object_new_uint64(pi->created_usec));
        return o;
}

static struct json_object *connection_json(const struct shmz_msg_port_info *pi) {
        struct json_object *o = json_object_new_object();

        json_object_object_add(o, "kind", json_object_new_string("port"));
        json_object_object_add(o, "port_id", json_object_new_uint64(pi->port_id));
        json_object_object_add(o, "name", json_object_new_string(pi->name));
        json_object_object_add(o, "segments", json_object_new_int64(pi->segments));
        json_object_object_add(o, "created_usec", json_object_new_uint64(pi->created_usec));
        /* Per side: its process, and what it sent. */
        for (int s = 0; s < 2; s++) {
                struct json_object *d = json_object_new_object();

                json_object_object_add(d, "pid", json_object_new_int64(pi->pid[s]));
                json_add_ids(d, "uid", pi->uid_side[s], NULL, 0);
                json_object_object_add(d, "messages", json_object_new_uint64(pi->messages[s]));
                json_object_object_add(d, "bytes", json_object_new_uint64(pi->bytes[s]));
                json_object_object_add(d, "chunks_in_flight", json_object_new_uint64(pi->chunks_in_flight[s]));
                json_object_object_add(o, side_name[s], d);
        }
        return o;
}

/* The daemon's entries, copied: listeners (port_id 0) and connections, in the daemon's order. */
struct port_entries {
        struct shmz_msg_port_info *e;
        size_t n, cap;
};

static int collect_port(const struct shmz_msg_port_info *pi, void *userdata) {
        struct port_entries *pe = userdata;

        if (pe->n == pe->cap) {
                size_t cap = pe->cap ? pe->cap * 2 : 32;
                struct shmz_msg_port_info *e = reallocarray(pe->e, cap, sizeof(*e));

                if (!e)
                        return -ENOMEM;
                pe->e = e;
                pe->cap = cap;
        }
        pe->e[pe->n] = *pi;
        /* From the daemon: terminate what is printed whatever it sent. */
        pe->e[pe->n].name[SHMZ_NAME_BUF - 1] = 0;
        pe->n++;
        return 0;
}

static void print_listener_header(void) {
        printf("%-24s %4s %-8s %-8s %7s %7s %5s\n", "NAME", "MODE", "USER", "GROUP", "PID", "BACKLOG", "CONNS");
}

static void print_listener(const struct shmz_msg_port_info *pi) {
        char mode[8];

        printf("%-24s %4s %-8s ", pi->name, mode_str(pi->mode, mode), user_name(pi->uid));
        printf("%-8s %7u %7u %5" PRIu64 "\n", group_name(pi->gid), pi->pid[SHMZ_PORT_SIDE_ACCEPTOR], pi->backlog,
               pi->connections);
}

/* Messages and bytes per direction: C> what the connector sent, A> what the acceptor sent. */
static void print_connection_header(void) {
        printf("%-8s %-24s %7s %-8s %7s %-8s %9s %11s %9s %11s %8s %4s\n", "PORT", "NAME", "C.PID", "C.USER", "A.PID",
               "A.USER", "C>MSGS", "C>BYTES", "A>MSGS", "A>BYTES", "INFLIGHT", "SEGS");
}

static void print_connection(const struct shmz_msg_port_info *pi) {
        printf("%-8" PRIu64 " %-24s %7u %-8s ", pi->port_id, pi->name, pi->pid[0], user_name(pi->uid_side[0]));
        printf("%7u %-8s %9" PRIu64 " %11" PRIu64 " %9" PRIu64 " %11" PRIu64 " %8" PRIu64 " %4u\n", pi->pid[1],
               user_name(pi->uid_side[1]), pi->messages[0], pi->bytes[0], pi->messages[1], pi->bytes[1],
               pi->chunks_in_flight[0] + pi->chunks_in_flight[1], pi->segments);
}

/* name NULL: everything; else that listener and its connections (-ENOENT without the listener). */
static int show_ports(struct shmz_client *c, const char *name) {
        struct port_entries pe = {};
        struct json_object *out = NULL;
        bool found = false;
        size_t nl = 0, nc = 0;
        int r;

        r = shmz_port_list(c, collect_port, &pe);
        if (r < 0)
                goto out;
        for (size_t i = 0; i < pe.n; i++) {
                if (name && !streq(pe.e[i].name, name))
                        continue;
                if (pe.e[i].port_id == 0) {
                        nl++;
                        found = true;
                } else
                        nc++;
        }
        if (name && !found) {
                r = -ENOENT;
                goto out;
        }
        if (arg_json) {
                struct json_object *conns = json_object_new_array();

                for (size_t i = 0; i < pe.n; i++)
                        if (pe.e[i].port_id != 0 && (!name || streq(pe.e[i].name, name)))
                                json_object_array_add(conns, connection_json(&pe.e[i]));
                if (name) {
                        for (size_t i = 0; i < pe.n; i++)
                                if (pe.e[i].port_id == 0 && streq(pe.e[i].name, name)) {
                                        out = listener_json(&pe.e[i]);
                                        break;
                                }
                        json_object_object_add(out, "ports", conns);
                } else {
                        struct json_object *ls = json_object_new_array();

                        for (size_t i = 0; i < pe.n; i++)
                                if (pe.e[i].port_id == 0)
                                        json_object_array_add(ls, listener_json(&pe.e[i]));
                        out = json_object_new_object();
                        json_object_object_add(out, "listeners", ls);
                        json_object_object_add(out, "ports", conns);
                }
                json_print(out);
                goto out;
        }
        if (arg_names && !name) {
                for (size_t i = 0; i < pe.n; i++)
                        if (pe.e[i].port_id == 0)
                                puts(pe.e[i].name);
                goto out;
        }
        if (name) {
                for (size_t i = 0; i < pe.n; i++)
                        if (pe.e[i].port_id == 0 && streq(pe.e[i].name, name)) {
                                char mode[8], t[40];

                                printf("name: %s\nmode: %s\nowner: %s\n", pe.e[i].name, mode_str(pe.e[i].mode, mode),
                                       user_name(pe.e[i].uid));
                                printf("group: %s\npid: %u\nbacklog: %u\nconnections: %" PRIu64 "\ncreated: %s\n",
                                       group_name(pe.e[i].gid), pe.e[i].pid[SHMZ_PORT_SIDE_ACCEPTOR], pe.e[i].backlog,
                                       pe.e[i].connections, time_str(pe.e[i].created_usec, t));
                        }
        } else {
                print_listener_header();
                for (size_t i = 0; i < pe.n; i++)
                        if (pe.e[i].port_id == 0)
                                print_listener(&pe.e[i]);
        }
        if (nc > 0 || !name) {
                putchar('\n');
                print_connection_header();
                for (size_t i = 0; i < pe.n; i++)
                        if (pe.e[i].port_id != 0 && (!name || streq(pe.e[i].name, name)))
                                print_connection(&pe.e[i]);
        }
out:
        free(pe.e);
        return r;
}

static int cmd_ports(struct shmz_client *c, int argc, char **argv) {
        if (argc != 1)
                return -EUCLEAN;
        return show_ports(c, NULL);
}

static int cmd_port(struct shmz_client *c, int argc, char **argv) {
        if (argc != 3 || !streq(argv[1], "show"))
                return -EUCLEAN;
        err_object = argv[2];
        err_kind = "published port name";
        return show_ports(c, argv[2]);
}

static struct json_object *segment_json(const struct shmz_msg_segment_info *si) {
        struct json_object *o = json_object_new_object();

        json_object_object_add(o, "id", json_object_new_uint64(si->id));
        json_object_object_add(o, "port_id", json_object_new_uint64(si->port_id));
        json_object_object_add(o, "side", json_object_new_string(si->side < 2 ? side_name[si->side] : "?"));
        json_object_object_add(o, "slot", json_object_new_int64(si->slot));
        json_object_object_add(o, "chunk_size", json_object_new_int64(si->chunk_size));
        json_object_object_add(o, "chunks", json_object_new_int64(si->n_chunks));
        json_object_object_add(o, "chunks_used", json_object_new_int64(si->chunks_used));
        json_object_object_add(o, "map_size", json_object_new_uint64(si->map_size));
        json_object_object_add(o, "owner_pid", json_object_new_int64(si->owner_pid));
        json_object_object_add(o, "owner_uid", json_object_new_int64(si->owner_uid));
        json_object_object_add(o, "owner_gid", json_object_new_int64(si->owner_gid));
        json_object_object_add(o, "created_usec", json_object_new_uint64(si->created_usec));
        return o;
}

struct segment_walk {
        struct json_object *array; /* --json */
        uint64_t id;               /* segment show: the one wanted, else 0 */
        bool found;
};

static int print_segment(const struct shmz_msg_segment_info *si, void *userdata) {
        struct segment_walk *w = userdata;

        if (w->id != 0) {
                if (si->id != w->id)
                        return 0;
                w->found = true;
                if (arg_json)
                        json_print(segment_json(si));
                else
                        printf("id: %" PRIu64 "\nport: %" PRIu64 "\nside: %s\nslot: %u\nchunk_size: %u\n"
                               "chunks: %u\nchunks_used: %u\nmap_size: %" PRIu64 "\nowner_pid: %u\nowner_uid: %u\n"
                               "owner_gid: %u\n",
                               si->id, si->port_id, si->side < 2 ? side_name[si->side] : "?", si->slot, si->chunk_size,
                               si->n_chunks, si->chunks_used, si->map_size, si->owner_pid, si->owner_uid,
                               si->owner_gid);
                return 0;
        }
        if (w->array)
                json_object_array_add(w->array, segment_json(si));
        else if (arg_names)
                printf("%" PRIu64 "\n", si->id);
        else
                printf("%-8" PRIu64 " %-8" PRIu64 " %-9s %4u %10u %6u %6u %10" PRIu64 " %7u %5u %5u\n", si->id,
                       si->port_id, si->side < 2 ? side_name[si->side] : "?", si->slot, si->chunk_size, si->n_chunks,
                       si->chunks_used, si->map_size, si->owner_pid, si->owner_uid, si->owner_gid);
        return 0;
}

static int cmd_segments(struct shmz_client *c, int argc, char **argv) {
        struct segment_walk w = {};
        int r;

        if (argc != 1)
                return -EUCLEAN;
        if (arg_json)
                w.array = json_object_new_array();
        else if (!arg_names)
                printf("%-8s %-8s %-9s %4s %10s %6s %6s %10s %7s %5s %5s\n", "ID", "PORT", "SIDE", "SLOT", "CHUNK_SIZE",
                       "CHUNKS", "USED", "MAP_SIZE", "PID", "UID", "GID");
        r = shmz_segment_list(c, print_segment, &w);
        if (w.array) {
                if (r >= 0)
                        json_print(w.array);
                else
                        json_object_put(w.array);
        }
        return r;
}

static int cmd_segment(struct shmz_client *c, int argc, char **argv) {
        struct segment_walk w = {};
        char *end;
        int r;

        if (argc != 3 || !streq(argv[1], "show"))
                return -EUCLEAN;
        errno = 0;
        w.id = strtoull(argv[2], &end, 10);
        if (!argv[2][0] || *end || errno || w.id == 0 || argv[2][0] == '-' || argv[2][0] == '+')
                return -EUCLEAN;
        err_object = argv[2];
        err_kind = "segment";
        r = shmz_segment_list(c, print_segment, &w);
        if (r < 0)
                return r;
        return w.found ? 0 : -ENOENT;
}

static int exit_code(int r) {
        switch (r) {
        case -EUCLEAN:
                return EXIT_USAGE;
        case -ENOENT:
                return EXIT_NOTFOUND;
        case -EACCES:
        case -EPERM:
                return EXIT_PERMISSION;
        default:
                return EXIT_ERROR;
        }
}

int main(int argc, char *argv[]) {
        static const struct option options[] = {
                { "socket", required_argument, NULL, 's' },
                { "size", required_argument, NULL, 'S' },
                { "tag", required_argument, NULL, 't' },
                { "mode", required_argument, NULL, 'm' },
                { "json", no_argument, NULL, 'j' },
                { "names", no_argument, NULL, 'q' },
                { "help", no_argument, NULL, 'h' },
                { "version", no_argument, NULL, 'V' },
                {},
        };
        static const struct {
                const char *name;
                int (*fn)(struct shmz_client *c, int argc, char **argv);
        } cmds[] = {
                { "list", cmd_list },
                { "show", cmd_show },
                { "info", cmd_show },
                { "create", cmd_create },
                { "rm", cmd_rm },
                { "chmod", cmd_chmod },
                { "chown", cmd_chown },
                { "status", cmd_status },
                { "ports", cmd_ports },
                { "port", cmd_port },
                { "segments", cmd_segments },
                { "segment", cmd_segment },
                { "reload", cmd_reload }, /* the unit's ExecReload= */
        };
        struct shmz_client *c;
        int o, r;

        /* Options anywhere, as admins type them: glibc permutes argv unless POSIXLY_CORRECT is set. */
        unsetenv("POSIXLY_CORRECT");
        while ((o = getopt_long(argc, argv, "s:S:t:m:jqhV", options, NULL)) >= 0)
                switch (o) {
                case 's':
                        arg_socket = optarg;
                        break;
                case 'S':
                        arg_size = optarg;
                        break;
                case 't':
                        arg_tag = optarg;
                        break;
                case 'm':
                        arg_mode = optarg;
                        break;
                case 'j':
                        arg_json = true;
                        break;
                case 'q':
                        arg_names = true;
                        break;
                case 'h':
                        help();
                        return EXIT_OK;
                case 'V':
                        printf("shmzctl %s\n", SHMZ_VERSION);
                        return EXIT_OK;
                default:
                        return EXIT_USAGE;
                }
        if (optind >= argc) {
                help();
                return EXIT_USAGE;
        }
        for (size_t i = 0; i < ELEMENTSOF(cmds); i++) {
                if (!streq(cmds[i].name, argv[optind]))
                        continue;
                r = shmz_connect(arg_socket, &c);
                if (r < 0) {
                        fprintf(stderr, "shmzctl: cannot reach shmzoned: %s\n", strerror(-r));
                        return r == -ENOENT || r == -ECONNREFUSED || r == -ENOTSOCK ? EXIT_UNREACHABLE : exit_code(r);
                }
                r = cmds[i].fn(c, argc - optind, argv + optind);
                shmz_disconnect(c);
                if (r == -EUCLEAN && err_object && err_what[0]) {
                        fprintf(stderr, "shmzctl %s %s: %s\n", cmds[i].name, err_object, err_what);
                        return EXIT_USAGE;
                }
                if (r == -EUCLEAN) {
                        fprintf(stderr, "shmzctl %s: bad arguments; see shmzctl --help\n", cmds[i].name);
                        return EXIT_USAGE;
                }
                if (r == -REPORTED)
                        return EXIT_ERROR;
                if (r < 0) {
                        if (err_object)
                                fprintf(stderr, "shmzctl %s %s: %s\n", cmds[i].name, err_object,
                                        err_what[0] ? err_what : describe(r));
                        else
                                fprintf(stderr, "shmzctl %s: %s\n", cmds[i].name, strerror(-r));
                        return exit_code(r);
                }
                return EXIT_OK;
        }
        fprintf(stderr, "shmzctl: unknown command '%s'\n", argv[optind]);
        return EXIT_USAGE;
}
