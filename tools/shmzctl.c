/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* shmzctl: look at and manage shmzoned's zones; a client of libshmzone like any other. */
#include <errno.h>
#include <getopt.h>
#include <grp.h>
#include <inttypes.h>
#include <json-c/json.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

static void help(void) {
        printf("Usage: shmzctl [OPTIONS] COMMAND ...\n\n"
               "Commands:\n"
               "  list                       zones, a table (--names: names only, --json)\n"
               "  show NAME                  one zone's figures (alias: info; --json)\n"
               "  create NAME --size SIZE    create a zone (K/M/G suffixes) [--tag TAG] [--mode MODE]\n"
               "  rm NAME...                 remove zone names (memory goes after the last detach)\n"
               "  chmod MODE NAME            change a zone's mode (octal)\n"
               "  chown USER[:GROUP] NAME    change a zone's owner (names or numbers)\n"
               "  status                     the daemon's figures (--json)\n\n"
               "Options:\n"
               "  -s, --socket PATH   control socket (default $SHMZONE_SOCKET, else /run/shmzone/shmzone.sock)\n"
               "  -S, --size SIZE     size for create\n"
               "  -t, --tag TAG       tag for create\n"
               "  -m, --mode MODE     mode for create (octal)\n"
               "  -j, --json          JSON output (list, show, status)\n"
               "  -q, --names         list: zone names only, one a line\n"
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

static struct json_object *zone_json(const struct shmz_zone_stat *st) {
        struct json_object *o = json_object_new_object();

        json_object_object_add(o, "name", json_object_new_string(st->name));
        json_object_object_add(o, "tag", json_object_new_string(st->tag));
        json_object_object_add(o, "size", json_object_new_uint64(st->size));
        json_object_object_add(o, "map_size", json_object_new_uint64(st->map_size));
        json_object_object_add(o, "mode", json_object_new_int64(st->mode));
        json_object_object_add(o, "uid", json_object_new_int64(st->uid));
        json_object_object_add(o, "gid", json_object_new_int64(st->gid));
        json_object_object_add(o, "attached", json_object_new_int64(st->attached));
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
        else
                printf("%-24s %10" PRIu64 " %04o %5u %5u %3u %s%s\n", st->name, st->size, st->mode, st->uid, st->gid,
                       st->attached, st->tag, (st->flags & SHMZ_ZONE_INFO_DECLARED) ? " (declared)" : "");
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
                printf("%-24s %10s %4s %5s %5s %3s %s\n", "NAME", "SIZE", "MODE", "UID", "GID", "ATT", "TAG");
        r = shmz_zone_list(c, print_zone, array);
        if (array) {
                if (r >= 0)
                        json_print(array);
                else
                        json_object_put(array);
        }
        return r;
}

static int cmd_show(struct shmz_client *c, int argc, char **argv) {
        struct shmz_zone_stat st;
        int r;

        if (argc != 2)
                return -EUCLEAN;
        r = shmz_zone_stat(c, argv[1], &st);
        if (r < 0)
                return r;
        if (arg_json) {
                json_print(zone_json(&st));
                return 0;
        }
        printf("name: %s\ntag: %s\nsize: %" PRIu64 "\nmapped: %" PRIu64 "\nmode: %04o\nuid: %u\ngid: %u\n"
               "attached: %u\ngeneration: %" PRIu64 "\ndeclared: %s\n",
               st.name, st.tag, st.size, st.map_size, st.mode, st.uid, st.gid, st.attached, st.generation,
               (st.flags & SHMZ_ZONE_INFO_DECLARED) ? "yes" : "no");
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
        r = shmz_zone_open(c, argv[1], size, arg_tag, SHMZ_CREATE | SHMZ_EXCL, &z);
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
        for (int i = 1; i < argc && r >= 0; i++)
                r = shmz_zone_unlink(c, argv[i]);
        return r;
}

static int cmd_chmod(struct shmz_client *c, int argc, char **argv) {
        mode_t mode;

        if (argc != 3 || parse_mode(argv[1], &mode) < 0)
                return -EUCLEAN;
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
        if (group) {
                struct group *g = getgrnam(s);

                if (!g)
                        return -EUCLEAN; /* an unknown name is the user's mistake */
                *ret = g->gr_gid;
        } else {
                struct passwd *p = getpwnam(s);

                if (!p)
                        return -EUCLEAN;
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
                json_print(o);
                return 0;
        }
        printf("zones: %" PRIu64 " (+%" PRIu64 " unlinked, still attached)\nbudget: %" PRIu64 " of %" PRIu64
               " bytes used\nuid quota: %" PRIu64 "\nclients: %" PRIu64 "\nrequests: %" PRIu64 "\nerrors: %" PRIu64
               "\nuptime: %" PRIu64 " s\n",
               st.zones, st.zones_unlinked, st.budget_used, st.budget, st.quota, st.clients, st.requests, st.errors,
               st.uptime_usec / 1000000);
        return 0;
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
                { "list", cmd_list }, { "show", cmd_show },   { "info", cmd_show },   { "create", cmd_create },
                { "rm", cmd_rm },     { "chmod", cmd_chmod }, { "chown", cmd_chown }, { "status", cmd_status },
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
                if (r == -EUCLEAN) {
                        fprintf(stderr, "shmzctl %s: bad arguments; see shmzctl --help\n", cmds[i].name);
                        return EXIT_USAGE;
                }
                if (r < 0) {
                        fprintf(stderr, "shmzctl %s: %s\n", cmds[i].name, strerror(-r));
                        return exit_code(r);
                }
                return EXIT_OK;
        }
        fprintf(stderr, "shmzctl: unknown command '%s'\n", argv[optind]);
        return EXIT_USAGE;
}
