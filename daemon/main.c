/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <systemd/sd-bus.h>
#include <systemd/sd-daemon.h>
#include <systemd/sd-event.h>
#include <time.h>

#include "clients.h"
#include "conf-file.h"
#include "daemon.h"
#include "fuse-view.h"
#include "history.h"
#include "persist.h"
#include "log.h"
#include "notify.h"
#include "ports.h"
#include "reaper.h"
#include "shmzone.h"
#include "registry.h"
#include "worker.h"

#define MAX_WORKERS 4u
/* STATUS= is refreshed this often (systemctl status shows it). */
#define STATUS_INTERVAL_USEC (10 * 1000000u)

static const char *arg_config = NULL;
static const char *arg_socket = NULL;
static const char *arg_mount = NULL;
static bool arg_no_mount = false;
static bool arg_check_config = false;
static int arg_threads = -1;
/* The listening socket came from systemd (socket activation): its file is not ours to remove. */
static bool listen_fd_passed = false;

static void help(void) {
        printf("Usage: shmzoned [OPTIONS]\n\n"
               "Serves named shared-memory zones to local processes.\n\n"
               "  -c --config=PATH    configuration file (default %s)\n"
               "  -s --socket=PATH    control socket (default %s)\n"
               "  -m --mount=PATH     mount the FUSE view here (default %s)\n"
               "     --no-mount       run without the FUSE view\n"
               "  -t --threads=N      port worker threads (default: CPUs, at most %u)\n"
               "     --check-config   check the configuration file, print every error, exit 0 or 1\n"
               "  -v --verbose        log debug messages\n"
               "  -h --help           show this help\n"
               "     --version        show the version\n\n"
               "Signals: SIGTERM/SIGINT stop, SIGHUP reloads the configuration.\n",
               SHMZ_DEFAULT_CONFIG, SHMZ_DEFAULT_SOCKET, SHMZ_DEFAULT_MOUNT, MAX_WORKERS);
}

static int parse_argv(int argc, char *argv[]) {
        enum { ARG_VERSION = 0x100, ARG_NO_MOUNT, ARG_CHECK_CONFIG };
        static const struct option options[] = {
                { "config", required_argument, NULL, 'c' },
                { "socket", required_argument, NULL, 's' },
                { "mount", required_argument, NULL, 'm' },
                { "no-mount", no_argument, NULL, ARG_NO_MOUNT },
                { "check-config", no_argument, NULL, ARG_CHECK_CONFIG },
                { "threads", required_argument, NULL, 't' },
                { "verbose", no_argument, NULL, 'v' },
                { "help", no_argument, NULL, 'h' },
                { "version", no_argument, NULL, ARG_VERSION },
                {},
        };
        int c;

        while ((c = getopt_long(argc, argv, "c:s:m:t:vh", options, NULL)) >= 0)
                switch (c) {
                case 'c':
                        arg_config = optarg;
                        break;
                case 's':
                        if (optarg[0] != '/' || strlen(optarg) >= sizeof(((struct sockaddr_un *) 0)->sun_path))
                                return log_error_errno(EINVAL, "--socket needs an absolute path of at most %zu bytes.",
                                                       sizeof(((struct sockaddr_un *) 0)->sun_path) - 1);
                        arg_socket = optarg;
                        break;
                case 'm':
                        if (optarg[0] != '/')
                                return log_error_errno(EINVAL, "--mount needs an absolute path.");
                        arg_mount = optarg;
                        break;
                case ARG_NO_MOUNT:
                        arg_no_mount = true;
                        break;
                case ARG_CHECK_CONFIG:
                        arg_check_config = true;
                        break;
                case 't': {
                        char *end;
                        long n = strtol(optarg, &end, 10);

                        if (!*optarg || *end || n < 1 || n > 64)
                                return log_error_errno(EINVAL, "--threads needs a number from 1 to 64.");
                        arg_threads = (int) n;
                        break;
                }
                case 'v':
                        log_max_level = LOG_DEBUG;
                        break;
                case 'h':
                        help();
                        return 0;
                case ARG_VERSION:
                        printf("shmzoned %s\n", PACKAGE_VERSION);
                        return 0;
                default:
                        return -EINVAL;
                }
        if (optind < argc)
                return log_error_errno(EINVAL, "Unexpected argument '%s'.", argv[optind]);
        return 1;
}

/* Command-line options win over the file; takes c. */
static int apply_arguments(struct config *c, struct config **ret) {
        const char *state = getenv("STATE_DIRECTORY");

        /* The unit's StateDirectory= (one path: ours), unless the file names another. */
        if (state && state[0] == '/' && !strchr(state, ':') && streq(c->state_directory, SHMZ_DEFAULT_STATE_DIR)) {
                free(c->state_directory);
                c->state_directory = strdup(state);
                if (!c->state_directory) {
                        config_free(c);
                        return log_oom();
                }
        }
        if (arg_socket) {
                free(c->socket_path);
                c->socket_path = strdup(arg_socket);
        }
        if (arg_no_mount) {
                free(c->mount_path);
                c->mount_path = NULL;
        } else if (arg_mount) {
                free(c->mount_path);
                c->mount_path = strdup(arg_mount);
        }
        if (!c->socket_path || (!arg_no_mount && arg_mount && !c->mount_path)) {
                config_free(c);
                return log_oom();
        }
        if (arg_threads > 0)
                c->threads = (unsigned) arg_threads;
        *ret = c;
        return 0;
}

/* Logs each line of text at priority. */
static void log_lines(int priority, const char *text) {
        for (const char *p = text, *e; p && *p; p = e + 1) {
                e = strchrnul(p, '\n');
                log_full_errno(priority, 0, "%.*s", (int) (e - p), p);
                if (!*e)
                        break;
        }
}

/*
 * Loads the config: the default path may be missing (built-in defaults), an
 * explicit one may not. A refused file: -EINVAL with every error in
 * *ret_errors ("path:line: message" lines), nothing logged.
 */
static int load_config(struct config **ret, char **ret_errors) {
        const char *path = arg_config ?: SHMZ_DEFAULT_CONFIG;
        struct config *c;
        int r;

        *ret_errors = NULL;
        r = config_parse(path, &c, ret_errors);
        if (r == -ENOENT && !arg_config) {
                log_notice("%s does not exist; running with built-in defaults.", path);
                r = config_new_default(&c);
        } else if (r == -ENOENT || r == -EACCES || r == -ENOMEM) {
                if (asprintf(ret_errors, "%s: %s\n", path, strerror(-r)) < 0)
                        *ret_errors = NULL;
                return r == -ENOMEM ? r : -EINVAL;
        }
        if (r < 0)
                return r;
        return apply_arguments(c, ret);
}

/* --check-config: what a start or reload would say of the file, on stderr; 0 or 1. */
static int check_config(void) {
        _cleanup_free_ char *errors = NULL;
        struct config *c = NULL;
        int r;

        r = load_config(&c, &errors);
        config_free(c);
        if (r < 0) {
                /* Run by the unit (ExecReload=), stderr is the journal: each line at err, as the daemon logs them. */
                bool journal = getenv("JOURNAL_STREAM");

                for (const char *p = errors ?: "Out of memory.\n", *e; *p; p = e + 1) {
                        e = strchrnul(p, '\n');
                        fprintf(stderr, "%s%.*s\n", journal ? "<3>" : "", (int) (e - p), p);
                        if (!*e)
                                break;
                }
                return EXIT_FAILURE;
        }
        printf("%s: OK\n", arg_config ?: SHMZ_DEFAULT_CONFIG);
        return EXIT_SUCCESS;
}

#ifndef SO_PASSRIGHTS
#define SO_PASSRIGHTS 83 /* Linux 6.16 */
#endif

/*
 * No request carries an fd: where the kernel can, make it refuse them (the
 * sender's sendmsg() fails with EPERM), so that none ever has to be closed
 * here. Accepted sockets inherit it from the listener. Older kernels: the
 * reaper closes what comes. The test suite turns it off to drive that path.
 */
static void refuse_passed_fds(int fd) {
        int zero = 0;

        if (secure_getenv("SHMZONE_TEST_ACCEPT_FDS"))
                return;
        if (setsockopt(fd, SOL_SOCKET, SO_PASSRIGHTS, &zero, sizeof(zero)) < 0 && errno != ENOPROTOOPT)
                log_debug_errno(errno, "SO_PASSRIGHTS: %m");
}

static int open_listen_socket(struct daemon *d) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        const char *path = d->cfg->socket_path;
        _cleanup_close_ int fd = -EBADF;
        int r;

        if (d->listen_fd >= 0) {
                /*
                 * Socket activation (take_passed_fds()): systemd made and owns the socket,
                 * blocking unless the unit says NonBlocking=yes; the workers accept until
                 * EAGAIN (another worker may take the connection first) and would hang.
                 */
                int fl = fcntl(d->listen_fd, F_GETFL);

                if (fl < 0 || fcntl(d->listen_fd, F_SETFL, fl | O_NONBLOCK) < 0)
                        return log_error_errno(errno, "Cannot make the passed socket non-blocking: %m");
                refuse_passed_fds(d->listen_fd);
                return 0;
        }
        if (strlen(path) >= sizeof(sa.sun_path))
                return log_error_errno(ENAMETOOLONG, "Socket path too long: %s", path);
        strncpy(sa.sun_path, path, sizeof(sa.sun_path) - 1);

        r = mkdir_parents(path, 0755, false);
        if (r < 0)
                return log_error_errno(r, "Cannot create the directory of %s: %m", path);

        fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return log_error_errno(errno, "socket(): %m");
        /* A live daemon answers: never steal its socket. A dead one left a file: remove it. */
        if (connect(fd, (struct sockaddr *) &sa, sizeof(sa)) == 0)
                return log_error_errno(EADDRINUSE, "Another shmzoned serves %s.", path);
        safe_close(fd);
        (void) unlink(path);

        fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return log_error_errno(errno, "socket(): %m");
        if (bind(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0)
                return log_error_errno(errno, "Cannot bind %s: %m", path);
        /* Anybody may connect; what they may do is decided per zone. */
        if (chmod(path, 0666) < 0)
                return log_error_errno(errno, "chmod %s: %m", path);
        refuse_passed_fds(fd);
        if (listen(fd, SOMAXCONN) < 0)
                return log_error_errno(errno, "listen(): %m");
        d->socket_path = strdup(path);
        if (!d->socket_path)
                return log_oom();
        d->listen_fd = TAKE_FD(fd);
        return 0;
}

/*
 * Every zone and client costs an fd; the default soft limit (1024) would let one
 * user starve the others. epoll has no FD_SETSIZE limit: take the hard limit.
 */
static void raise_fd_limit(void) {
        struct rlimit rl;

        if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
                rl.rlim_cur = rl.rlim_max;
                (void) setrlimit(RLIMIT_NOFILE, &rl);
        }
}

static void report(void *userdata, int priority, const char *msg) {
        log_full_errno(priority, 0, "%s", msg);
}

/* The registry's part of a config: limits and zones; it reports, we log. */
static int apply_config(struct daemon *d, const struct config *c) {
        return registry_apply_config(d->registry, &c->limits, c->zones, c->n_zones, report, d);
}

/* The registry's store: every zone's memfd goes to systemd's fd store, named after the zone's identity. */
static void store_stored(void *userdata, const struct zone_identity *id, int fd) {
        struct daemon *d = userdata;
        char name[ZONE_FDNAME_MAX + 1];
        int r;

        /* The history first: a zone systemd holds always has its record (a restart keeps its numbers). */
        if (d->history && history_put(d->history, id) < 0)
                log_warning("Zone '%s': cannot record its history; a restart gives it a new inode number.", id->name);
        if (zone_identity_format(id, name, sizeof(name)) < 0) {
                log_warning("Zone '%s': its identity does not fit in a %u-character FDNAME; it will not survive a "
                            "restart.",
                            id->name, ZONE_FDNAME_MAX);
                return;
        }
        r = notify_fdstore(name, fd);
        if (r < 0)
                log_warning_errno(r, "Zone '%s': cannot store its memfd with systemd: %m", id->name);
}

static void store_removed(void *userdata, const struct zone_identity *id) {
        struct daemon *d = userdata;
        char name[ZONE_FDNAME_MAX + 1];
        int r;

        if (zone_identity_format(id, name, sizeof(name)) < 0)
                return; /* never stored */
        r = notify_fdstore_remove(name);
        if (r < 0)
                log_warning_errno(r, "Zone '%s': cannot remove its memfd from systemd's store: %m", id->name);
        /* A new identity of the same zone is stored right after, with its entry again. */
        if (d->history)
                history_drop(d->history, id->name);
}

static void store_updated(void *userdata, const struct zone_identity *id) {
        struct daemon *d = userdata;

        if (d->history && history_put(d->history, id) < 0)
                log_warning("Zone '%s': cannot record its history.", id->name);
}

static const struct registry_store fd_store = {
        .stored = store_stored,
        .removed = store_removed,
        .updated = store_updated,
};

/*
 * The history record: the one the fd store gave back (fd), or a new one,
 * stored with systemd. Only under systemd: elsewhere nothing outlives us.
 */
static void history_setup(struct daemon *d, int fd) {
        uint64_t next_ino, next_gen;
        bool fresh;
        int r;

        d->history = history_open(fd, &fresh);
        if (!d->history) {
                log_warning("Cannot make the zones' history record; a restart gives zones new inode numbers.");
                return;
        }
        if (fresh) {
                r = notify_fdstore(HISTORY_FDNAME, history_fd(d->history));
                if (r < 0)
                        log_warning_errno(r, "Cannot store the zones' history record with systemd: %m");
        }
        history_next(d->history, &next_ino, &next_gen);
        registry_reserve(d->registry, next_ino, next_gen);
}

static bool zone_exists(const char *name, void *userdata) {
        struct shmz_msg_zone_info info;

        return registry_info(userdata, name, &info) == 0;
}

/* After adoption: every adopted zone's entry as the registry has it now, no entry for a zone that is gone. */
static void history_sync(struct daemon *d) {
        _cleanup_free_ struct shmz_msg_zone_info *v = NULL;
        size_t n;

        if (!d->history)
                return;
        history_retain(d->history, zone_exists, d->registry);
        if (registry_list(d->registry, &v, &n) < 0)
                return;
        for (size_t i = 0; i < n; i++) {
                struct zone_history old = {};
                struct zone_identity id = {
                        .hist = {
                                .ino = v[i].ino,
                                .generation = v[i].generation,
                                .created_usec = v[i].created_usec,
                                .mtime_usec = v[i].mtime_usec,
                                .ctime_usec = v[i].ctime_usec,
                        },
                };

                strncpy_buf(id.name, sizeof(id.name), v[i].name);
                strncpy_buf(id.hist.tag, sizeof(id.hist.tag), v[i].tag);
                /* The listing has no creator: an adopted zone's is the one its entry gave it. */
                if (history_lookup(d->history, id.name, &old) == 0)
                        id.hist.creator_pid = old.creator_pid;
                (void) history_put(d->history, &id);
        }
}

/*
 * What systemd passed: the control socket (socket activation) and the zone
 * memfds of the daemon before us (its fd store, FDNAME=shmz.*). Zones are
 * adopted before the config is applied, so that the config meets them as a
 * reload would. A bad or foreign fd is dropped from the store too. Systemd
 * keeps the copies it passed: adopted zones are not stored again.
 */
static int take_passed_fds(struct daemon *d, unsigned *ret_adopted) {
        char **names = NULL;
        bool *adopted = NULL;
        unsigned n_adopted = 0;
        int n, r = 0;

        n = sd_listen_fds_with_names(true, &names);
        if (n < 0)
                return log_error_errno(n, "Cannot read the fds systemd passed: %m");
        if (n > 0) {
                adopted = calloc((size_t) n, sizeof(*adopted));
                if (!adopted) {
                        r = log_oom();
                        goto out;
                }
        }
        /* The history record first: zones take their numbers from it. */
        if (registry_has_store(d->registry)) {
                int hfd = -EBADF;

                for (int i = 0; i < n; i++)
                        if (streq(names[i], HISTORY_FDNAME)) {
                                if (hfd < 0) {
                                        hfd = SD_LISTEN_FDS_START + i;
                                        adopted[i] = true;
                                } else
                                        safe_close(SD_LISTEN_FDS_START + i);
                        }
                history_setup(d, hfd);
        }
        for (int i = 0; i < n; i++) {
                int fd = SD_LISTEN_FDS_START + i;
                struct zone_identity id;
                struct zone_history hist;
                bool have_hist;
                const char *why;

                if (streq(names[i], HISTORY_FDNAME))
                        continue;
                if (strncmp(names[i], ZONE_FDNAME_PREFIX, strlen(ZONE_FDNAME_PREFIX)) == 0) {
                        have_hist = d->history && zone_identity_parse(names[i], &id) == 0 &&
                                    history_lookup(d->history, id.name, &hist) == 0;
                        r = registry_adopt(d->registry, names[i], fd, have_hist ? &hist : NULL, &why);
                        if (r < 0) {
                                log_warning("Dropping stored fd '%s': %s.", names[i], why);
                                safe_close(fd);
                                (void) notify_fdstore_remove(names[i]);
                                continue;
                        }
                        if (r & ADOPT_REPAIRED)
                                log_warning("Stored zone '%s': %s; its name, owner, mode and bytes are kept.", names[i],
                                            why);
                        else if (r > 0)
                                log_warning("Stored zone '%s': %s.", names[i], why);
                        adopted[i] = true;
                        n_adopted++;
                        continue;
                }
                if (d->listen_fd < 0 && sd_is_socket_unix(fd, SOCK_SEQPACKET, 1, NULL, 0) > 0) {
                        d->listen_fd = fd;
                        listen_fd_passed = true;
                        continue;
                }
                r = log_error_errno(EINVAL,
                                    "The fd systemd passed as '%s' is neither a zone nor a listening "
                                    "SOCK_SEQPACKET.",
                                    names[i]);
                goto out;
        }
        /*
         * FDSTOREREMOVE= drops every fd of that name: a duplicate dropped above
         * took the copy of the zone adopted under the same name with it. Store
         * that one again.
         */
        for (int i = 0; i < n; i++) {
                if (!adopted[i] || streq(names[i], HISTORY_FDNAME))
                        continue;
                for (int j = 0; j < n; j++)
                        if (j != i && !adopted[j] && streq(names[i], names[j])) {
                                (void) notify_fdstore(names[i], SD_LISTEN_FDS_START + i);
                                break;
                        }
        }
        if (n_adopted > 0)
                log_info("Took back %u zone(s) from the previous run.", n_adopted);
        history_sync(d);
        *ret_adopted = n_adopted;
        r = 0;
out:
        for (int i = 0; names && i < n; i++)
                free(names[i]);
        free(names);
        free(adopted);
        return r;
}

/* What the FUSE view shows besides the registry's own figures (called from its thread). */
static void view_figures(void *userdata, struct fuse_view_figures *ret) {
        struct daemon *d = userdata;

        *ret = (struct fuse_view_figures){
                .clients = clients_count(d->clients),
                .requests = atomic_load(&d->requests),
                .errors = atomic_load(&d->errors),
                .uptime_usec = now_usec(CLOCK_MONOTONIC) - d->start_usec,
                .start_usec = d->start_realtime_usec,
                .config_degraded = atomic_load(&d->degraded),
                .config_errors = atomic_load(&d->config_errors),
        };
}

static void apply_client_limits(struct daemon *d, const struct config *c) {
        clients_set_limits(d->clients, c->max_clients, c->uid_max_clients, (uint64_t) c->hello_timeout * 1000000u);
}

static unsigned count_lines(const char *text) {
        unsigned n = 0;

        for (const char *p = text; p && *p; p++)
                n += *p == '\n';
        return n;
}

/* Says the file was refused: in the log (each error at err), the status line and the view. Reload lock held. */
static void set_problem(struct daemon *d, bool degraded, const char *errors) {
        unsigned n = count_lines(errors);

        log_lines(LOG_ERR, errors);
        atomic_store(&d->config_errors, MAX(n, 1u));
        atomic_store(&d->degraded, degraded);
        pthread_mutex_lock(&d->problem_lock);
        (void) snprintf(d->problem, sizeof(d->problem),
                        degraded ? "Degraded: %s refused (%u error(s)), serving the kept zones with built-in defaults"
                                 : "Last reload refused: %s (%u error(s)), running the previous configuration",
                        d->config_path, MAX(n, 1u));
        pthread_mutex_unlock(&d->problem_lock);
}

static void restore_persisted(struct daemon *d, const struct config *cfg);

static int daemon_reload(struct daemon *d, char **ret_errors, int *ret_refused) {
        _cleanup_free_ char *errors = NULL;
        struct config *c;
        int r;

        *ret_errors = NULL;
        *ret_refused = 0;
        pthread_mutex_lock(&d->reload_lock);
        notify_reloading();
        log_info("Reloading %s.", d->config_path);
        r = load_config(&c, &errors);
        if (r < 0) {
                set_problem(d, atomic_load(&d->degraded), errors ?: "out of memory\n");
                log_error("Reload refused; keeping the running configuration.");
        } else {
                /* Socket, mount and threads are set up once; say so rather than ignore a change silently. */
                if (!streq(c->socket_path, d->cfg->socket_path) ||
                    !streq(c->mount_path ?: "", d->cfg->mount_path ?: "") || c->threads != d->cfg->threads)
                        log_warning("Socket, mount or thread changes take a restart; zones and limits are applied.");
                apply_client_limits(d, c);
                /* Ports and segments made from now on get the new limits; live ones keep theirs. */
                ports_set_limits(d->ports, &c->ports);
                if (ports_set_reserved(d->ports, c->port_decls, c->n_port_decls) < 0)
                        log_error("Reload: cannot reserve the [port] names; keeping the previous ones.");
                restore_persisted(d, c);
                *ret_refused = apply_config(d, c);
                if (*ret_refused != 0)
                        log_warning("Reload: %d zone declaration(s) refused, see above.", *ret_refused);
                config_free(d->cfg);
                d->cfg = c;
                if (atomic_load(&d->degraded))
                        log_notice("%s applied; no longer degraded.", d->config_path);
                pthread_mutex_lock(&d->problem_lock);
                d->problem[0] = 0;
                pthread_mutex_unlock(&d->problem_lock);
                atomic_store(&d->degraded, false);
                atomic_store(&d->config_errors, 0);
        }
        /* The last line of every reload, so that whoever sent SIGHUP can tell it has been handled. */
        log_info("Reload done.");
        notify_ready(d);
        pthread_mutex_unlock(&d->reload_lock);
        *ret_errors = TAKE_PTR(errors);
        return r < 0 ? -EINVAL : 0;
}

static int on_reload(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        _cleanup_free_ char *errors = NULL;
        int refused;

        (void) daemon_reload(userdata, &errors, &refused);
        return 0;
}

/* The declared zone z of the registry is written at stop: declared with persist = yes, or (degraded) written before. */
static bool wants_persist(struct daemon *d, const struct shmz_msg_zone_info *z) {
        if (!(z->flags & SHMZ_ZONE_INFO_DECLARED) || (z->flags & SHMZ_ZONE_INFO_PENDING))
                return false;
        for (size_t i = 0; i < d->cfg->n_zones; i++)
                if (streq(d->cfg->zones[i].name, z->name))
                        return d->cfg->zones[i].persist;
        /* Degraded, the file unknown: what was persisted before still is. */
        return atomic_load(&d->degraded) && persist_exists(d->cfg->state_directory, z->name);
}

/* Writes every zone that persists; the count written, or -errno. At stop and every persist_interval. */
static int persist_all(struct daemon *d, int priority) {
        _cleanup_free_ struct shmz_msg_zone_info *v = NULL;
        size_t n;
        int r, written = 0;

        pthread_mutex_lock(&d->reload_lock);
        r = registry_list(d->registry, &v, &n);
        for (size_t i = 0; r >= 0 && i < n; i++) {
                struct zone *z;

                if (!wants_persist(d, &v[i]) || registry_ref_by_ino(d->registry, v[i].ino, &z) < 0)
                        continue;
                if (persist_write(d->cfg->state_directory, &v[i], zone_fd(z)) >= 0) {
                        log_full_errno(priority, 0, "Zone '%s': written to %s (%" PRIu64 " bytes).", v[i].name,
                                       d->cfg->state_directory, v[i].size);
                        written++;
                }
                registry_unref(d->registry, z);
        }
        pthread_mutex_unlock(&d->reload_lock);
        return r < 0 ? r : written;
}

/*
 * Before a config is applied (at start, and at a reload, which may declare
 * one anew): declared persisting zones the registry lacks come back from their
 * copies, rather than be made afresh and overwrite the copy at the next stop.
 */
static void restore_persisted(struct daemon *d, const struct config *cfg) {
        for (size_t i = 0; i < cfg->n_zones; i++) {
                const struct zone_decl *decl = &cfg->zones[i];
                struct shmz_msg_zone_info info;
                struct zone_history hist;
                const char *why;
                int fd, r;

                if (!decl->persist || registry_info(d->registry, decl->name, &info) == 0)
                        continue;
                if (persist_read(cfg->state_directory, decl, &fd, &hist) < 0)
                        continue; /* none, or refused (logged): the config makes it afresh */
                r = registry_restore(d->registry, decl, fd, &hist, &why);
                if (r < 0) {
                        log_error("Zone '%s': its copy cannot be taken in: %s.", decl->name, why);
                        safe_close(fd);
                } else if (r > 0)
                        log_warning("Zone '%s': %s.", decl->name, why);
        }
}

/*
 * What systemd is doing to us: the type of the job running on our unit
 * ("stop", "restart", ...), asked on its private socket (root's, no D-Bus
 * daemon needed). NULL if it cannot tell: not under systemd, or no job (a
 * plain kill).
 */
static char *current_job_type(void) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_(sd_bus_error_free) sd_bus_error err = SD_BUS_ERROR_NULL;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        _cleanup_free_ char *unit = NULL, *job_path = NULL;
        const char *path;
        char *type = NULL;
        uint32_t id;

        if (!getenv("INVOCATION_ID") || sd_bus_new(&bus) < 0 ||
            sd_bus_set_address(bus, "unix:path=/run/systemd/private") < 0 || sd_bus_start(bus) < 0)
                return NULL;
        (void) sd_bus_set_method_call_timeout(bus, 2 * 1000000u);
        if (sd_bus_call_method(bus, "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                               "org.freedesktop.systemd1.Manager", "GetUnitByPID", &err, &reply, "u",
                               (uint32_t) getpid()) < 0 ||
            sd_bus_message_read(reply, "o", &path) < 0 || !(unit = strdup(path)))
                return NULL;
        reply = sd_bus_message_unref(reply);
        if (sd_bus_get_property(bus, "org.freedesktop.systemd1", unit, "org.freedesktop.systemd1.Unit", "Job", &err,
                                &reply, "(uo)") < 0 ||
            sd_bus_message_read(reply, "(uo)", &id, &path) < 0 || id == 0 || !(job_path = strdup(path)))
                return NULL;
        if (sd_bus_get_property_string(bus, "org.freedesktop.systemd1", job_path, "org.freedesktop.systemd1.Job",
                                       "JobType", &err, &type) < 0)
                return NULL;
        return type;
}

/*
 * The last word of a stop on what goes with it: zones only systemd's fd store
 * holds survive a restart and a crash, not a stop (systemd empties the store)
 * nor a reboot. Said at warning when they are discarded, with names and bytes.
 */
static void tell_what_stop_discards(struct daemon *d) {
        _cleanup_free_ struct shmz_msg_zone_info *v = NULL;
        _cleanup_free_ char *job = NULL, *names = NULL;
        uint64_t bytes = 0;
        size_t n, len = 0, count = 0;
        FILE *f;

        if (registry_list(d->registry, &v, &n) < 0)
                return;
        f = open_memstream(&names, &len);
        if (!f)
                return;
        for (size_t i = 0; i < n; i++) {
                if ((v[i].flags & SHMZ_ZONE_INFO_PENDING) || wants_persist(d, &v[i]))
                        continue;
                if (count < 32)
                        fprintf(f, "%s%s", count > 0 ? ", " : "", v[i].name);
                count++;
                bytes += v[i].map_size;
        }
        if (count > 32)
                fprintf(f, " and %zu more", count - 32);
        if (fclose(f) != 0 || count == 0)
                return;
        if (!registry_has_store(d->registry)) {
                log_warning("Stopping discards %zu zone(s), %" PRIu64
                            " bytes: %s (nothing keeps them without systemd).",
                            count, bytes, names);
                return;
        }
        job = current_job_type();
        if (job && (streq(job, "restart") || streq(job, "try-restart") || streq(job, "reload-or-restart")))
                log_info("Restarting: %zu zone(s), %" PRIu64 " bytes, stay in systemd's fd store.", count, bytes);
        else if (job && streq(job, "stop"))
                log_warning("Stopping discards %zu zone(s), %" PRIu64
                            " bytes: %s (systemd empties its fd store at a stop; declare a zone with persist = yes "
                            "to keep it).",
                            count, bytes, names);
        else
                log_warning("Stopping: %zu zone(s), %" PRIu64
                            " bytes, are kept by systemd's fd store only: a restart keeps them, a stop or reboot "
                            "discards them: %s.",
                            count, bytes, names);
}

/* Ticks every second, so that a reload's new persist_interval applies at once; writes when one has passed. */
static int on_persist_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        struct daemon *d = userdata;
        unsigned interval;

        pthread_mutex_lock(&d->reload_lock);
        interval = d->cfg->persist_interval;
        pthread_mutex_unlock(&d->reload_lock);
        if (interval > 0 && usec - d->persisted_usec >= (uint64_t) interval * 1000000u) {
                (void) persist_all(d, LOG_DEBUG);
                d->persisted_usec = usec;
        }
        /* A time source is one-shot: it is disabled before it is dispatched. */
        if (sd_event_source_set_time(s, usec + 1000000u) < 0)
                return 0;
        return sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
}

static int on_terminate(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        struct daemon *d = userdata;

        log_info("Received %s, stopping.", strsignal((int) si->ssi_signo));
        return sd_event_exit(d->event, 0);
}

static int on_status_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        struct daemon *d = userdata;

        notify_status(d);
        /* A time source is one-shot: it is disabled before it is dispatched, and set_time() does not enable it. */
        if (sd_event_source_set_time(s, usec + STATUS_INTERVAL_USEC) < 0)
                return 0;
        return sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
}

static int run(struct daemon *d) {
        sigset_t mask;
        unsigned n, adopted = 0;
        int r;

        /* Block before any thread starts, so that only the main loop's signalfd sees them. */
        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigaddset(&mask, SIGHUP);
        (void) sigprocmask(SIG_BLOCK, &mask, NULL);
        (void) signal(SIGPIPE, SIG_IGN);
        raise_fd_limit();

        r = clients_new(&d->clients);
        if (r < 0)
                return log_oom();
        apply_client_limits(d, d->cfg);
        r = registry_new(&d->cfg->limits, &d->registry);
        if (r < 0)
                return log_oom();
        r = ports_new(&d->cfg->ports, &d->ports);
        if (r < 0)
                return log_error_errno(r, "Cannot set up the port table: %m");
        r = ports_set_reserved(d->ports, d->cfg->port_decls, d->cfg->n_port_decls);
        if (r < 0)
                return log_error_errno(r, "Cannot reserve the [port] names: %m");
        /* Only for systemd (or a test that plays it): elsewhere a zone would not outlive us anyway. */
        if (getenv("NOTIFY_SOCKET"))
                registry_set_store(d->registry, &fd_store, d);
        r = take_passed_fds(d, &adopted);
        if (r < 0)
                return r;
        if (d->start_errors) {
                /* Refusing to start would make systemd empty its fd store, and the zones would go with it. */
                if (adopted == 0) {
                        log_lines(LOG_ERR, d->start_errors);
                        return log_error_errno(EINVAL, "%s refused; not starting.", d->config_path);
                }
                set_problem(d, true, d->start_errors);
                log_error("%s refused: serving the %u zone(s) kept from the previous run with built-in defaults "
                          "until a reload or restart applies a good file.",
                          d->config_path, adopted);
                goto serve;
        }
        restore_persisted(d, d->cfg);
        r = apply_config(d, d->cfg);
        /* After a restart the zones have data: refuse a declaration as a reload does, keep serving them. */
        if (r != 0 && adopted > 0)
                log_warning("%d zone declaration(s) refused, see above; serving the zones kept from the previous run.",
                            r);
        else if (r != 0)
                return log_error_errno(EINVAL, "%d zone declaration(s) cannot be served; not starting.", r);

serve:
        r = open_listen_socket(d);
        if (r < 0)
                return r;

        n = d->cfg->threads;
        if (n == 0) {
                long cpus = sysconf(_SC_NPROCESSORS_ONLN);

                n = (unsigned) MIN(MAX(cpus, 1L), (long) MAX_WORKERS);
        }
        r = reaper_start();
        if (r < 0)
                return log_error_errno(r, "Cannot start the fd reaper thread: %m");
        d->workers = calloc(n, sizeof(*d->workers));
        if (!d->workers)
                return log_oom();
        for (; d->n_workers < n; d->n_workers++) {
                r = worker_start(d, d->n_workers, &d->workers[d->n_workers]);
                if (r < 0)
                        return log_error_errno(r, "Cannot start worker thread: %m");
        }

        if (d->cfg->mount_path) {
                r = fuse_view_start(d->registry, d->ports, d->cfg->mount_path, d->cfg->socket_path, view_figures, d,
                                    &d->fuse);
                if (r < 0)
                        return log_error_errno(r, "Cannot mount the FUSE view at %s: %m", d->cfg->mount_path);
        }

        r = sd_event_new(&d->event);
        if (r < 0)
                return log_error_errno(r, "sd_event_new(): %m");
        r = sd_event_add_signal(d->event, NULL, SIGTERM, on_terminate, d);
        if (r >= 0)
                r = sd_event_add_signal(d->event, NULL, SIGINT, on_terminate, d);
        if (r >= 0)
                r = sd_event_add_signal(d->event, NULL, SIGHUP, on_reload, d);
        if (r >= 0)
                r = sd_event_add_time_relative(d->event, NULL, CLOCK_MONOTONIC, STATUS_INTERVAL_USEC, 0,
                                               on_status_timer, d);
        if (r >= 0)
                r = sd_event_add_time_relative(d->event, NULL, CLOCK_MONOTONIC, 1000000u, 0, on_persist_timer, d);
        if (r >= 0)
                r = sd_event_set_watchdog(d->event, true);
        if (r < 0)
                return log_error_errno(r, "Cannot set up the main loop: %m");

        d->persisted_usec = now_usec(CLOCK_MONOTONIC);
        log_info("shmzoned %s serving %s with %u worker thread(s)%s%s.", PACKAGE_VERSION, d->cfg->socket_path,
                 d->n_workers, d->cfg->mount_path ? ", view at " : "", d->cfg->mount_path ?: "");
        notify_ready(d);
        r = sd_event_loop(d->event);
        notify_stopping();
        (void) persist_all(d, LOG_INFO);
        tell_what_stop_discards(d);
        return r;
}

static void daemon_done(struct daemon *d) {
        /* The socket's name goes first, so that nobody connects to a daemon that is leaving. */
        if (d->socket_path)
                (void) unlink(d->socket_path);
        /* The fd after the workers: they accept on it until they stop (a closed number could be reused). */
        for (unsigned i = 0; i < d->n_workers; i++)
                worker_stop(d->workers[i]);
        free(d->workers);
        if (d->listen_fd >= 0 && !listen_fd_passed)
                safe_close(d->listen_fd);
        reaper_stop();
        fuse_view_stop(d->fuse);
        sd_event_unref(d->event);
        /* After the workers (their watches) and the view (its segment references). */
        ports_free(d->ports);
        registry_free(d->registry);
        history_free(d->history);
        clients_free(d->clients);
        config_free(d->cfg);
        free(d->socket_path);
}

int main(int argc, char *argv[]) {
        struct daemon d = { .listen_fd = -EBADF,
                            .reload_lock = PTHREAD_MUTEX_INITIALIZER,
                            .problem_lock = PTHREAD_MUTEX_INITIALIZER,
                            .reload = daemon_reload };
        int r;

        r = parse_argv(argc, argv);
        if (r <= 0)
                return r < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
        if (arg_check_config)
                return check_config();
        d.config_path = arg_config ?: SHMZ_DEFAULT_CONFIG;
        d.start_usec = now_usec(CLOCK_MONOTONIC);
        d.start_realtime_usec = now_usec(CLOCK_REALTIME);

        r = load_config(&d.cfg, &d.start_errors);
        /* A refused file: decided once the fd store is read (run()); built-in defaults meanwhile. */
        if (r == -EINVAL) {
                struct config *c;

                r = config_new_default(&c);
                if (r >= 0)
                        r = apply_arguments(c, &d.cfg);
        }
        if (r >= 0)
                r = run(&d);
        daemon_done(&d);
        free(d.start_errors);
        if (r < 0) {
                (void) sd_notifyf(false, "STATUS=Failed: %s\nERRNO=%d", strerror(-r), -r);
                return EXIT_FAILURE;
        }
        log_info("Stopped.");
        return EXIT_SUCCESS;
}
