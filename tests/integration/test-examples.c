/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The README's quick start, as a reader would run it: its shell lines against a
 * real daemon and mount, and examples/hello-zone.c, which the README shows whole.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"
#include "util.h"

static struct daemon_proc d;

static void start(void) {
        harness_init(&d, "[daemon]\nmemory_budget = 64M\nuid_quota = 16M\n");
        cr_assert_eq(harness_start(&d, NULL, true), 0, "daemon did not start: %s", harness_log(&d));
        cr_assert_eq(setenv("SHMZONE_SOCKET", d.socket, 1), 0);
}

static void stop(void) {
        harness_cleanup(&d);
}

TestSuite(examples, .init = start, .fini = stop, .timeout = 60);

/* The whole of a file, NUL-terminated (freed by the caller). */
static char *slurp(const char *path) {
        FILE *f = fopen(path, "re");
        char *buf = NULL;
        size_t len = 0;

        cr_assert_not_null(f, "cannot open %s", path);
        cr_assert_eq(getdelim(&buf, &len, '\0', f) > 0, true, "cannot read %s", path);
        fclose(f);
        return buf;
}

/* What cmd prints on stdout (freed by the caller); asserts that it exits 0. */
static char *run(const char *cmd) {
        FILE *p = popen(cmd, "re");
        char *out = calloc(1, 4096);
        size_t n;

        cr_assert_not_null(p, "popen %s", cmd);
        cr_assert_not_null(out);
        n = fread(out, 1, 4095, p);
        out[n] = '\0';
        cr_assert_eq(pclose(p), 0, "%s failed, printed: %s", cmd, out);
        return out;
}

Test(examples, readme_shows_hello_zone_as_it_is) {
        _cleanup_free_ char *readme = slurp(getenv("README"));
        _cleanup_free_ char *source = slurp(getenv("HELLO_ZONE_SOURCE"));

        cr_assert_not_null(strstr(readme, source), "README.md does not show examples/hello-zone.c as it is");
}

Test(examples, hello_zone_counts_its_runs_in_one_zone) {
        _cleanup_free_ char *first = run(getenv("HELLO_ZONE"));
        _cleanup_free_ char *second = run(getenv("HELLO_ZONE"));

        cr_assert_str_eq(first, "run 1\n");
        cr_assert_str_eq(second, "run 2\n");
}

/*
 * Every indented shell line of the README's "Zones in five minutes", run in order with
 * the test's mount and shmzctl in place of the defaults: the bytes written through the
 * view are read back, show knows the zone, and rm takes it away.
 */
Test(examples, readme_quick_start_commands_work) {
        _cleanup_free_ char *readme = slurp(getenv("README"));
        char *section = strstr(readme, "## Zones in five minutes");
        char *end, *line, *save = NULL;
        char od_out[256] = "", show_out[4096] = "";
        unsigned n = 0;

        cr_assert_not_null(section, "README has no quick start");
        end = strstr(section + 1, "\n## ");
        if (end)
                *end = '\0';
        for (line = strtok_r(section, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
                char cmd[2048], *p, *hash;
                size_t o = 0;

                if (strncmp(line, "    ", 4) != 0 || line[4] == '$' || line[4] == ' ')
                        continue;
                line += 4;
                if (strncmp(line, "shmzctl ", 8) != 0 && strncmp(line, "ls ", 3) != 0 &&
                    strncmp(line, "printf ", 7) != 0 && strncmp(line, "od ", 3) != 0)
                        continue;
                hash = strstr(line, "  #");
                if (hash)
                        *hash = '\0';
                /* /run/shmzone/fs -> the test's mount; a leading shmzctl -> the built one. */
                if (strncmp(line, "shmzctl ", 8) == 0) {
                        o += snprintf(cmd + o, sizeof(cmd) - o, "%s ", getenv("SHMZCTL"));
                        line += 8;
                }
                while ((p = strstr(line, "/run/shmzone/fs"))) {
                        o += snprintf(cmd + o, sizeof(cmd) - o, "%.*s%s", (int) (p - line), line, d.mount);
                        line = p + strlen("/run/shmzone/fs");
                }
                o += snprintf(cmd + o, sizeof(cmd) - o, "%s", line);
                cr_assert_lt(o, sizeof(cmd));
                _cleanup_free_ char *out = run(cmd);
                if (strncmp(cmd, "od ", 3) == 0)
                        snprintf(od_out, sizeof(od_out), "%s", out);
                if (strstr(cmd, " show cache"))
                        snprintf(show_out, sizeof(show_out), "%s", out);
                n++;
        }
        cr_assert_geq(n, 6, "only %u commands found in the quick start", n);
        cr_assert_not_null(strstr(od_out, "h   e   l   l   o"), "od printed: %s", od_out);
        cr_assert_not_null(strstr(show_out, "notes"), "show printed no tag: %s", show_out);
        /* rm ran last: the zone is gone from the view. */
        char path[256];
        snprintf(path, sizeof(path), "%s/zones/cache", d.mount);
        cr_assert_neq(access(path, F_OK), 0, "%s still there after rm", path);
}

int main(int argc, char *argv[]) {
        return harness_main(argc, argv, /* need_root= */ true, /* need_fuse= */ true);
}
