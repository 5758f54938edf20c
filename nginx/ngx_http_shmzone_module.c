/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * nginx's limit_req with its zones in shmzoned: the same directives, prefixed
 * shmzone_, the same decisions (ratelimit/limiter.c keeps nginx's arithmetic and
 * its two phases for several limits), but each zone is the shmzone zone NAME,
 * opened (created if missing) by the master when it reads the configuration and
 * inherited by the workers. Its keys survive nginx's restarts and binary
 * upgrades, a shmzoned restart, and are shared by every process that opens the
 * zone with the same key.
 *
 * Time is nginx's cached monotonic clock (ngx_current_msec): updated at the same
 * instant as the wall clock nginx's limit_req reads, so both see the same steps
 * between requests, and the same in every process on the host.
 */
#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <errno.h>
#include <fcntl.h>
#include <shmzone.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "limiter.h"

#define ST_PASSED 1
#define ST_DELAYED 2
#define ST_REJECTED 3
#define ST_DELAYED_DRY_RUN 4
#define ST_REJECTED_DRY_RUN 5

/* A decision waits this long for the zone lock (held for microseconds), then on_error applies. */
#define LOCK_TIMEOUT_NS (100 * 1000 * 1000ULL)

typedef struct {
        ngx_str_t name;
        ngx_str_t key_source; /* the key as written, in the zone's tag */
        ngx_http_complex_value_t key;
        uint64_t size; /* 0: named by a shmzone_limit_req before its zone directive */
        uint32_t rate; /* milli-requests per second */
        ngx_flag_t on_error_pass;
        ngx_uint_t line; /* where it was declared, for errors found later */
        ngx_str_t file;
        struct shmz_zone *zone; /* in the master and, inherited, in its workers */
        struct limiter *lim;
} shmzone_zone_t;

typedef struct {
        shmzone_zone_t *zone;
        uint32_t burst;
        uint32_t delay; /* LIMITER_NODELAY: nodelay */
} shmzone_limit_t;

typedef struct {
        ngx_str_t socket;
        ngx_array_t zones; /* shmzone_zone_t * */
        struct shmz_client *client;
        ngx_pid_t opener; /* the process that opened the zones: only it closes them */
} shmzone_main_conf_t;

typedef struct {
        ngx_array_t limits; /* shmzone_limit_t */
        ngx_uint_t limit_log_level;
        ngx_uint_t delay_log_level;
        ngx_uint_t status_code;
        ngx_flag_t dry_run;
} shmzone_loc_conf_t;

/* Per main request; found again after an internal redirect through its pool cleanup (the ctx is cleared). */
typedef struct {
        ngx_uint_t status;
} shmzone_req_ctx_t;

static ngx_int_t shmzone_add_variables(ngx_conf_t *cf);
static ngx_int_t shmzone_init(ngx_conf_t *cf);
static void *shmzone_create_main_conf(ngx_conf_t *cf);
static char *shmzone_init_main_conf(ngx_conf_t *cf, void *conf);
static void *shmzone_create_loc_conf(ngx_conf_t *cf);
static char *shmzone_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child);
static char *shmzone_zone_directive(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *shmzone_limit_directive(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static ngx_int_t shmzone_init_process(ngx_cycle_t *cycle);

static ngx_conf_enum_t shmzone_log_levels[] = {
        { ngx_string("info"), NGX_LOG_INFO },
        { ngx_string("notice"), NGX_LOG_NOTICE },
        { ngx_string("warn"), NGX_LOG_WARN },
        { ngx_string("error"), NGX_LOG_ERR },
        { ngx_null_string, 0 },
};

static ngx_conf_num_bounds_t shmzone_status_bounds = { ngx_conf_check_num_bounds, 400, 599 };

static ngx_command_t shmzone_commands[] = {
        { ngx_string("shmzone_socket"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1, ngx_conf_set_str_slot,
          NGX_HTTP_MAIN_CONF_OFFSET, offsetof(shmzone_main_conf_t, socket), NULL },
        { ngx_string("shmzone_limit_req_zone"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE3 | NGX_CONF_TAKE4,
          shmzone_zone_directive, NGX_HTTP_MAIN_CONF_OFFSET, 0, NULL },
        { ngx_string("shmzone_limit_req"),
          NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE123, shmzone_limit_directive,
          NGX_HTTP_LOC_CONF_OFFSET, 0, NULL },
        { ngx_string("shmzone_limit_req_log_level"),
          NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1, ngx_conf_set_enum_slot,
          NGX_HTTP_LOC_CONF_OFFSET, offsetof(shmzone_loc_conf_t, limit_log_level), &shmzone_log_levels },
        { ngx_string("shmzone_limit_req_status"),
          NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1, ngx_conf_set_num_slot,
          NGX_HTTP_LOC_CONF_OFFSET, offsetof(shmzone_loc_conf_t, status_code), &shmzone_status_bounds },
        { ngx_string("shmzone_limit_req_dry_run"),
          NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_FLAG, ngx_conf_set_flag_slot,
          NGX_HTTP_LOC_CONF_OFFSET, offsetof(shmzone_loc_conf_t, dry_run), NULL },
        ngx_null_command,
};

static ngx_http_module_t shmzone_module_ctx = {
        shmzone_add_variables,    /* preconfiguration */
        shmzone_init,             /* postconfiguration */
        shmzone_create_main_conf, /* create main configuration */
        shmzone_init_main_conf,   /* init main configuration */
        NULL,                     /* create server configuration */
        NULL,                     /* merge server configuration */
        shmzone_create_loc_conf,  /* create location configuration */
        shmzone_merge_loc_conf,   /* merge location configuration */
};

ngx_module_t ngx_http_shmzone_module = {
        NGX_MODULE_V1,
        &shmzone_module_ctx,  /* module context */
        shmzone_commands,     /* module directives */
        NGX_HTTP_MODULE,      /* module type */
        NULL,                 /* init master */
        NULL,                 /* init module */
        shmzone_init_process, /* init process */
        NULL,                 /* init thread */
        NULL,                 /* exit thread */
        NULL,                 /* exit process */
        NULL,                 /* exit master */
        NGX_MODULE_V1_PADDING,
};

static ngx_str_t status_names[] = {
        ngx_null_string,        ngx_string("PASSED"),          ngx_string("DELAYED"),
        ngx_string("REJECTED"), ngx_string("DELAYED_DRY_RUN"), ngx_string("REJECTED_DRY_RUN"),
};

/* ---- per request ------------------------------------------------------------------------- */

static void req_ctx_cleanup(void *data) {
        (void) data; /* only a marker: the ctx lives in the request's pool */
}

static shmzone_req_ctx_t *req_ctx_get(ngx_http_request_t *r) {
        shmzone_req_ctx_t *ctx = ngx_http_get_module_ctx(r->main, ngx_http_shmzone_module);

        if (ctx)
                return ctx;
        for (ngx_pool_cleanup_t *c = r->main->pool->cleanup; c; c = c->next)
                if (c->handler == req_ctx_cleanup) {
                        ctx = c->data;
                        ngx_http_set_ctx(r->main, ctx, ngx_http_shmzone_module);
                        return ctx;
                }
        return NULL;
}

static void req_status_set(ngx_http_request_t *r, ngx_uint_t status) {
        shmzone_req_ctx_t *ctx = req_ctx_get(r);
        ngx_pool_cleanup_t *c;

        if (!ctx) {
                c = ngx_pool_cleanup_add(r->main->pool, sizeof(shmzone_req_ctx_t));
                if (!c)
                        return; /* out of memory: the variable stays empty, the decision stands */
                c->handler = req_ctx_cleanup;
                ctx = c->data;
                ngx_http_set_ctx(r->main, ctx, ngx_http_shmzone_module);
        }
        ctx->status = status;
}

static ngx_int_t status_variable(ngx_http_request_t *r, ngx_http_variable_value_t *v, uintptr_t data) {
        shmzone_req_ctx_t *ctx = req_ctx_get(r);

        if (!ctx || ctx->status == 0 || ctx->status >= sizeof(status_names) / sizeof(status_names[0])) {
                v->not_found = 1;
                return NGX_OK;
        }
        v->valid = 1;
        v->no_cacheable = 0;
        v->not_found = 0;
        v->len = status_names[ctx->status].len;
        v->data = status_names[ctx->status].data;
        return NGX_OK;
}

static void delay_done(ngx_http_request_t *r) {
        ngx_event_t *wev = r->connection->write;

        if (wev->delayed) {
                /* Woken before the timer (the socket became writable): keep waiting. */
                if (ngx_handle_write_event(wev, 0) != NGX_OK)
                        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
                return;
        }
        if (ngx_handle_read_event(r->connection->read, 0) != NGX_OK) {
                ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
                return;
        }
        r->read_event_handler = ngx_http_block_reading;
        r->write_event_handler = ngx_http_core_run_phases;
        ngx_http_core_run_phases(r);
}

static struct limiter_config limit_config(const shmzone_limit_t *limit) {
        return (struct limiter_config){ .rate = limit->zone->rate, .burst = limit->burst, .delay = limit->delay };
}

enum { RC_DECLINED, RC_AGAIN, RC_OK, RC_BUSY, RC_ERROR };

static ngx_int_t shmzone_handler(ngx_http_request_t *r) {
        shmzone_loc_conf_t *lcf;
        shmzone_limit_t *limits, *limit = NULL;
        shmzone_req_ctx_t *ctx;
        ngx_str_t *keys;
        ngx_uint_t n, nelts;
        uint32_t excess = 0;
        ngx_msec_t delay = 0;
        int rc = RC_DECLINED;

        ctx = req_ctx_get(r);
        if (ctx && ctx->status)
                return NGX_DECLINED; /* decided once per main request, as nginx does */
        lcf = ngx_http_get_module_loc_conf(r, ngx_http_shmzone_module);
        limits = lcf->limits.elts;
        nelts = lcf->limits.nelts;
        if (nelts == 0)
                return NGX_DECLINED;
        keys = ngx_pcalloc(r->pool, nelts * sizeof(ngx_str_t));
        if (!keys)
                return NGX_HTTP_INTERNAL_SERVER_ERROR;

        /* nginx's first phase: each limit but the last checked, the last one accounted. */
        for (n = 0; n < nelts; n++) {
                struct limiter_decision d;
                struct limiter_config cfg;
                bool last = n == nelts - 1;
                int r_;

                limit = &limits[n];
                if (ngx_http_complex_value(r, &limit->zone->key, &keys[n]) != NGX_OK)
                        return NGX_HTTP_INTERNAL_SERVER_ERROR;
                if (keys[n].len == 0)
                        continue;
                if (keys[n].len > 65535) {
                        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                                      "the value of the \"%V\" key is more than 65535 bytes: \"%V\"",
                                      &limit->zone->key_source, &keys[n]);
                        keys[n].len = 0;
                        continue;
                }
                cfg = limit_config(limit);
                r_ = limiter_lookup(limit->zone->lim, &cfg, keys[n].data, keys[n].len, ngx_current_msec, last, &d);
                if (r_ < 0) {
                        ngx_log_error(
                                NGX_LOG_ERR, r->connection->log, 0,
                                "shmzone_limit_req zone \"%V\": no decision: %s; %s", &limit->zone->name, strerror(-r_),
                                limit->zone->on_error_pass ? "passed (on_error=pass)" : "rejected (on_error=reject)");
                        keys[n].len = 0; /* not accounted in the second phase */
                        if (limit->zone->on_error_pass)
                                continue;
                        rc = RC_ERROR;
                        break;
                }
                excess = d.excess;
                if (d.verdict == LIMITER_REJECT) {
                        rc = RC_BUSY;
                        break;
                }
                rc = last ? RC_OK : RC_AGAIN;
                if (last)
                        break;
        }

        if (rc == RC_DECLINED)
                return NGX_DECLINED;

        if (rc == RC_BUSY || rc == RC_ERROR) {
                /* ngx_log_error() is an if of its own: braces. */
                if (rc == RC_BUSY) {
                        ngx_log_error(lcf->limit_log_level, r->connection->log, 0,
                                      "limiting requests%s, excess: %uD.%03uD by zone \"%V\"",
                                      lcf->dry_run ? ", dry run" : "", excess / 1000, excess % 1000,
                                      &limit->zone->name);
                }
                if (lcf->dry_run) {
                        req_status_set(r, ST_REJECTED_DRY_RUN);
                        return NGX_DECLINED;
                }
                req_status_set(r, ST_REJECTED);
                return lcf->status_code;
        }

        /* rc == RC_AGAIN (the last key was empty) or RC_OK. */
        if (rc == RC_AGAIN)
                excess = 0;
        if (limit->delay != LIMITER_NODELAY && excess > (uint64_t) limit->delay * 1000)
                delay = (ngx_msec_t) (((uint64_t) excess - (uint64_t) limit->delay * 1000) * 1000 / limit->zone->rate);

        /* nginx's second phase: the limits checked without account are accounted now; the longest delay wins. */
        for (ngx_uint_t i = n; i-- > 0;) {
                struct limiter_decision d;
                struct limiter_config cfg;
                int r_;

                if (i == nelts - 1 || keys[i].len == 0)
                        continue;
                cfg = limit_config(&limits[i]);
                r_ = limiter_account(limits[i].zone->lim, &cfg, keys[i].data, keys[i].len, ngx_current_msec, &d);
                if (r_ < 0) {
                        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                                      "shmzone_limit_req zone \"%V\": not accounted: %s", &limits[i].zone->name,
                                      strerror(-r_));
                        continue;
                }
                if (d.verdict == LIMITER_DELAY && d.delay_ms > delay) {
                        delay = (ngx_msec_t) d.delay_ms;
                        limit = &limits[i];
                }
        }

        if (delay == 0) {
                req_status_set(r, ST_PASSED);
                return NGX_DECLINED;
        }
        ngx_log_error(lcf->delay_log_level, r->connection->log, 0,
                      "delaying request%s, excess: %uD.%03uD, by zone \"%V\"", lcf->dry_run ? ", dry run" : "",
                      excess / 1000, excess % 1000, &limit->zone->name);
        if (lcf->dry_run) {
                req_status_set(r, ST_DELAYED_DRY_RUN);
                return NGX_DECLINED;
        }
        req_status_set(r, ST_DELAYED);

        /* No worker waits: the request sleeps on a timer, the client's hang-up still noticed. */
        if (r->connection->read->ready) {
                ngx_post_event(r->connection->read, &ngx_posted_events); /* a macro with an if */
        } else if (ngx_handle_read_event(r->connection->read, 0) != NGX_OK)
                return NGX_HTTP_INTERNAL_SERVER_ERROR;
        r->read_event_handler = ngx_http_test_reading;
        r->write_event_handler = delay_done;
        r->connection->write->delayed = 1;
        ngx_add_timer(r->connection->write, delay);
        return NGX_AGAIN;
}

/* ---- configuration ----------------------------------------------------------------------- */

static shmzone_zone_t *zone_find_or_add(ngx_conf_t *cf, shmzone_main_conf_t *mcf, const ngx_str_t *name) {
        shmzone_zone_t **zones = mcf->zones.elts, *z, **slot;

        for (ngx_uint_t i = 0; i < mcf->zones.nelts; i++)
                if (zones[i]->name.len == name->len && ngx_strncmp(zones[i]->name.data, name->data, name->len) == 0)
                        return zones[i];
        z = ngx_pcalloc(cf->pool, sizeof(*z));
        slot = ngx_array_push(&mcf->zones);
        if (!z || !slot)
                return NULL;
        z->name = *name;
        z->file = cf->conf_file->file.name;
        z->line = cf->conf_file->line;
        *slot = z;
        return z;
}

/* A zone name as shmzoned takes it: a file name in the view. */
static bool zone_name_ok(const ngx_str_t *name) {
        if (name->len == 0 || name->len > SHMZ_NAME_MAX)
                return false;
        if ((name->len == 1 && name->data[0] == '.') || (name->len == 2 && ngx_strncmp(name->data, "..", 2) == 0))
                return false;
        for (size_t i = 0; i < name->len; i++)
                if (name->data[i] == '/' || name->data[i] < 0x20 || name->data[i] == 0x7f)
                        return false;
        return true;
}

static char *shmzone_zone_directive(ngx_conf_t *cf, ngx_command_t *cmd, void *conf) {
        shmzone_main_conf_t *mcf = conf;
        ngx_str_t *value = cf->args->elts, name = ngx_null_string, s;
        ngx_http_compile_complex_value_t ccv;
        ngx_http_complex_value_t key;
        ngx_int_t rate = 1, scale = 1;
        ssize_t size = 0;
        ngx_flag_t on_error_pass = 0;
        shmzone_zone_t *z;

        ngx_memzero(&ccv, sizeof(ccv));
        ccv.cf = cf;
        ccv.value = &value[1];
        ccv.complex_value = &key;
        if (ngx_http_compile_complex_value(&ccv) != NGX_OK)
                return NGX_CONF_ERROR;

        for (ngx_uint_t i = 2; i < cf->args->nelts; i++) {
                if (ngx_strncmp(value[i].data, "zone=", 5) == 0) {
                        u_char *p;

                        name.data = value[i].data + 5;
                        p = (u_char *) ngx_strchr(name.data, ':');
                        if (!p) {
                                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "invalid zone size \"%V\"", &value[i]);
                                return NGX_CONF_ERROR;
                        }
                        name.len = (size_t) (p - name.data);
                        s.data = p + 1;
                        s.len = (size_t) (value[i].data + value[i].len - s.data);
                        size = ngx_parse_size(&s);
                        if (size == NGX_ERROR) {
                                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "invalid zone size \"%V\"", &value[i]);
                                return NGX_CONF_ERROR;
                        }
                        if (size < (ssize_t) (8 * ngx_pagesize)) {
                                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "zone \"%V\" is too small", &value[i]);
                                return NGX_CONF_ERROR;
                        }
                        continue;
                }
                if (ngx_strncmp(value[i].data, "rate=", 5) == 0) {
                        size_t len = value[i].len;

                        if (len > 8 && ngx_strncmp(value[i].data + len - 3, "r/s", 3) == 0) {
                                scale = 1;
                                len -= 3;
                        } else if (len > 8 && ngx_strncmp(value[i].data + len - 3, "r/m", 3) == 0) {
                                scale = 60;
                                len -= 3;
                        }
                        rate = ngx_atoi(value[i].data + 5, len - 5);
                        /* Milli-requests in 32 bits, as the limiter keeps them. */
                        if (rate <= 0 || rate > (ngx_int_t) (UINT32_MAX / 1000)) {
                                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "invalid rate \"%V\"", &value[i]);
                                return NGX_CONF_ERROR;
                        }
                        continue;
                }
                if (ngx_strcmp(value[i].data, "on_error=pass") == 0) {
                        on_error_pass = 1;
                        continue;
                }
                if (ngx_strcmp(value[i].data, "on_error=reject") == 0) {
                        on_error_pass = 0;
                        continue;
                }
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "invalid parameter \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
        }
        if (name.len == 0) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "\"%V\" must have \"zone\" parameter", &cmd->name);
                return NGX_CONF_ERROR;
        }
        if (!zone_name_ok(&name)) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid zone name \"%V\": 1 to %d bytes, no \"/\", not \".\" or \"..\"", &name,
                                   (int) SHMZ_NAME_MAX);
                return NGX_CONF_ERROR;
        }
        z = zone_find_or_add(cf, mcf, &name);
        if (!z)
                return NGX_CONF_ERROR;
        if (z->size != 0) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "%V \"%V\" is already bound to key \"%V\"", &cmd->name, &name,
                                   &z->key_source);
                return NGX_CONF_ERROR;
        }
        z->key = key;
        z->key_source = value[1];
        z->size = (uint64_t) size;
        z->rate = (uint32_t) (rate * 1000 / scale);
        z->on_error_pass = on_error_pass;
        z->file = cf->conf_file->file.name;
        z->line = cf->conf_file->line;
        return NGX_CONF_OK;
}

static char *shmzone_limit_directive(ngx_conf_t *cf, ngx_command_t *cmd, void *conf) {
        shmzone_loc_conf_t *lcf = conf;
        shmzone_main_conf_t *mcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_shmzone_module);
        ngx_str_t *value = cf->args->elts, name = ngx_null_string;
        ngx_int_t burst = 0, delay = 0;
        bool nodelay = false;
        shmzone_limit_t *limit, *limits;
        shmzone_zone_t *z = NULL;

        for (ngx_uint_t i = 1; i < cf->args->nelts; i++) {
                if (ngx_strncmp(value[i].data, "zone=", 5) == 0) {
                        name.data = value[i].data + 5;
                        name.len = value[i].len - 5;
                        continue;
                }
                if (ngx_strncmp(value[i].data, "burst=", 6) == 0) {
                        burst = ngx_atoi(value[i].data + 6, value[i].len - 6);
                        if (burst <= 0 || burst > LIMITER_BURST_MAX) {
                                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "invalid burst value \"%V\"", &value[i]);
                                return NGX_CONF_ERROR;
                        }
                        continue;
                }
                if (ngx_strncmp(value[i].data, "delay=", 6) == 0) {
                        delay = ngx_atoi(value[i].data + 6, value[i].len - 6);
                        if (delay <= 0 || delay > LIMITER_BURST_MAX) {
                                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "invalid delay value \"%V\"", &value[i]);
                                return NGX_CONF_ERROR;
                        }
                        nodelay = false;
                        continue;
                }
                if (ngx_strcmp(value[i].data, "nodelay") == 0) {
                        nodelay = true;
                        continue;
                }
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "invalid parameter \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
        }
        if (name.len == 0) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "\"%V\" must have \"zone\" parameter", &cmd->name);
                return NGX_CONF_ERROR;
        }
        /* The zone may be declared further down: a place-holder until then (checked in init_main_conf). */
        z = zone_find_or_add(cf, mcf, &name);
        if (!z)
                return NGX_CONF_ERROR;

        limits = lcf->limits.elts;
        if (!limits && ngx_array_init(&lcf->limits, cf->pool, 1, sizeof(shmzone_limit_t)) != NGX_OK)
                return NGX_CONF_ERROR;
        for (ngx_uint_t i = 0; i < lcf->limits.nelts; i++)
                if (limits[i].zone == z)
                        return "is duplicate";
        limit = ngx_array_push(&lcf->limits);
        if (!limit)
                return NGX_CONF_ERROR;
        limit->zone = z;
        limit->burst = (uint32_t) burst;
        limit->delay = nodelay ? LIMITER_NODELAY : (uint32_t) delay;
        return NGX_CONF_OK;
}

static void *shmzone_create_main_conf(ngx_conf_t *cf) {
        shmzone_main_conf_t *mcf = ngx_pcalloc(cf->pool, sizeof(*mcf));

        if (!mcf)
                return NULL;
        if (ngx_array_init(&mcf->zones, cf->pool, 4, sizeof(shmzone_zone_t *)) != NGX_OK)
                return NULL;
        /* socket: set by ngx_pcalloc() to empty, the default applied in init_main_conf */
        return mcf;
}

/* Only the process that opened them says goodbye to shmzoned: workers inherit the connection too. */
static void zones_cleanup(void *data) {
        shmzone_main_conf_t *mcf = data;
        shmzone_zone_t **zones = mcf->zones.elts;

        if (mcf->opener != ngx_pid)
                return;
        for (ngx_uint_t i = 0; i < mcf->zones.nelts; i++) {
                limiter_close(zones[i]->lim);
                zones[i]->lim = NULL;
                shmz_zone_close(zones[i]->zone);
                zones[i]->zone = NULL;
        }
        shmz_disconnect(mcf->client);
        mcf->client = NULL;
}

/* Why the zone could not be opened as declared, for the admin: what is there, and what to do. */
static void zone_open_error(ngx_conf_t *cf, shmzone_main_conf_t *mcf, shmzone_zone_t *z, const char *tag, int r) {
        struct shmz_zone_stat st;

        if (r == -EINVAL && shmz_zone_stat(mcf->client, (const char *) z->name.data, &st) == 0 && st.size != z->size) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "shmzone_limit_req_zone \"%V\" (%V:%ui): shmzoned's zone \"%V\" has %uL bytes, "
                                   "not %uL: a new size would drop every key; keep the size, or remove the zone "
                                   "(shmzctl rm %V) to start over",
                                   &z->name, &z->file, z->line, &z->name, (uint64_t) st.size, z->size, &z->name);
                return;
        }
        if (r == -EEXIST) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "shmzone_limit_req_zone \"%V\" (%V:%ui): shmzoned's zone \"%V\" holds something "
                                   "else than keys of \"%V\" (tag \"%s\" expected)",
                                   &z->name, &z->file, z->line, &z->name, &z->key_source, tag);
                return;
        }
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "shmzone_limit_req_zone \"%V\" (%V:%ui): cannot open zone: %s",
                           &z->name, &z->file, z->line, strerror(-r));
}

static char *shmzone_init_main_conf(ngx_conf_t *cf, void *conf) {
        shmzone_main_conf_t *mcf = conf;
        shmzone_zone_t **zones = mcf->zones.elts;
        ngx_pool_cleanup_t *cln;
        char *socket;
        int r;

        if (mcf->socket.len == 0) {
                ngx_str_set(&mcf->socket, SHMZ_DEFAULT_SOCKET); /* two statements */
        }
        for (ngx_uint_t i = 0; i < mcf->zones.nelts; i++)
                if (zones[i]->size == 0) {
                        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "unknown shmzone_limit_req_zone \"%V\"",
                                           &zones[i]->name);
                        return NGX_CONF_ERROR;
                }
        if (mcf->zones.nelts == 0)
                return NGX_CONF_OK;

        cln = ngx_pool_cleanup_add(cf->pool, 0);
        if (!cln)
                return NGX_CONF_ERROR;
        cln->handler = zones_cleanup;
        cln->data = mcf;
        mcf->opener = ngx_pid;

        socket = ngx_pcalloc(cf->pool, mcf->socket.len + 1);
        if (!socket)
                return NGX_CONF_ERROR;
        ngx_memcpy(socket, mcf->socket.data, mcf->socket.len);
        r = shmz_connect(socket, &mcf->client);
        if (r < 0) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "shmzone: cannot connect to shmzoned at \"%s\": %s (is shmzoned running? "
                                   "shmzone_socket names another socket)",
                                   socket, strerror(-r));
                return NGX_CONF_ERROR;
        }
        for (ngx_uint_t i = 0; i < mcf->zones.nelts; i++) {
                shmzone_zone_t *z = zones[i];
                struct limiter_config cfg = { .rate = z->rate, .burst = 0, .delay = 0 };
                char tag[SHMZ_TAG_BUF], *key_source, *name;

                key_source = ngx_pcalloc(cf->pool, z->key_source.len + 1);
                name = ngx_pcalloc(cf->pool, z->name.len + 1);
                if (!key_source || !name)
                        return NGX_CONF_ERROR;
                ngx_memcpy(key_source, z->key_source.data, z->key_source.len);
                ngx_memcpy(name, z->name.data, z->name.len);
                z->name.data = (u_char *) name; /* NUL-terminated from here on */
                limiter_tag(key_source, tag);
                r = shmz_zone_open(mcf->client, name, z->size, tag, SHMZ_CREATE, &z->zone);
                if (r < 0) {
                        zone_open_error(cf, mcf, z, tag, r);
                        return NGX_CONF_ERROR;
                }
                r = limiter_open(z->zone, &cfg, &z->lim);
                if (r < 0) {
                        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                           "shmzone_limit_req_zone \"%V\" (%V:%ui): the zone's limiter is unusable: "
                                           "%s",
                                           &z->name, &z->file, z->line, strerror(-r));
                        return NGX_CONF_ERROR;
                }
                limiter_set_lock_timeout(z->lim, LOCK_TIMEOUT_NS);
        }
        return NGX_CONF_OK;
}

static void *shmzone_create_loc_conf(ngx_conf_t *cf) {
        shmzone_loc_conf_t *lcf = ngx_pcalloc(cf->pool, sizeof(*lcf));

        if (!lcf)
                return NULL;
        /* limits.elts: NULL from ngx_pcalloc(), inherited unless set */
        lcf->limit_log_level = NGX_CONF_UNSET_UINT;
        lcf->status_code = NGX_CONF_UNSET_UINT;
        lcf->dry_run = NGX_CONF_UNSET;
        return lcf;
}

static char *shmzone_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child) {
        shmzone_loc_conf_t *prev = parent, *conf = child;

        if (!conf->limits.elts)
                conf->limits = prev->limits;
        ngx_conf_merge_uint_value(conf->limit_log_level, prev->limit_log_level, NGX_LOG_ERR);
        /* Delays log one level quieter than refusals, as nginx's. */
        conf->delay_log_level = conf->limit_log_level == NGX_LOG_INFO ? NGX_LOG_INFO : conf->limit_log_level + 1;
        ngx_conf_merge_uint_value(conf->status_code, prev->status_code, NGX_HTTP_SERVICE_UNAVAILABLE);
        ngx_conf_merge_value(conf->dry_run, prev->dry_run, 0);
        return NGX_CONF_OK;
}

static ngx_int_t shmzone_add_variables(ngx_conf_t *cf) {
        static ngx_str_t name = ngx_string("shmzone_limit_req_status");
        ngx_http_variable_t *var = ngx_http_add_variable(cf, &name, NGX_HTTP_VAR_NOCACHEABLE);

        if (!var)
                return NGX_ERROR;
        var->get_handler = status_variable;
        return NGX_OK;
}

static ngx_int_t shmzone_init(ngx_conf_t *cf) {
        ngx_http_core_main_conf_t *cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);
        ngx_http_handler_pt *h = ngx_array_push(&cmcf->phases[NGX_HTTP_PREACCESS_PHASE].handlers);

        if (!h)
                return NGX_ERROR;
        *h = shmzone_handler;
        return NGX_OK;
}

/*
 * Tests only: "env SHMZONE_LIMITER_CRASH_AT=N:FILE;" in nginx.conf makes the first
 * worker that creates FILE SIGKILL itself at the N-th step of an update of a zone's
 * tree or list, the lock held; the workers after it (FILE exists) do not.
 */
static ngx_int_t shmzone_init_process(ngx_cycle_t *cycle) {
        const char *s = getenv("SHMZONE_LIMITER_CRASH_AT"), *file;
        int fd;

        if (!s || !(file = strchr(s, ':')))
                return NGX_OK;
        fd = open(file + 1, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd < 0)
                return NGX_OK;
        close(fd);
        limiter_test_crash_countdown = (unsigned) strtoul(s, NULL, 10);
        return NGX_OK;
}
