/* SPDX-License-Identifier: LGPL-2.1-or-later */
#define FUSE_USE_VERSION 312

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <fuse_lowlevel.h>
#include <pthread.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <unistd.h>

#include "stallfs.h"

#define FILE_INO 2
#define FILE_SIZE (1 << 20)
#define MAX_STALLED 1024

struct stallfs {
        struct fuse_session *se;
        pthread_t thread;
        pthread_mutex_t lock;
        fuse_req_t stalled[MAX_STALLED];
        unsigned n_stalled;
        bool stall_flush;
        pid_t flush_except;
        bool released;
};

/* Keeps req unanswered, unless stalling is over (then EIO at once). */
static void stall(struct stallfs *s, fuse_req_t req) {
        pthread_mutex_lock(&s->lock);
        if (!s->released && s->n_stalled < MAX_STALLED) {
                s->stalled[s->n_stalled++] = req;
                req = NULL;
        }
        pthread_mutex_unlock(&s->lock);
        if (req)
                fuse_reply_err(req, EIO);
}

static void file_stat(struct stat *st) {
        *st = (struct stat){ .st_ino = FILE_INO, .st_mode = S_IFREG | 0666, .st_nlink = 1, .st_size = FILE_SIZE };
}

static void sf_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
        struct fuse_entry_param e = { .ino = FILE_INO };

        if (parent != FUSE_ROOT_ID || strcmp(name, "file") != 0) {
                fuse_reply_err(req, ENOENT);
                return;
        }
        file_stat(&e.attr);
        fuse_reply_entry(req, &e);
}

static void sf_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
        struct stat st;

        if (ino == FUSE_ROOT_ID)
                st = (struct stat){ .st_ino = ino, .st_mode = S_IFDIR | 0755, .st_nlink = 2 };
        else
                file_stat(&st);
        fuse_reply_attr(req, &st, 0);
}

static void sf_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
        fuse_reply_open(req, fi);
}

static void sf_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
        stall(fuse_req_userdata(req), req);
}

static void sf_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
        struct stallfs *s = fuse_req_userdata(req);
        bool yes;

        pthread_mutex_lock(&s->lock);
        yes = s->stall_flush && fuse_req_ctx(req)->pid != s->flush_except;
        pthread_mutex_unlock(&s->lock);
        if (yes)
                stall(s, req);
        else
                fuse_reply_err(req, 0);
}

static void sf_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
        fuse_reply_err(req, 0);
}

static const struct fuse_lowlevel_ops ops = {
        .lookup = sf_lookup,
        .getattr = sf_getattr,
        .open = sf_open,
        .read = sf_read,
        .flush = sf_flush,
        .release = sf_release,
};

static void *loop(void *arg) {
        struct stallfs *s = arg;

        /* Single-threaded on purpose: stalled requests cost no thread. */
        (void) fuse_session_loop(s->se);
        return NULL;
}

int stallfs_start(const char *dir, struct stallfs **ret) {
        char *argv[] = { (char *) "stallfs", (char *) "-o", (char *) "allow_other", NULL };
        struct fuse_args args = FUSE_ARGS_INIT(3, argv);
        struct stallfs *s;

        s = calloc(1, sizeof(*s));
        if (!s)
                return -ENOMEM;
        pthread_mutex_init(&s->lock, NULL);
        (void) mkdir(dir, 0755);
        s->se = fuse_session_new(&args, &ops, sizeof(ops), s);
        fuse_opt_free_args(&args);
        if (!s->se) {
                free(s);
                return -EINVAL;
        }
        if (fuse_session_mount(s->se, dir) != 0) {
                fuse_session_destroy(s->se);
                free(s);
                return -EIO;
        }
        if (pthread_create(&s->thread, NULL, loop, s) != 0) {
                fuse_session_unmount(s->se);
                fuse_session_destroy(s->se);
                free(s);
                return -EAGAIN;
        }
        *ret = s;
        return 0;
}

void stallfs_stall_flushes(struct stallfs *s, pid_t except) {
        pthread_mutex_lock(&s->lock);
        s->stall_flush = true;
        s->flush_except = except;
        pthread_mutex_unlock(&s->lock);
}

unsigned stallfs_stalled(struct stallfs *s) {
        unsigned n;

        pthread_mutex_lock(&s->lock);
        n = s->n_stalled;
        pthread_mutex_unlock(&s->lock);
        return n;
}

void stallfs_release(struct stallfs *s) {
        fuse_req_t v[MAX_STALLED];
        unsigned n;

        pthread_mutex_lock(&s->lock);
        s->released = true;
        n = s->n_stalled;
        memcpy(v, s->stalled, n * sizeof(v[0]));
        s->n_stalled = 0;
        pthread_mutex_unlock(&s->lock);
        for (unsigned i = 0; i < n; i++)
                fuse_reply_err(v[i], EIO);
}

void stallfs_stop(struct stallfs *s) {
        if (!s)
                return;
        stallfs_release(s);
        fuse_session_exit(s->se);
        /* Unmounting makes the loop's read of /dev/fuse return. */
        fuse_session_unmount(s->se);
        (void) pthread_join(s->thread, NULL);
        fuse_session_destroy(s->se);
        pthread_mutex_destroy(&s->lock);
        free(s);
}

int stallfs_start_with_stalling_fd(const char *dir, struct stallfs **ret) {
        char path[PATH_MAX];
        int r, fd;

        r = stallfs_start(dir, ret);
        if (r < 0)
                return r;
        stallfs_stall_flushes(*ret, (pid_t) syscall(SYS_gettid));
        snprintf(path, sizeof(path), "%s/file", dir);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        return fd < 0 ? -errno : fd;
}
