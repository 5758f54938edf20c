/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* shmzctl: look at and manage shmzoned's zones; a client of libshmzone like any other. */
#include <getopt.h>
#include <grp.h>
#include <inttypes.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "shmzone.h"
#include "util.h"

static const char *arg_socket = NULL;
static const char *arg_tag = NULL;

static void help(void) {
        printf("Usage: shmzctl [--socket PATH] COMMAND ...\n\n"
               "  list                      zones, one a line\n"
               "  info NAME                 one zone's figures\n"
               "  create NAME SIZE [--tag T]  create a zone (size with K/M/G suffix)\n"
               "  rm NAME                   remove a zone's name (memory goes after the last detach)\n"
               "  chmod MODE NAME           change a zone's mode (octal)\n"
               "  chown USER[:GROUP] NAME   change a zone's owner\n"
               "  status                    the daemon's figures\n");
}

static int print_zone(const struct shmz_zone_stat *st, void *userdata) {
        printf("%-24s %10" PRIu64 " %04o %5u %5u %3u %s%s\n", st->name, st->size, st->mode, st->uid, st->gid,
               st->attached, st->tag, (st->flags & SHMZ_ZONE_INFO_DECLARED) ? " (declared)" : "");
        return 0;
}

static int cmd_list(struct shmz_client *c, int argc, char **argv) {
        printf("%-24s %10s %4s %5s %5s %3s %s\n", "NAME", "SIZE", "MODE", "UID", "GID", "ATT", "TAG");
        return shmz_zone_list(c, print_zone, NULL);
}

static int cmd_info(struct shmz_client *c, int argc, char **argv) {
        struct shmz_zone_stat st;
        int r;

        if (argc != 2)
                return -EINVAL;
        r = shmz_zone_stat(c, argv[1], &st);
        if (r < 0)
                return r;
        printf("name: %s\ntag: %s\nsize: %" PRIu64 "\nmapped: %" PRIu64 "\nmode: %04o\nuid: %u\ngid: %u\n"
               "attached: %u\ngeneration: %" PRIu64 "\ndeclared: %s\n",
               st.name, st.tag, st.size, st.map_size, st.mode, st.uid, st.gid, st.attached, st.generation,
               (st.flags & SHMZ_ZONE_INFO_DECLARED) ? "yes" : "no");
        return 0;
}

static int cmd_create(struct shmz_client *c, int argc, char **argv) {
        struct shmz_zone *z;
        uint64_t size;
        int r;

        /* create NAME SIZE [--tag TAG] */
        if (argc == 5 && streq(argv[3], "--tag")) {
                arg_tag = argv[4];
                argc = 3;
        }
        if (argc != 3 || parse_size(argv[2], &size) < 0)
                return -EINVAL;
        r = shmz_zone_open(c, argv[1], size, arg_tag, SHMZ_CREATE | SHMZ_EXCL, &z);
        if (r < 0)
                return r;
        shmz_zone_close(z);
        return 0;
}

static int cmd_rm(struct shmz_client *c, int argc, char **argv) {
        int r = 0;

        for (int i = 1; i < argc && r >= 0; i++)
                r = shmz_zone_unlink(c, argv[i]);
        return argc < 2 ? -EINVAL : r;
}

static int cmd_chmod(struct shmz_client *c, int argc, char **argv) {
        char *end;
        unsigned long mode;

        if (argc != 3)
                return -EINVAL;
        mode = strtoul(argv[1], &end, 8);
        if (*end || mode > 07777)
                return -EINVAL;
        return shmz_zone_chmod(c, argv[2], (mode_t) mode);
}

static int lookup_id(const char *s, bool group, uint32_t *ret) {
        char *end;
        unsigned long n = strtoul(s, &end, 10);

        if (*s && !*end) {
                *ret = (uint32_t) n;
                return 0;
        }
        if (group) {
                struct group *g = getgrnam(s);

                if (!g)
                        return -ENOENT;
                *ret = g->gr_gid;
        } else {
                struct passwd *p = getpwnam(s);

                if (!p)
                        return -ENOENT;
                *ret = p->pw_uid;
        }
        return 0;
}

static int cmd_chown(struct shmz_client *c, int argc, char **argv) {
        uint32_t uid = (uint32_t) -1, gid = (uint32_t) -1;
        char *colon;
        int r;

        if (argc != 3)
                return -EINVAL;
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
        int r = shmz_daemon_status(c, &st);

        if (r < 0)
                return r;
        printf("zones: %" PRIu64 " (+%" PRIu64 " unlinked, still attached)\nbudget: %" PRIu64 " of %" PRIu64
               " bytes used\nuid quota: %" PRIu64 "\nclients: %" PRIu64 "\nrequests: %" PRIu64 "\nerrors: %" PRIu64
               "\nuptime: %" PRIu64 " s\n",
               st.zones, st.zones_unlinked, st.budget_used, st.budget, st.quota, st.clients, st.requests, st.errors,
               st.uptime_usec / 1000000);
        return 0;
}

int main(int argc, char *argv[]) {
        static const struct option options[] = {
                { "socket", required_argument, NULL, 's' },
                { "tag", required_argument, NULL, 't' },
                { "help", no_argument, NULL, 'h' },
                {},
        };
        static const struct {
                const char *name;
                int (*fn)(struct shmz_client *c, int argc, char **argv);
        } cmds[] = {
                { "list", cmd_list },   { "info", cmd_info },   { "create", cmd_create }, { "rm", cmd_rm },
                { "chmod", cmd_chmod }, { "chown", cmd_chown }, { "status", cmd_status },
        };
        struct shmz_client *c;
        int o, r;

        while ((o = getopt_long(argc, argv, "+s:t:h", options, NULL)) >= 0)
                switch (o) {
                case 's':
                        arg_socket = optarg;
                        break;
                case 't':
                        arg_tag = optarg;
                        break;
                case 'h':
                        help();
                        return 0;
                default:
                        return 2;
                }
        if (optind >= argc) {
                help();
                return 2;
        }
        for (size_t i = 0; i < ELEMENTSOF(cmds); i++) {
                if (!streq(cmds[i].name, argv[optind]))
                        continue;
                r = shmz_connect(arg_socket, &c);
                if (r < 0) {
                        fprintf(stderr, "shmzctl: cannot reach shmzoned: %s\n", strerror(-r));
                        return 1;
                }
                r = cmds[i].fn(c, argc - optind, argv + optind);
                shmz_disconnect(c);
                if (r < 0) {
                        fprintf(stderr, "shmzctl %s: %s\n", cmds[i].name, strerror(-r));
                        return 1;
                }
                return 0;
        }
        fprintf(stderr, "shmzctl: unknown command '%s'\n", argv[optind]);
        return 2;
}
