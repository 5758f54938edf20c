/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * shmzone for Python: zones and ports of libshmzone, their memory exported
 * in place through the buffer protocol.
 *
 * Lifetimes. Every object that owns library state (client, zone, listener,
 * port) counts its users: exported buffers, calls in flight with the GIL
 * released, and (ports) messages, send buffers and calls still holding its
 * memory. close() marks the object closed at once (every method then raises
 * ValueError) and releases the memoryviews over it; the library object goes
 * when the last user does. A memoryview that cannot be released (another
 * export sits on it: a numpy array made from it) keeps the mapping alive until
 * it goes, so it reads the old bytes and never freed memory.
 *
 * Blocking calls wait in slices with the GIL released, so that a close()
 * from another thread and signals (KeyboardInterrupt) are seen within a slice:
 * the library frees its objects in its close calls, which therefore only run
 * once no thread is inside them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <shmzone.h>

/* Runs stmt with the GIL released (errno survives the hand-back). */
#define NOGIL(stmt)                                                                                                    \
        do {                                                                                                           \
                PyThreadState *_ts = PyEval_SaveThread();                                                              \
                stmt;                                                                                                  \
                PyEval_RestoreThread(_ts);                                                                             \
        } while (0)

/* How long a blocking call sleeps in the library before it looks at close() and signals again. */
#define SLICE_NS (50 * 1000 * 1000LL)

static PyObject *OwnerDied;
static PyObject *gc_get_referrers;
static PyObject *str_release;

static PyTypeObject Client_Type, Zone_Type, ZoneLock_Type, Listener_Type, Port_Type, Message_Type, PortBuffer_Type,
        Call_Type;

/* ---- errors ------------------------------------------------------------------------------------ */

/* OSError's subclass for the errno (FileExistsError, TimeoutError, ...); NULL for returning. */
static PyObject *set_errno(int r, PyObject *what) {
        errno = r < 0 ? -r : r;
        if (what)
                return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, what);
        return PyErr_SetFromErrno(PyExc_OSError);
}

static PyObject *set_errno_str(int r, const char *what) {
        PyObject *o = what ? PyUnicode_DecodeFSDefault(what) : NULL;

        set_errno(r, o);
        Py_XDECREF(o);
        return NULL;
}

static PyObject *closed_error(const char *what) {
        PyErr_Format(PyExc_ValueError, "operation on a closed %s", what);
        return NULL;
}

/* None: -1 (forever); seconds, 0 or more: nanoseconds. */
static int timeout_from(PyObject *o, int64_t *ret) {
        double s;

        if (!o || o == Py_None) {
                *ret = -1;
                return 0;
        }
        s = PyFloat_AsDouble(o);
        if (s == -1.0 && PyErr_Occurred())
                return -1;
        if (!(s >= 0)) {
                PyErr_SetString(PyExc_ValueError, "timeout must be None or non-negative seconds");
                return -1;
        }
        *ret = s >= 9.2e9 ? INT64_MAX : (int64_t) (s * 1e9);
        return 0;
}

static uint64_t now_ns(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000000ull + (uint64_t) ts.tv_nsec;
}

/*
 * Runs op(ctx, t) with the GIL released in slices of at most SLICE_NS until it
 * returns anything but -ETIMEDOUT/-EAGAIN or the timeout passes. Between
 * slices, with the GIL: signals, then *closed. Returns op's result, or
 * INT_MIN with a Python exception set.
 */
typedef int (*sliced_op_t)(void *ctx, int64_t timeout_ns);

static int run_sliced(sliced_op_t op, void *ctx, int64_t timeout_ns, const int *closed, const char *what) {
        uint64_t deadline = timeout_ns < 0 ? UINT64_MAX : now_ns() + (uint64_t) timeout_ns;
        int r;

        if (timeout_ns == 0)
                return op(ctx, 0);
        for (;;) {
                /* No clock read for a wait without a timeout: a round trip's receive is one such. */
                uint64_t now = deadline == UINT64_MAX ? 0 : now_ns();
                int64_t t = deadline == UINT64_MAX ? SLICE_NS
                            : deadline > now
                                    ? (int64_t) (deadline - now < (uint64_t) SLICE_NS ? deadline - now : SLICE_NS)
                                    : 0;

                if (t == 0)
                        return -ETIMEDOUT;
                NOGIL(r = op(ctx, t));
                if (r != -ETIMEDOUT && r != -EAGAIN)
                        return r;
                if (PyErr_CheckSignals() < 0)
                        return INT_MIN;
                if (__atomic_load_n(closed, __ATOMIC_ACQUIRE)) {
                        closed_error(what);
                        return INT_MIN;
                }
                if (deadline != UINT64_MAX && now_ns() >= deadline)
                        return -ETIMEDOUT;
        }
}

/*
 * Memoryviews that close() released over an exporter, found by the garbage
 * collector's referrer links (exporter <- managed buffer <- memoryviews), the
 * only way from an exporter to them. One of them may be the base that numpy
 * keeps under an array and reads through by pointer, so the exporter's memory
 * stays until every one of them is gone: a weak reference's callback each
 * counts them down and settles the exporter.
 */
struct borrows {
        Py_ssize_t n;   /* released views still alive */
        PyObject *refs; /* list of the weak references to them */
};

static struct borrows *borrows_of(PyObject *exporter);
static void settle(PyObject *exporter);

static PyObject *borrow_end(PyObject *exporter, PyObject *ref) {
        struct borrows *b = borrows_of(exporter);
        Py_ssize_t i;

        Py_INCREF(exporter); /* the list's entry may hold the last reference to the callback */
        if (b->refs) {
                for (i = 0; i < PyList_GET_SIZE(b->refs); i++)
                        if (PyList_GET_ITEM(b->refs, i) == ref) {
                                (void) PySequence_DelItem(b->refs, i);
                                break;
                        }
                if (PyList_GET_SIZE(b->refs) == 0)
                        Py_CLEAR(b->refs);
        }
        b->n--;
        settle(exporter);
        Py_DECREF(exporter);
        Py_RETURN_NONE;
}

static PyMethodDef borrow_end_def = { "borrow_end", borrow_end, METH_O, NULL };

/* Releases every memoryview over exporter that nothing exports in turn (those keep the memory themselves). */
static void revoke_views(PyObject *exporter) {
        struct borrows *b = borrows_of(exporter);
        PyObject *mbufs, *views, *r, *cb, *ref;

        mbufs = PyObject_CallOneArg(gc_get_referrers, exporter);
        cb = mbufs ? PyCFunction_New(&borrow_end_def, exporter) : NULL;
        if (!cb) {
                Py_XDECREF(mbufs);
                PyErr_Clear();
                return;
        }
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(mbufs); i++) {
                PyObject *mb = PyList_GET_ITEM(mbufs, i);

                if (strcmp(Py_TYPE(mb)->tp_name, "managedbuffer") != 0)
                        continue;
                views = PyObject_CallOneArg(gc_get_referrers, mb);
                if (!views) {
                        PyErr_Clear();
                        continue;
                }
                for (Py_ssize_t j = 0; j < PyList_GET_SIZE(views); j++) {
                        PyObject *v = PyList_GET_ITEM(views, j);

                        if (!PyMemoryView_Check(v))
                                continue;
                        /* Counted before the release: without the count, no release. */
                        if (!b->refs)
                                b->refs = PyList_New(0);
                        ref = b->refs ? PyWeakref_NewRef(v, cb) : NULL;
                        if (!ref || PyList_Append(b->refs, ref) < 0) {
                                Py_XDECREF(ref);
                                PyErr_Clear();
                                continue;
                        }
                        Py_DECREF(ref);
                        b->n++; /* before: the release may end the last export, which settles */
                        r = PyObject_CallMethodNoArgs(v, str_release);
                        if (r) {
                                Py_DECREF(r);
                                continue;
                        }
                        /* BufferError: something exports the view, and that export keeps the memory. */
                        PyErr_Clear();
                        b->n--;
                        (void) PySequence_DelItem(b->refs, PyList_GET_SIZE(b->refs) - 1);
                }
                Py_DECREF(views);
        }
        Py_DECREF(cb);
        Py_DECREF(mbufs);
        if (b->refs && PyList_GET_SIZE(b->refs) == 0)
                Py_CLEAR(b->refs);
}

/* memoryview.release() on a view we made; false if something still exports it. */
static bool release_view(PyObject *v) {
        PyObject *r = PyObject_CallMethodNoArgs(v, str_release);

        if (!r) {
                PyErr_Clear();
                return false;
        }
        Py_DECREF(r);
        return true;
}

/* Releases the memoryview a weak reference leads to, if it still lives. */
static void release_weak_view(PyObject **ref) {
        PyObject *v;

        if (!*ref)
                return;
        v = PyWeakref_GetObject(*ref);
        if (v && v != Py_None) {
                Py_INCREF(v);
                (void) release_view(v);
                Py_DECREF(v);
        }
        Py_CLEAR(*ref);
}

/* ---- Client ------------------------------------------------------------------------------------ */

typedef struct {
        PyObject_HEAD struct shmz_client *c;
        int closed;
        Py_ssize_t users; /* calls in flight */
} ClientObject;

static void client_finish(ClientObject *self) {
        if (self->users == 0 && self->c) {
                shmz_disconnect(self->c);
                self->c = NULL;
        }
}

static int client_enter(ClientObject *self) {
        if (self->closed) {
                closed_error("client");
                return -1;
        }
        self->users++;
        return 0;
}

static void client_leave(ClientObject *self) {
        self->users--;
        if (self->closed)
                client_finish(self);
}

static int Client_init(ClientObject *self, PyObject *args, PyObject *kw) {
        static char *kwlist[] = { "socket", NULL };
        PyObject *sock = Py_None, *b = NULL;
        const char *path = NULL;
        int r;

        if (!PyArg_ParseTupleAndKeywords(args, kw, "|O:Client", kwlist, &sock))
                return -1;
        if (self->c) {
                PyErr_SetString(PyExc_RuntimeError, "Client already initialised");
                return -1;
        }
        if (sock != Py_None) {
                if (!PyUnicode_FSConverter(sock, &b))
                        return -1;
                path = PyBytes_AS_STRING(b);
        }
        NOGIL(r = shmz_connect(path, &self->c));
        if (r < 0) {
                set_errno_str(r, path ? path : getenv("SHMZONE_SOCKET") ?: SHMZ_DEFAULT_SOCKET);
                Py_XDECREF(b);
                return -1;
        }
        Py_XDECREF(b);
        return 0;
}

static void Client_dealloc(ClientObject *self) {
        if (self->c)
                shmz_disconnect(self->c);
        Py_TYPE(self)->tp_free((PyObject *) self);
}

static PyObject *Client_close(ClientObject *self, PyObject *unused) {
        self->closed = 1;
        client_finish(self);
        Py_RETURN_NONE;
}

static PyObject *return_self(PyObject *self, PyObject *unused) {
        return Py_NewRef(self);
}

static PyObject *Client_exit(ClientObject *self, PyObject *args) {
        return Client_close(self, NULL);
}

static PyObject *zone_new(struct shmz_zone *z, bool readonly);

/* shmz_zone_open(), and the mode asked for on a zone it created (the daemon creates them 0600). */
static int zone_open_mode(struct shmz_client *c, const char *name, uint64_t size, const char *tag, unsigned flags,
                          int mode, struct shmz_zone **ret) {
        struct shmz_zone *z;
        int r;

        r = shmz_zone_open(c, name, size, tag, flags, &z);
        if (r < 0)
                return r;
        if (mode >= 0 && !shmz_zone_existed(z)) {
                r = shmz_zone_chmod(c, name, (mode_t) mode);
                if (r < 0) {
                        shmz_zone_close(z);
                        return r;
                }
        }
        *ret = z;
        return 0;
}

static PyObject *Client_zone(ClientObject *self, PyObject *args, PyObject *kw) {
        static char *kwlist[] = { "name", "size", "tag", "mode", "create", "exclusive", "readonly", NULL };
        const char *name, *tag = NULL;
        unsigned long long size = 0;
        PyObject *mode = Py_None, *create = Py_None, *res;
        int exclusive = 0, readonly = 0, r, mode_v = -1;
        unsigned flags = 0;
        struct shmz_zone *z;

        if (!PyArg_ParseTupleAndKeywords(args, kw, "s|KzOOpp:zone", kwlist, &name, &size, &tag, &mode, &create,
                                         &exclusive, &readonly))
                return NULL;
        if (mode != Py_None) {
                mode_v = PyLong_AsLong(mode) & 07777;
                if (PyErr_Occurred())
                        return NULL;
        }
        /* size=0 attaches as it is; a size creates it if missing unless create=False. */
        if (create == Py_None ? size > 0 : PyObject_IsTrue(create))
                flags |= SHMZ_CREATE;
        if (exclusive)
                flags |= SHMZ_EXCL;
        if (readonly)
                flags |= SHMZ_RDONLY;
        if (client_enter(self) < 0)
                return NULL;
        NOGIL(r = zone_open_mode(self->c, name, size, tag, flags, mode_v, &z));
        client_leave(self);
        if (r < 0)
                return set_errno_str(r, name);
        res = zone_new(z, readonly);
        if (!res)
                shmz_zone_close(z);
        return res;
}

static PyStructSequence_Field zone_stat_fields[] = {
        { "name", NULL },       { "tag", NULL },        { "size", "usable bytes" },
        { "map_size", NULL },   { "generation", NULL }, { "created_usec", NULL },
        { "uid", NULL },        { "gid", NULL },        { "mode", NULL },
        { "attached", NULL },   { "flags", NULL },      { "ino", "inode number in the FUSE view" },
        { "mtime_usec", NULL }, { "ctime_usec", NULL }, { NULL, NULL },
};
static PyStructSequence_Desc zone_stat_desc = { "shmzone.ZoneStat", "A zone's figures, as the daemon sees them.",
                                                zone_stat_fields, 14 };
static PyTypeObject *ZoneStat_Type;

static PyStructSequence_Field status_fields[] = {
        { "budget", NULL },         { "budget_used", NULL },  { "quota", NULL },       { "zones", NULL },
        { "zones_unlinked", NULL }, { "clients", NULL },      { "requests", NULL },    { "errors", NULL },
        { "segments", NULL },       { "uptime_usec", NULL },  { "listeners", NULL },   { "ports", NULL },
        { "segment_bytes", NULL },  { "chunks", NULL },       { "chunks_used", NULL }, { "messages", NULL },
        { "message_bytes", NULL },  { "ports_closed", NULL }, { "peers_died", NULL },  { NULL, NULL },
};
static PyStructSequence_Desc status_desc = { "shmzone.DaemonStatus", "The daemon's figures.", status_fields, 19 };
static PyTypeObject *DaemonStatus_Type;

static PyObject *zone_stat_to_py(const struct shmz_zone_stat *st) {
        PyObject *o = PyStructSequence_New(ZoneStat_Type);
        PyObject *v[14];

        if (!o)
                return NULL;
        v[0] = PyUnicode_DecodeFSDefaultAndSize(st->name, (Py_ssize_t) strnlen(st->name, sizeof(st->name)));
        v[1] = PyUnicode_DecodeFSDefaultAndSize(st->tag, (Py_ssize_t) strnlen(st->tag, sizeof(st->tag)));
        v[2] = PyLong_FromUnsignedLongLong(st->size);
        v[3] = PyLong_FromUnsignedLongLong(st->map_size);
        v[4] = PyLong_FromUnsignedLongLong(st->generation);
        v[5] = PyLong_FromUnsignedLongLong(st->created_usec);
        v[6] = PyLong_FromUnsignedLong(st->uid);
        v[7] = PyLong_FromUnsignedLong(st->gid);
        v[8] = PyLong_FromUnsignedLong(st->mode);
        v[9] = PyLong_FromUnsignedLong(st->attached);
        v[10] = PyLong_FromUnsignedLong(st->flags);
        v[11] = PyLong_FromUnsignedLongLong(st->ino);
        v[12] = PyLong_FromUnsignedLongLong(st->mtime_usec);
        v[13] = PyLong_FromUnsignedLongLong(st->ctime_usec);
        for (int i = 0; i < 14; i++) {
                if (!v[i]) {
                        for (int j = i + 1; j < 14; j++)
                                Py_XDECREF(v[j]);
                        Py_DECREF(o);
                        return NULL;
                }
                PyStructSequence_SET_ITEM(o, i, v[i]);
        }
        return o;
}

static PyObject *Client_stat(ClientObject *self, PyObject *arg) {
        struct shmz_zone_stat st;
        const char *name = PyUnicode_AsUTF8(arg);
        int r;

        if (!name || client_enter(self) < 0)
                return NULL;
        NOGIL(r = shmz_zone_stat(self->c, name, &st));
        client_leave(self);
        if (r < 0)
                return set_errno(r, arg);
        return zone_stat_to_py(&st);
}

#define LIST_MAX 65536

struct stat_list {
        struct shmz_zone_stat *v;
        size_t n, cap;
};

static int collect_stat(const struct shmz_zone_stat *st, void *userdata) {
        struct stat_list *l = userdata;

        if (l->n == l->cap) {
                size_t cap = l->cap ? l->cap * 2 : 16;
                struct shmz_zone_stat *v;

                if (cap > LIST_MAX)
                        return -E2BIG;
                v = realloc(l->v, cap * sizeof(*v));
                if (!v)
                        return -ENOMEM;
                l->v = v;
                l->cap = cap;
        }
        l->v[l->n++] = *st;
        return 0;
}

static PyObject *Client_zones(ClientObject *self, PyObject *unused) {
        struct stat_list l = {};
        PyObject *res = NULL, *o;
        int r;

        if (client_enter(self) < 0)
                return NULL;
        /* Collected without the GIL, converted with it: the callback runs inside the library. */
        NOGIL(r = shmz_zone_list(self->c, collect_stat, &l));
        client_leave(self);
        if (r < 0) {
                set_errno(r, NULL);
                goto out;
        }
        res = PyList_New(0);
        for (size_t i = 0; res && i < l.n; i++) {
                o = zone_stat_to_py(&l.v[i]);
                if (!o || PyList_Append(res, o) < 0)
                        Py_CLEAR(res);
                Py_XDECREF(o);
        }
out:
        free(l.v);
        return res;
}

static PyObject *Client_unlink(ClientObject *self, PyObject *arg) {
        const char *name = PyUnicode_AsUTF8(arg);
        int r;

        if (!name || client_enter(self) < 0)
                return NULL;
        NOGIL(r = shmz_zone_unlink(self->c, name));
        client_leave(self);
        if (r < 0)
                return set_errno(r, NULL);
        Py_RETURN_NONE;
}

static PyObject *Client_chmod(ClientObject *self, PyObject *args) {
        const char *name;
        unsigned mode;
        int r;

        if (!PyArg_ParseTuple(args, "sI:chmod", &name, &mode) || client_enter(self) < 0)
                return NULL;
        NOGIL(r = shmz_zone_chmod(self->c, name, (mode_t) mode));
        client_leave(self);
        if (r < 0)
                return set_errno_str(r, name);
        Py_RETURN_NONE;
}

static PyObject *Client_chown(ClientObject *self, PyObject *args) {
        const char *name;
        int uid, gid, r;

        if (!PyArg_ParseTuple(args, "sii:chown", &name, &uid, &gid) || client_enter(self) < 0)
                return NULL;
        NOGIL(r = shmz_zone_chown(self->c, name, (uid_t) uid, (gid_t) gid));
        client_leave(self);
        if (r < 0)
                return set_errno_str(r, name);
        Py_RETURN_NONE;
}

static PyObject *Client_status(ClientObject *self, PyObject *unused) {
        struct shmz_daemon_status s;
        const uint64_t *f = &s.budget;
        PyObject *o;
        int r;

        /* The struct is 19 uint64_t in a row. */
        _Static_assert(sizeof(s) == 19 * sizeof(uint64_t), "shmz_daemon_status is 19 uint64_t");
        if (client_enter(self) < 0)
                return NULL;
        NOGIL(r = shmz_daemon_status(self->c, &s));
        client_leave(self);
        if (r < 0)
                return set_errno(r, NULL);
        o = PyStructSequence_New(DaemonStatus_Type);
        for (int i = 0; o && i < 19; i++) {
                PyObject *v = PyLong_FromUnsignedLongLong(f[i]);

                if (!v) {
                        Py_CLEAR(o);
                        break;
                }
                PyStructSequence_SET_ITEM(o, i, v);
        }
        return o;
}

static PyObject *Client_get_daemon_pid(ClientObject *self, void *unused) {
        int r;

        if (self->closed)
                return closed_error("client");
        r = shmz_client_daemon_pid(self->c);
        if (r < 0)
                return set_errno(r, NULL);
        return PyLong_FromLong(r);
}

static PyObject *Client_get_closed(ClientObject *self, void *unused) {
        return PyBool_FromLong(self->closed);
}

static PyObject *listener_new(struct shmz_listener *l);
static PyObject *port_new(struct shmz_port *p);

static PyObject *Client_listen(ClientObject *self, PyObject *args, PyObject *kw) {
        static char *kwlist[] = { "name", "mode", NULL };
        const char *name;
        unsigned mode = 0600;
        struct shmz_listener *l;
        PyObject *res;
        int r;

        if (!PyArg_ParseTupleAndKeywords(args, kw, "s|I:listen", kwlist, &name, &mode) || client_enter(self) < 0)
                return NULL;
        NOGIL(r = shmz_port_listen(self->c, name, (mode_t) mode, &l));
        client_leave(self);
        if (r < 0)
                return set_errno_str(r, name);
        res = listener_new(l);
        if (!res)
                shmz_listener_close(l);
        return res;
}

static PyObject *Client_connect_port(ClientObject *self, PyObject *arg) {
        const char *name = PyUnicode_AsUTF8(arg);
        struct shmz_port *p;
        PyObject *res;
        int r;

        if (!name || client_enter(self) < 0)
                return NULL;
        NOGIL(r = shmz_port_connect(self->c, name, &p));
        client_leave(self);
        if (r < 0)
                return set_errno(r, arg);
        res = port_new(p);
        if (!res)
                shmz_port_close(p);
        return res;
}

static PyMethodDef Client_methods[] = {
        { "zone", (PyCFunction) (void (*)(void)) Client_zone, METH_VARARGS | METH_KEYWORDS,
          "zone(name, size=0, tag=None, mode=None, create=None, exclusive=False, readonly=False) -> Zone" },
        { "stat", (PyCFunction) Client_stat, METH_O, "stat(name) -> ZoneStat" },
        { "zones", (PyCFunction) Client_zones, METH_NOARGS, "zones() -> [ZoneStat]" },
        { "unlink", (PyCFunction) Client_unlink, METH_O, "unlink(name)" },
        { "chmod", (PyCFunction) Client_chmod, METH_VARARGS, "chmod(name, mode)" },
        { "chown", (PyCFunction) Client_chown, METH_VARARGS, "chown(name, uid, gid); -1 leaves one alone" },
        { "status", (PyCFunction) Client_status, METH_NOARGS, "status() -> DaemonStatus" },
        { "listen", (PyCFunction) (void (*)(void)) Client_listen, METH_VARARGS | METH_KEYWORDS,
          "listen(name, mode=0o600) -> Listener" },
        { "connect_port", (PyCFunction) Client_connect_port, METH_O, "connect_port(name) -> Port" },
        { "close", (PyCFunction) Client_close, METH_NOARGS, "close(); zones and ports opened stay usable" },
        { "__enter__", return_self, METH_NOARGS, NULL },
        { "__exit__", (PyCFunction) Client_exit, METH_VARARGS, NULL },
        { NULL },
};

static PyGetSetDef Client_getset[] = {
        { "daemon_pid", (getter) Client_get_daemon_pid, NULL, "the daemon's pid", NULL },
        { "closed", (getter) Client_get_closed, NULL, NULL, NULL },
        { NULL },
};

static PyTypeObject Client_Type = {
        PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmzone.Client",
        .tp_basicsize = sizeof(ClientObject),
        .tp_flags = Py_TPFLAGS_DEFAULT,
        .tp_doc = "Client(socket=None): a connection to shmzoned ($SHMZONE_SOCKET or the default path).",
        .tp_new = PyType_GenericNew,
        .tp_init = (initproc) Client_init,
        .tp_dealloc = (destructor) Client_dealloc,
        .tp_methods = Client_methods,
        .tp_getset = Client_getset,
};

/* ---- Zone -------------------------------------------------------------------------------------- */

typedef struct {
        PyObject_HEAD struct shmz_zone *z;
        int closed;
        Py_ssize_t users;   /* exports + calls in flight */
        Py_ssize_t exports; /* buffers handed out */
        Py_ssize_t holds;   /* its lock, taken through this object and not unlocked yet */
        struct borrows borrows;
        bool readonly;
} ZoneObject;

static void zone_finish(ZoneObject *self) {
        if (self->users == 0 && self->borrows.n == 0 && self->z) {
                shmz_zone_close(self->z);
                self->z = NULL;
        }
}

static int zone_enter(ZoneObject *self) {
        if (self->closed) {
                closed_error("zone");
                return -1;
        }
        self->users++;
        return 0;
}

static void zone_leave(ZoneObject *self) {
        self->users--;
        if (self->closed)
                zone_finish(self);
}

static PyObject *zone_new(struct shmz_zone *z, bool readonly) {
        ZoneObject *self = PyObject_New(ZoneObject, &Zone_Type);

        if (!self)
                return NULL;
        self->z = z;
        self->closed = 0;
        self->users = self->exports = self->holds = 0;
        self->borrows = (struct borrows){};
        self->readonly = readonly;
        return (PyObject *) self;
}

static void Zone_dealloc(ZoneObject *self) {
        if (self->z)
                shmz_zone_close(self->z);
        PyObject_Free(self);
}

static PyObject *Zone_close(ZoneObject *self, PyObject *unused) {
        if (self->closed)
                Py_RETURN_NONE;
        __atomic_store_n(&self->closed, 1, __ATOMIC_RELEASE);
        if (self->exports > 0)
                revoke_views((PyObject *) self);
        zone_finish(self);
        Py_RETURN_NONE;
}

static PyObject *Zone_exit(ZoneObject *self, PyObject *args) {
        return Zone_close(self, NULL);
}

static int Zone_getbuffer(ZoneObject *self, Py_buffer *view, int flags) {
        if (self->closed) {
                PyErr_SetString(PyExc_ValueError, "operation on a closed zone");
                return -1;
        }
        if (PyBuffer_FillInfo(view, (PyObject *) self, shmz_zone_base(self->z), (Py_ssize_t) shmz_zone_size(self->z),
                              self->readonly, flags) < 0)
                return -1;
        self->exports++;
        self->users++;
        return 0;
}

static void Zone_releasebuffer(ZoneObject *self, Py_buffer *view) {
        self->exports--;
        zone_leave(self);
}

static PyBufferProcs Zone_as_buffer = {
        .bf_getbuffer = (getbufferproc) Zone_getbuffer,
        .bf_releasebuffer = (releasebufferproc) Zone_releasebuffer,
};

/* The zone's bytes [off, off + n) (zone offsets, as alloc() returns them) as a memoryview over the zone. */
static PyObject *Zone_buffer(ZoneObject *self, PyObject *args) {
        unsigned long long off, n;
        uint8_t *p, *base;
        PyObject *mv, *res, *start, *stop, *slice;
        uint64_t size;

        if (!PyArg_ParseTuple(args, "KK:buffer", &off, &n))
                return NULL;
        if (self->closed)
                return closed_error("zone");
        p = shmz_pointer(self->z, off);
        base = shmz_zone_base(self->z);
        size = shmz_zone_size(self->z);
        if (!p || p < base || n > size || (uint64_t) (p - base) > size - n) {
                PyErr_Format(PyExc_ValueError, "offset %llu, %llu bytes: not inside the zone", off, n);
                return NULL;
        }
        /* A slice of a view over the zone: the zone stays the exporter that close() revokes. */
        mv = PyMemoryView_FromObject((PyObject *) self);
        if (!mv)
                return NULL;
        start = PyLong_FromSsize_t(p - base);
        stop = PyLong_FromSsize_t(p - base + (Py_ssize_t) n);
        slice = start && stop ? PySlice_New(start, stop, NULL) : NULL;
        res = slice ? PyObject_GetItem(mv, slice) : NULL;
        Py_XDECREF(slice);
        Py_XDECREF(start);
        Py_XDECREF(stop);
        Py_DECREF(mv);
        return res;
}

static PyObject *Zone_alloc_common(ZoneObject *self, PyObject *arg, bool zero) {
        Py_ssize_t n = PyNumber_AsSsize_t(arg, PyExc_OverflowError);
        void *p;

        if (n == -1 && PyErr_Occurred())
                return NULL;
        if (n < 0) {
                PyErr_SetString(PyExc_ValueError, "size must not be negative");
                return NULL;
        }
        if (zone_enter(self) < 0)
                return NULL;
        /* The allocator takes the zone lock: another process may hold it for a while. */
        errno = 0;
        NOGIL(p = zero ? shmz_calloc(self->z, (size_t) n) : shmz_alloc(self->z, (size_t) n));
        if (!p && errno != EROFS)
                errno = ENOMEM;
        zone_leave(self);
        if (!p) {
                if (errno == ENOMEM)
                        return PyErr_Format(PyExc_MemoryError, "the zone has no %zd bytes free", n);
                return set_errno(-errno, NULL);
        }
        return PyLong_FromUnsignedLongLong(shmz_offset(self->z, p));
}

static PyObject *Zone_alloc(ZoneObject *self, PyObject *arg) {
        return Zone_alloc_common(self, arg, false);
}

static PyObject *Zone_calloc(ZoneObject *self, PyObject *arg) {
        return Zone_alloc_common(self, arg, true);
}

static PyObject *Zone_free(ZoneObject *self, PyObject *arg) {
        unsigned long long off = PyLong_AsUnsignedLongLong(arg);
        void *p;
        int r;

        if (PyErr_Occurred() || zone_enter(self) < 0)
                return NULL;
        p = shmz_pointer(self->z, off);
        if (!p) {
                zone_leave(self);
                return PyErr_Format(PyExc_ValueError, "offset %llu is not inside the zone", off);
        }
        NOGIL(r = shmz_free_checked(self->z, p));
        zone_leave(self);
        if (r < 0)
                return set_errno(r, NULL);
        Py_RETURN_NONE;
}

static PyObject *Zone_check(ZoneObject *self, PyObject *unused) {
        int r;

        if (zone_enter(self) < 0)
                return NULL;
        NOGIL(r = shmz_zone_check(self->z));
        zone_leave(self);
        if (r < 0 && r != -EUCLEAN)
                return set_errno(r, NULL);
        return PyBool_FromLong(r == 0);
}

static PyObject *Zone_get_root(ZoneObject *self, void *unused) {
        void *p;

        if (self->closed)
                return closed_error("zone");
        p = shmz_zone_root(self->z);
        return PyLong_FromUnsignedLongLong(p ? shmz_offset(self->z, p) : 0);
}

static int Zone_set_root(ZoneObject *self, PyObject *v, void *unused) {
        unsigned long long off;
        void *p = NULL;
        int r;

        if (!v) {
                PyErr_SetString(PyExc_AttributeError, "root cannot be deleted (set 0)");
                return -1;
        }
        off = PyLong_AsUnsignedLongLong(v);
        if (PyErr_Occurred())
                return -1;
        if (self->closed) {
                closed_error("zone");
                return -1;
        }
        if (off != 0) {
                p = shmz_pointer(self->z, off);
                if (!p) {
                        PyErr_Format(PyExc_ValueError, "offset %llu is not inside the zone", off);
                        return -1;
                }
        }
        r = shmz_zone_set_root(self->z, p);
        if (r < 0) {
                set_errno(r, NULL);
                return -1;
        }
        return 0;
}

static PyObject *Zone_get_name(ZoneObject *self, void *unused) {
        if (self->closed)
                return closed_error("zone");
        return PyUnicode_DecodeFSDefault(shmz_zone_name(self->z));
}

static PyObject *Zone_get_size(ZoneObject *self, void *unused) {
        if (self->closed)
                return closed_error("zone");
        return PyLong_FromUnsignedLongLong(shmz_zone_size(self->z));
}

static PyObject *Zone_get_existed(ZoneObject *self, void *unused) {
        if (self->closed)
                return closed_error("zone");
        return PyBool_FromLong(shmz_zone_existed(self->z) > 0);
}

static PyObject *Zone_get_closed(ZoneObject *self, void *unused) {
        return PyBool_FromLong(self->closed);
}

static PyObject *Zone_get_readonly(ZoneObject *self, void *unused) {
        return PyBool_FromLong(self->readonly);
}

/* The zone lock. The calling thread holds it: unlock from the same thread. */
typedef struct {
        PyObject_HEAD ZoneObject *zone;
} ZoneLockObject;

struct lock_ctx {
        struct shmz_mutex *m;
};

static int lock_op(void *userdata, int64_t timeout_ns) {
        struct lock_ctx *c = userdata;

        return timeout_ns == 0 ? shmz_mutex_trylock(c->m) : shmz_mutex_timedlock(c->m, (uint64_t) timeout_ns);
}

/* 0, or -1 with an exception set; OwnerDied leaves the caller holding the lock. */
static int zone_lock(ZoneObject *self, int64_t timeout_ns) {
        struct lock_ctx c;
        int r;

        if (zone_enter(self) < 0)
                return -1;
        c.m = shmz_zone_mutex(self->z);
        /* Uncontended: no GIL hand-over, as multiprocessing's SemLock tries first too. */
        r = shmz_mutex_trylock(c.m);
        if (r == -EBUSY && timeout_ns != 0)
                r = run_sliced(lock_op, &c, timeout_ns, &self->closed, "zone");
        /* Held, the lock keeps the mapping (its word is in it, and on the thread's robust list) until unlock(). */
        if (r == 0 || r == SHMZ_OWNER_DEAD)
                self->holds++;
        else
                zone_leave(self);
        if (r == INT_MIN)
                return -1;
        if (r == SHMZ_OWNER_DEAD) {
                PyObject *e = Py_BuildValue("(is)", EOWNERDEAD,
                                            "the zone lock's last holder died holding it: you hold it now; repair, "
                                            "then consistent() and unlock()");

                if (e) {
                        PyErr_SetObject(OwnerDied, e);
                        Py_DECREF(e);
                }
                return -1;
        }
        if (r == -EBUSY)
                r = -EAGAIN;
        if (r < 0) {
                set_errno(r, NULL);
                return -1;
        }
        return 0;
}

static PyObject *Zone_lock(ZoneObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
        PyObject *to = Py_None;
        ZoneLockObject *g;
        int64_t t;

        if (nargs > 1 ||
            (kwnames &&
             (PyTuple_GET_SIZE(kwnames) != 1 || nargs != 0 || !PyUnicode_Check(PyTuple_GET_ITEM(kwnames, 0)) ||
              PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "timeout") != 0))) {
                PyErr_SetString(PyExc_TypeError, "lock(timeout=None)");
                return NULL;
        }
        if (nargs == 1 || kwnames)
                to = args[0];
        if (timeout_from(to, &t) < 0)
                return NULL;
        g = PyObject_New(ZoneLockObject, &ZoneLock_Type);
        if (!g)
                return NULL;
        g->zone = (ZoneObject *) Py_NewRef(self);
        if (zone_lock(self, t) < 0) {
                Py_DECREF(g);
                return NULL;
        }
        return (PyObject *) g;
}

/* Also on a closed zone whose lock is still held: the mapping waits for it. */
static PyObject *Zone_unlock(ZoneObject *self, PyObject *unused) {
        int r;

        if (!self->z)
                return closed_error("zone");
        r = shmz_mutex_unlock(shmz_zone_mutex(self->z));
        if (r < 0)
                return set_errno(r, NULL);
        if (self->holds > 0) {
                self->holds--;
                zone_leave(self);
        }
        Py_RETURN_NONE;
}

static PyObject *Zone_consistent(ZoneObject *self, PyObject *unused) {
        int r;

        if (!self->z)
                return closed_error("zone");
        r = shmz_mutex_consistent(shmz_zone_mutex(self->z));
        if (r < 0)
                return set_errno(r, NULL);
        Py_RETURN_NONE;
}

static void ZoneLock_dealloc(ZoneLockObject *self) {
        Py_DECREF(self->zone);
        PyObject_Free(self);
}

static PyObject *ZoneLock_exit(ZoneLockObject *self, PyObject *const *args, Py_ssize_t nargs) {
        return Zone_unlock(self->zone, NULL);
}

static PyMethodDef ZoneLock_methods[] = {
        { "__enter__", return_self, METH_NOARGS, NULL },
        { "__exit__", (PyCFunction) (void (*)(void)) ZoneLock_exit, METH_FASTCALL, NULL },
        { NULL },
};

static PyTypeObject ZoneLock_Type = {
        PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmzone.ZoneLock",
        .tp_basicsize = sizeof(ZoneLockObject),
        .tp_flags = Py_TPFLAGS_DEFAULT,
        .tp_doc = "The zone lock, held; leaving the with block unlocks it.",
        .tp_dealloc = (destructor) ZoneLock_dealloc,
        .tp_methods = ZoneLock_methods,
};

static PyMethodDef Zone_methods[] = {
        { "lock", (PyCFunction) (void (*)(void)) Zone_lock, METH_FASTCALL | METH_KEYWORDS,
          "lock(timeout=None): takes the zone's robust lock (a context manager unlocks it); OwnerDied if its last "
          "holder died: the caller holds it then" },
        { "unlock", (PyCFunction) Zone_unlock, METH_NOARGS, NULL },
        { "consistent", (PyCFunction) Zone_consistent, METH_NOARGS,
          "after OwnerDied: what the lock protects is repaired" },
        { "alloc", (PyCFunction) Zone_alloc, METH_O, "alloc(n) -> offset; MemoryError when full" },
        { "calloc", (PyCFunction) Zone_calloc, METH_O, "calloc(n) -> offset of n zeroed bytes" },
        { "free", (PyCFunction) Zone_free, METH_O, "free(offset)" },
        { "buffer", (PyCFunction) Zone_buffer, METH_VARARGS, "buffer(offset, n) -> memoryview in place" },
        { "check", (PyCFunction) Zone_check, METH_NOARGS, "check() -> True if the allocator is consistent" },
        { "close", (PyCFunction) Zone_close, METH_NOARGS, NULL },
        { "__enter__", return_self, METH_NOARGS, NULL },
        { "__exit__", (PyCFunction) Zone_exit, METH_VARARGS, NULL },
        { NULL },
};

static PyGetSetDef Zone_getset[] = {
        { "name", (getter) Zone_get_name, NULL, NULL, NULL },
        { "size", (getter) Zone_get_size, NULL, "usable bytes", NULL },
        { "existed", (getter) Zone_get_existed, NULL, "True if its data predates this open", NULL },
        { "closed", (getter) Zone_get_closed, NULL, NULL, NULL },
        { "readonly", (getter) Zone_get_readonly, NULL, NULL, NULL },
        { "root", (getter) Zone_get_root, (setter) Zone_set_root, "offset of the zone's top-level object, 0: none",
          NULL },
        { NULL },
};

static PyTypeObject Zone_Type = {
        PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmzone.Zone",
        .tp_basicsize = sizeof(ZoneObject),
        .tp_flags = Py_TPFLAGS_DEFAULT,
        .tp_doc = "A zone: memoryview(zone) is its usable bytes in place.",
        .tp_dealloc = (destructor) Zone_dealloc,
        .tp_methods = Zone_methods,
        .tp_getset = Zone_getset,
        .tp_as_buffer = &Zone_as_buffer,
};

static PyObject *open_path(PyObject *module, PyObject *args, PyObject *kw) {
        static char *kwlist[] = { "path", "readonly", NULL };
        PyObject *path, *res;
        int readonly = 0, r;
        struct shmz_zone *z;

        if (!PyArg_ParseTupleAndKeywords(args, kw, "O&|p:open_path", kwlist, PyUnicode_FSConverter, &path, &readonly))
                return NULL;
        NOGIL(r = shmz_zone_open_path(PyBytes_AS_STRING(path), readonly ? SHMZ_RDONLY : 0, &z));
        if (r < 0) {
                set_errno_str(r, PyBytes_AS_STRING(path));
                Py_DECREF(path);
                return NULL;
        }
        Py_DECREF(path);
        res = zone_new(z, readonly);
        if (!res)
                shmz_zone_close(z);
        return res;
}

/* ---- Listener ---------------------------------------------------------------------------------- */

typedef struct {
        PyObject_HEAD struct shmz_listener *l;
        int closed;
        Py_ssize_t users;
} ListenerObject;

static PyObject *listener_new(struct shmz_listener *l) {
        ListenerObject *self = PyObject_New(ListenerObject, &Listener_Type);

        if (!self)
                return NULL;
        self->l = l;
        self->closed = 0;
        self->users = 0;
        return (PyObject *) self;
}

static void listener_finish(ListenerObject *self) {
        if (self->users == 0 && self->l) {
                shmz_listener_close(self->l);
                self->l = NULL;
        }
}

static void Listener_dealloc(ListenerObject *self) {
        if (self->l)
                shmz_listener_close(self->l);
        PyObject_Free(self);
}

struct accept_ctx {
        struct shmz_listener *l;
        struct shmz_port *p;
};

static int accept_op(void *userdata, int64_t t) {
        struct accept_ctx *c = userdata;

        return shmz_port_accept(c->l, t, &c->p);
}

static PyObject *Listener_accept(ListenerObject *self, PyObject *args, PyObject *kw) {
        static char *kwlist[] = { "timeout", NULL };
        struct accept_ctx c = {};
        PyObject *to = Py_None, *res;
        int64_t t;
        int r;

        if (!PyArg_ParseTupleAndKeywords(args, kw, "|O:accept", kwlist, &to) || timeout_from(to, &t) < 0)
                return NULL;
        if (self->closed)
                return closed_error("listener");
        self->users++;
        c.l = self->l;
        r = run_sliced(accept_op, &c, t, &self->closed, "listener");
        self->users--;
        if (self->closed)
                listener_finish(self);
        if (r == INT_MIN) {
                if (c.p)
                        shmz_port_close(c.p);
                return NULL;
        }
        if (r < 0)
                return set_errno(r, NULL);
        res = port_new(c.p);
        if (!res)
                shmz_port_close(c.p);
        return res;
}

static PyObject *Listener_fileno(ListenerObject *self, PyObject *unused) {
        int fd;

        if (self->closed)
                return closed_error("listener");
        fd = shmz_listener_fd(self->l);
        if (fd < 0)
                return set_errno(fd, NULL);
        return PyLong_FromLong(fd);
}

static PyObject *Listener_close(ListenerObject *self, PyObject *unused) {
        __atomic_store_n(&self->closed, 1, __ATOMIC_RELEASE);
        listener_finish(self);
        Py_RETURN_NONE;
}

static PyObject *Listener_exit(ListenerObject *self, PyObject *args) {
        return Listener_close(self, NULL);
}

static PyObject *Listener_get_closed(ListenerObject *self, void *unused) {
        return PyBool_FromLong(self->closed);
}

static PyMethodDef Listener_methods[] = {
        { "accept", (PyCFunction) (void (*)(void)) Listener_accept, METH_VARARGS | METH_KEYWORDS,
          "accept(timeout=None) -> Port" },
        { "fileno", (PyCFunction) Listener_fileno, METH_NOARGS, "readable when a connection waits" },
        { "close", (PyCFunction) Listener_close, METH_NOARGS, "the name goes" },
        { "__enter__", return_self, METH_NOARGS, NULL },
        { "__exit__", (PyCFunction) Listener_exit, METH_VARARGS, NULL },
        { NULL },
};

static PyGetSetDef Listener_getset[] = {
        { "closed", (getter) Listener_get_closed, NULL, NULL, NULL },
        { NULL },
};

static PyTypeObject Listener_Type = {
        PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmzone.Listener",
        .tp_basicsize = sizeof(ListenerObject),
        .tp_flags = Py_TPFLAGS_DEFAULT,
        .tp_doc = "A published port name; accept() takes the connections.",
        .tp_dealloc = (destructor) Listener_dealloc,
        .tp_methods = Listener_methods,
        .tp_getset = Listener_getset,
};

/* ---- Port -------------------------------------------------------------------------------------- */

/*
 * Messages that shmz_port_dispatch() hands to the port's handler while a
 * call() waits for its replies: kept for recv(). Filled without the GIL.
 */
struct inbox_item {
        struct shmz_msg m;
        struct inbox_item *next;
};

struct inbox {
        pthread_mutex_t lock;
        struct inbox_item *head, **tail;
};

/*
 * A receive spins (in the library, the GIL released) for up to SPIN_NS before
 * it sleeps: a peer in another process that answers at once (request and
 * reply) answers within a few microseconds, and a sleep costs both sides a
 * wake-up that takes longer than the whole reply. A spin that ends in a sleep
 * anyway (an idle port, a peer that waits for a CPU on a loaded machine) was
 * wasted, so after each the next 1, 2, 4, ... SPIN_BACKOFF_MAX receives sleep
 * at once; one that the spin catches starts the count again. set_spin(s)
 * fixes the spin instead.
 */
#define SPIN_NS (30 * 1000LL)
#define SPIN_BACKOFF_MAX 64u

struct spin {
        int64_t fixed;    /* set_spin()'s, or -1: adaptive */
        uint64_t set;     /* what the library has now */
        unsigned skip;    /* receives left that sleep at once */
        unsigned backoff; /* the last wasted spin's skip (0: the last spin caught its message) */
};

/* Objects that hold the port's memory: revoked at close (linked while they hold it). */
typedef struct child {
        PyObject_HEAD struct child *prev, *next;
        int kind; /* CHILD_* */
} ChildObject;

enum { CHILD_MESSAGE, CHILD_BUFFER, CHILD_CALL };

typedef struct {
        PyObject_HEAD struct shmz_port *p;
        int closed;
        Py_ssize_t users; /* calls in flight + children */
        ChildObject *children;
        struct inbox *inbox;
        struct spin spin;
} PortObject;

static void inbox_handler(struct shmz_port *p, struct shmz_msg *m, void *userdata) {
        struct inbox *q = userdata;
        struct inbox_item *it = malloc(sizeof(*it));

        if (!it) {
                /* Nowhere to keep it: it goes as one nobody handled would. */
                if (m->fd >= 0)
                        close(m->fd);
                shmz_msg_release(p, m);
                return;
        }
        it->m = *m;
        it->next = NULL;
        pthread_mutex_lock(&q->lock);
        *q->tail = it;
        q->tail = &it->next;
        pthread_mutex_unlock(&q->lock);
}

static bool inbox_pop(struct inbox *q, struct shmz_msg *ret) {
        struct inbox_item *it;

        pthread_mutex_lock(&q->lock);
        it = q->head;
        if (it) {
                q->head = it->next;
                if (!q->head)
                        q->tail = &q->head;
        }
        pthread_mutex_unlock(&q->lock);
        if (!it)
                return false;
        *ret = it->m;
        free(it);
        return true;
}

static PyObject *port_new(struct shmz_port *p) {
        PortObject *self = PyObject_New(PortObject, &Port_Type);

        if (!self)
                return NULL;
        self->p = p;
        self->closed = 0;
        self->users = 0;
        self->children = NULL;
        self->spin = (struct spin){ .fixed = -1 };
        self->inbox = calloc(1, sizeof(*self->inbox));
        if (!self->inbox) {
                self->p = NULL;
                Py_DECREF(self);
                return PyErr_NoMemory();
        }
        pthread_mutex_init(&self->inbox->lock, NULL);
        self->inbox->tail = &self->inbox->head;
        shmz_port_set_handler(p, inbox_handler, self->inbox);
        return (PyObject *) self;
}

static void port_close_now(PortObject *self) {
        struct shmz_msg m;

        if (!self->p)
                return;
        if (self->inbox)
                while (inbox_pop(self->inbox, &m)) {
                        if (m.fd >= 0)
                                close(m.fd);
                        shmz_msg_release(self->p, &m);
                }
        shmz_port_close(self->p);
        self->p = NULL;
        if (self->inbox) {
                pthread_mutex_destroy(&self->inbox->lock);
                free(self->inbox);
                self->inbox = NULL;
        }
}

static void port_leave(PortObject *self) {
        self->users--;
        if (self->closed && self->users == 0)
                port_close_now(self);
}

static void port_link(PortObject *self, ChildObject *c, int kind) {
        c->kind = kind;
        c->prev = NULL;
        c->next = self->children;
        if (c->next)
                c->next->prev = c;
        self->children = c;
        self->users++;
}

static void port_unlink(PortObject *self, ChildObject *c) {
        if (c->prev)
                c->prev->next = c->next;
        else
                self->children = c->next;
        if (c->next)
                c->next->prev = c->prev;
        c->prev = c->next = NULL;
        port_leave(self);
}

static void Port_dealloc(PortObject *self) {
        /* Children hold references: none is left here, nor a call in flight. */
        port_close_now(self);
        if (self->inbox) {
                pthread_mutex_destroy(&self->inbox->lock);
                free(self->inbox);
        }
        PyObject_Free(self);
}

/* ---- Message ----------------------------------------------------------------------------------- */

typedef struct {
        ChildObject child;
        PortObject *port;
        struct shmz_msg m;
        bool released; /* by the caller: data raises from now on */
        bool done;     /* the chunks went back (shmz_msg_release) */
        bool own_fd;
        Py_ssize_t exports;
        struct borrows borrows;
        PyObject *view_ref; /* weak reference to the memoryview m.data gave last */
} MessageObject;

static void message_finish(MessageObject *self) {
        if (self->done || self->exports > 0 || self->borrows.n > 0)
                return;
        self->done = true;
        if (self->own_fd && self->m.fd >= 0)
                close(self->m.fd);
        self->m.fd = -1;
        shmz_msg_release(self->port->p, &self->m);
        port_unlink(self->port, &self->child);
}

static PyObject *message_new(PortObject *port, const struct shmz_msg *m) {
        MessageObject *self = PyObject_New(MessageObject, &Message_Type);

        if (!self) {
                if (m->fd >= 0)
                        close(m->fd);
                shmz_msg_release(port->p, (struct shmz_msg *) m);
                return NULL;
        }
        self->port = (PortObject *) Py_NewRef(port);
        self->m = *m;
        self->released = self->done = false;
        self->own_fd = true;
        self->exports = 0;
        self->borrows = (struct borrows){};
        self->view_ref = NULL;
        port_link(port, &self->child, CHILD_MESSAGE);
        return (PyObject *) self;
}

/* The caller is done with it; memoryviews over it are released, the chunks go once none is left. */
static void message_release(MessageObject *self) {
        if (self->released)
                return;
        self->released = true;
        release_weak_view(&self->view_ref);
        if (self->exports > 0)
                revoke_views((PyObject *) self);
        if (self->exports == 0)
                message_finish(self);
}

static void Message_dealloc(MessageObject *self) {
        Py_CLEAR(self->view_ref);
        message_finish(self);
        Py_DECREF(self->port);
        PyObject_Free(self);
}

static int Message_getbuffer(MessageObject *self, Py_buffer *view, int flags) {
        if (self->released) {
                PyErr_SetString(PyExc_ValueError, "operation on a released message");
                return -1;
        }
        /* The sender's memory: read it, copy what you validate. */
        if (PyBuffer_FillInfo(view, (PyObject *) self, self->m.data, (Py_ssize_t) self->m.size, 1, flags) < 0)
                return -1;
        self->exports++;
        return 0;
}

static void Message_releasebuffer(MessageObject *self, Py_buffer *view) {
        if (--self->exports == 0 && self->released)
                message_finish(self);
}

static PyBufferProcs Message_as_buffer = {
        .bf_getbuffer = (getbufferproc) Message_getbuffer,
        .bf_releasebuffer = (releasebufferproc) Message_releasebuffer,
};

static PyObject *Message_get_data(MessageObject *self, void *unused) {
        PyObject *v;

        if (self->released) {
                PyErr_SetString(PyExc_ValueError, "operation on a released message");
                return NULL;
        }
        if (self->view_ref) {
                v = PyWeakref_GetObject(self->view_ref);
                if (v != Py_None)
                        return Py_NewRef(v);
                Py_CLEAR(self->view_ref);
        }
        v = PyMemoryView_FromObject((PyObject *) self);
        if (!v)
                return NULL;
        self->view_ref = PyWeakref_NewRef(v, NULL);
        if (!self->view_ref)
                Py_CLEAR(v);
        return v;
}

static PyObject *Message_release(MessageObject *self, PyObject *unused) {
        message_release(self);
        Py_RETURN_NONE;
}

static PyObject *Message_exit(MessageObject *self, PyObject *const *args, Py_ssize_t nargs) {
        message_release(self);
        Py_RETURN_NONE;
}

static PyObject *Message_get_fd(MessageObject *self, void *unused) {
        if (self->m.fd < 0)
                Py_RETURN_NONE;
        return PyLong_FromLong(self->m.fd);
}

static PyObject *Message_take_fd(MessageObject *self, PyObject *unused) {
        int fd = self->m.fd;

        if (fd < 0)
                Py_RETURN_NONE;
        self->m.fd = -1;
        return PyLong_FromLong(fd);
}

static PyObject *Message_get_last(MessageObject *self, void *unused) {
        return PyBool_FromLong(!!(self->m.flags & SHMZ_MSG_LAST));
}

static PyObject *Message_get_released(MessageObject *self, void *unused) {
        return PyBool_FromLong(self->released);
}

static Py_ssize_t Message_len(MessageObject *self) {
        return (Py_ssize_t) self->m.size;
}

static PyObject *Message_repr(MessageObject *self) {
        return PyUnicode_FromFormat("<shmzone.Message type=%u stream=%u flags=%u size=%zu%s>", self->m.type,
                                    self->m.stream, self->m.flags, self->m.size, self->released ? " released" : "");
}

static PyMemberDef Message_members[] = {
        { "type", T_UINT, offsetof(MessageObject, m.type), READONLY, NULL },
        { "stream", T_UINT, offsetof(MessageObject, m.stream), READONLY, NULL },
        { "flags", T_UINT, offsetof(MessageObject, m.flags), READONLY, NULL },
        { NULL },
};

static PyGetSetDef Message_getset[] = {
        { "data", (getter) Message_get_data, NULL, "the payload in place (read-only memoryview)", NULL },
        { "fd", (getter) Message_get_fd, NULL, "the fd that rode along, or None; closed at release unless taken",
          NULL },
        { "last", (getter) Message_get_last, NULL, "flags & LAST", NULL },
        { "released", (getter) Message_get_released, NULL, NULL, NULL },
        { NULL },
};

static PyMethodDef Message_methods[] = {
        { "release", (PyCFunction) Message_release, METH_NOARGS, "its memory goes back to the sender" },
        { "take_fd", (PyCFunction) Message_take_fd, METH_NOARGS, "the fd, now the caller's to close (or None)" },
        { "__enter__", return_self, METH_NOARGS, NULL },
        { "__exit__", (PyCFunction) (void (*)(void)) Message_exit, METH_FASTCALL, NULL },
        { NULL },
};

static PySequenceMethods Message_as_sequence = { .sq_length = (lenfunc) Message_len };

static PyTypeObject Message_Type = {
        PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmzone.Message",
        .tp_basicsize = sizeof(MessageObject),
        .tp_flags = Py_TPFLAGS_DEFAULT,
        .tp_doc = "A received message: data is the payload in place until release().",
        .tp_dealloc = (destructor) Message_dealloc,
        .tp_members = Message_members,
        .tp_getset = Message_getset,
        .tp_methods = Message_methods,
        .tp_as_buffer = &Message_as_buffer,
        .tp_as_sequence = &Message_as_sequence,
        .tp_repr = (reprfunc) Message_repr,
};

/* ---- PortBuffer: a send buffer in the port's shared memory -------------------------------------- */

typedef struct {
        ChildObject child;
        PortObject *port;
        void *buf;
        size_t size;
        bool gone; /* sent, or the port closed: no memory of the caller's any more */
        bool linked;
        bool sent;
        Py_ssize_t exports;
        struct borrows borrows;
        PyObject *view_ref; /* weak reference to the memoryview buffer() returned */
} PortBufferObject;

static void portbuffer_finish(PortBufferObject *self) {
        if (!self->linked || self->exports > 0 || self->borrows.n > 0)
                return;
        self->linked = false;
        if (!self->sent)
                shmz_port_buf_free(self->port->p, self->buf);
        port_unlink(self->port, &self->child);
}

/* After a send from a port buffer: the caller's views of it go (the views left keep the port's memory). */
static void portbuffer_revoke(PortBufferObject *pb, PyObject *data, bool sent) {
        pb->gone = true;
        pb->sent = pb->sent || sent; /* a port's close after the send: it is still sent */
        if (data && PyMemoryView_Check(data))
                (void) release_view(data);
        release_weak_view(&pb->view_ref);
        if (pb->exports > 0)
                revoke_views((PyObject *) pb);
        portbuffer_finish(pb);
}

static void PortBuffer_dealloc(PortBufferObject *self) {
        Py_CLEAR(self->view_ref);
        self->exports = 0;
        portbuffer_finish(self);
        Py_DECREF(self->port);
        PyObject_Free(self);
}

static int PortBuffer_getbuffer(PortBufferObject *self, Py_buffer *view, int flags) {
        if (self->gone) {
                PyErr_SetString(PyExc_ValueError, "operation on a port buffer that was sent or whose port closed");
                return -1;
        }
        if (PyBuffer_FillInfo(view, (PyObject *) self, self->buf, (Py_ssize_t) self->size, 0, flags) < 0)
                return -1;
        self->exports++;
        return 0;
}

static void PortBuffer_releasebuffer(PortBufferObject *self, Py_buffer *view) {
        /* Sent or revoked with views left: the port's memory stayed ours until now. */
        if (--self->exports == 0 && self->gone)
                portbuffer_finish(self);
}

static PyBufferProcs PortBuffer_as_buffer = {
        .bf_getbuffer = (getbufferproc) PortBuffer_getbuffer,
        .bf_releasebuffer = (releasebufferproc) PortBuffer_releasebuffer,
};

static PyTypeObject PortBuffer_Type = {
        PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmzone.PortBuffer",
        .tp_basicsize = sizeof(PortBufferObject),
        .tp_flags = Py_TPFLAGS_DEFAULT,
        .tp_doc = "What Port.buffer()'s memoryviews point into.",
        .tp_dealloc = (destructor) PortBuffer_dealloc,
        .tp_as_buffer = &PortBuffer_as_buffer,
};

/* ---- Call: the replies of one call ------------------------------------------------------------- */

/*
 * Shared between the iterator and the library's reply handler, which runs in
 * whichever thread dispatches (without the GIL) or in shmz_port_close().
 * Two references: the library's (until the handler's last call: an error or
 * a reply flagged LAST) and the iterator's.
 */
struct call_state {
        pthread_mutex_t lock;
        int refs;
        struct inbox_item *head, **tail;
        bool ended;    /* the library called the handler for the last time */
        int error;     /* how it ended: 0 (LAST), -EPIPE, -ETIMEDOUT */
        bool orphaned; /* the iterator went: replies are released at once */
};

static void call_state_unref(struct call_state *s) {
        bool last;

        pthread_mutex_lock(&s->lock);
        last = --s->refs == 0;
        pthread_mutex_unlock(&s->lock);
        if (last) {
                pthread_mutex_destroy(&s->lock);
                free(s);
        }
}

static void call_reply(struct shmz_port *p, int error, struct shmz_msg *reply, void *userdata) {
        struct call_state *s = userdata;
        struct inbox_item *it = NULL;
        bool end = error < 0 || (reply && (reply->flags & SHMZ_MSG_LAST));

        pthread_mutex_lock(&s->lock);
        if (reply && !s->orphaned)
                it = malloc(sizeof(*it));
        if (it) {
                it->m = *reply;
                it->next = NULL;
                *s->tail = it;
                s->tail = &it->next;
        } else if (reply) {
                if (reply->fd >= 0)
                        close(reply->fd);
                shmz_msg_release(p, reply);
                if (!s->orphaned && !end) {
                        /* Lost for want of memory: the call ends here rather than skip a reply. */
                        s->error = -ENOMEM;
                }
        }
        if (end) {
                s->ended = true;
                if (s->error == 0)
                        s->error = error;
        }
        pthread_mutex_unlock(&s->lock);
        if (end)
                call_state_unref(s);
}

typedef struct {
        ChildObject child;
        PortObject *port;
        struct call_state *s;
        bool linked;
} CallObject;

static void call_drain(CallObject *self) {
        struct inbox_item *it;

        pthread_mutex_lock(&self->s->lock);
        self->s->orphaned = true;
        it = self->s->head;
        self->s->head = NULL;
        self->s->tail = &self->s->head;
        pthread_mutex_unlock(&self->s->lock);
        while (it) {
                struct inbox_item *next = it->next;

                if (it->m.fd >= 0)
                        close(it->m.fd);
                shmz_msg_release(self->port->p, &it->m);
                free(it);
                it = next;
        }
}

static void call_finish(CallObject *self) {
        if (!self->linked)
                return;
        self->linked = false;
        call_drain(self);
        port_unlink(self->port, &self->child);
}

static void Call_dealloc(CallObject *self) {
        call_finish(self);
        call_state_unref(self->s);
        Py_DECREF(self->port);
        PyObject_Free(self);
}

static bool call_pop(struct call_state *s, struct shmz_msg *ret, bool *ret_ended, int *ret_error) {
        struct inbox_item *it;

        pthread_mutex_lock(&s->lock);
        it = s->head;
        if (it) {
                s->head = it->next;
                if (!s->head)
                        s->tail = &s->head;
        }
        *ret_ended = s->ended;
        *ret_error = s->error;
        pthread_mutex_unlock(&s->lock);
        if (!it)
                return false;
        *ret = it->m;
        free(it);
        return true;
}

struct dispatch_ctx {
        struct shmz_port *p;
        struct call_state *s;
};

static int dispatch_op(void *userdata, int64_t t) {
        struct dispatch_ctx *c = userdata;
        bool ended, has;
        int r;

        r = shmz_port_dispatch(c->p, t);
        if (r == -EPIPE || r == -EBADMSG) /* the call's handler heard of it too */
                return 0;
        if (r < 0)
                return r;
        pthread_mutex_lock(&c->s->lock);
        has = c->s->head != NULL;
        ended = c->s->ended;
        pthread_mutex_unlock(&c->s->lock);
        /* Others' replies or messages for recv(): wait on for ours. */
        return has || ended ? 0 : -EAGAIN;
}

static PyObject *Call_next(CallObject *self) {
        struct dispatch_ctx c;
        struct shmz_msg m;
        bool ended;
        int error, r;

        for (;;) {
                if (!self->linked) {
                        closed_error("port");
                        return NULL;
                }
                if (call_pop(self->s, &m, &ended, &error))
                        return message_new(self->port, &m);
                if (ended) {
                        call_finish(self);
                        if (error < 0)
                                return set_errno(error, NULL);
                        return NULL; /* StopIteration */
                }
                /* The library's deadline ends the call (ETIMEDOUT): wait without one of our own. */
                c = (struct dispatch_ctx){ .p = self->port->p, .s = self->s };
                self->port->users++;
                r = run_sliced(dispatch_op, &c, -1, &self->port->closed, "port");
                port_leave(self->port);
                if (r == INT_MIN)
                        return NULL;
                if (r < 0)
                        return set_errno(r, NULL);
        }
}

static PyTypeObject Call_Type = {
        PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmzone.Call",
        .tp_basicsize = sizeof(CallObject),
        .tp_flags = Py_TPFLAGS_DEFAULT,
        .tp_doc = "The replies of a call, ending with the one flagged LAST.",
        .tp_dealloc = (destructor) Call_dealloc,
        .tp_iter = PyObject_SelfIter,
        .tp_iternext = (iternextfunc) Call_next,
};

/* ---- Port methods ------------------------------------------------------------------------------ */

static int port_enter(PortObject *self) {
        if (self->closed) {
                closed_error("port");
                return -1;
        }
        self->users++;
        return 0;
}

static PyObject *Port_close(PortObject *self, PyObject *unused) {
        PyObject *list;

        if (self->closed)
                Py_RETURN_NONE;
        __atomic_store_n(&self->closed, 1, __ATOMIC_RELEASE);
        /* Revoking may free children: hold them while walking. */
        list = PyList_New(0);
        for (ChildObject *c = self->children; list && c; c = c->next)
                if (PyList_Append(list, (PyObject *) c) < 0)
                        Py_CLEAR(list);
        if (!list)
                return NULL;
        self->users++;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); i++) {
                ChildObject *c = (ChildObject *) PyList_GET_ITEM(list, i);

                if (c->kind == CHILD_MESSAGE)
                        message_release((MessageObject *) c);
                else if (c->kind == CHILD_CALL)
                        call_finish((CallObject *) c);
                else {
                        portbuffer_revoke((PortBufferObject *) c, NULL, false);
                }
        }
        Py_DECREF(list);
        port_leave(self);
        Py_RETURN_NONE;
}

static PyObject *Port_exit(PortObject *self, PyObject *args) {
        return Port_close(self, NULL);
}

struct recv_ctx {
        struct shmz_port *p;
        struct shmz_msg m;
};

static int recv_op(void *userdata, int64_t t) {
        struct recv_ctx *c = userdata;

        return shmz_port_recv(c->p, &c->m, t);
}

/* The spin of the receive about to wait (0: none to learn from), told to the library if it changed. */
static uint64_t spin_before(PortObject *self) {
        struct spin *sp = &self->spin;
        uint64_t want;

        if (sp->fixed >= 0)
                want = (uint64_t) sp->fixed;
        else if (sp->skip > 0) {
                sp->skip--;
                want = 0;
        } else
                want = SPIN_NS;
        if (want != sp->set) {
                (void) shmz_port_set_spin(self->p, want);
                sp->set = want;
        }
        return sp->fixed >= 0 ? 0 : want;
}

/* caught: the message came within the spin. */
static void spin_after(PortObject *self, bool caught) {
        struct spin *sp = &self->spin;

        if (caught)
                sp->backoff = 0;
        else
                sp->skip = sp->backoff = sp->backoff == 0                     ? 1
                                         : sp->backoff * 2 > SPIN_BACKOFF_MAX ? SPIN_BACKOFF_MAX
                                                                              : sp->backoff * 2;
}

static PyObject *Port_recv(PortObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
        PyObject *to = nargs > 0 ? args[0] : Py_None, *res;
        struct recv_ctx c;
        int64_t t;
        int r;

        if (nargs > 1 ||
            (kwnames && (nargs != 0 || PyTuple_GET_SIZE(kwnames) != 1 ||
                         PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "timeout") != 0))) {
                PyErr_SetString(PyExc_TypeError, "recv(timeout=None)");
                return NULL;
        }
        if (kwnames)
                to = args[0];
        if (timeout_from(to, &t) < 0 || port_enter(self) < 0)
                return NULL;
        c.p = self->p;
        if (inbox_pop(self->inbox, &c.m))
                r = 0;
        else {
                uint64_t spin = spin_before(self), start = spin ? now_ns() : 0;

                /*
                 * No non-blocking look first, even to keep the GIL: the library takes
                 * one for a caller about to poll the fd, and has every sender write a
                 * wake-up to the socket from then on (two system calls per message).
                 */
                r = run_sliced(recv_op, &c, t, &self->closed, "port");
                if (spin)
                        spin_after(self, r >= 0 && now_ns() - start <= spin);
        }
        if (r >= 0 && self->closed) { /* closed while we waited: the message goes back */
                if (c.m.fd >= 0)
                        close(c.m.fd);
                shmz_msg_release(self->p, &c.m);
                port_leave(self);
                return closed_error("port");
        }
        res = r >= 0 ? message_new(self, &c.m) : NULL;
        port_leave(self);
        if (r == INT_MIN)
                return NULL;
        if (r < 0)
                return set_errno(r, NULL);
        return res;
}

struct buf_ctx {
        struct shmz_port *p;
        size_t size;
        void *buf;
};

static int buf_op(void *userdata, int64_t t) {
        struct buf_ctx *c = userdata;

        c->buf = t == 0 ? shmz_port_buf(c->p, c->size) : shmz_port_buf_wait(c->p, c->size, t);
        return c->buf ? 0 : -errno;
}

static PyObject *Port_buffer(PortObject *self, PyObject *args, PyObject *kw) {
        static char *kwlist[] = { "size", "timeout", NULL };
        PyObject *to = Py_None, *mv;
        struct buf_ctx c = {};
        PortBufferObject *b;
        Py_ssize_t size;
        int64_t t;
        int r;

        if (!PyArg_ParseTupleAndKeywords(args, kw, "n|O:buffer", kwlist, &size, &to) || timeout_from(to, &t) < 0)
                return NULL;
        if (size <= 0) {
                PyErr_SetString(PyExc_ValueError, "size must be positive");
                return NULL;
        }
        if (port_enter(self) < 0)
                return NULL;
        c.p = self->p;
        c.size = (size_t) size;
        r = buf_op(&c, 0);
        if (r == -EAGAIN && t != 0)
                r = run_sliced(buf_op, &c, t, &self->closed, "port");
        if (r < 0 || self->closed) {
                if (r >= 0)
                        shmz_port_buf_free(self->p, c.buf);
                port_leave(self);
                if (r == INT_MIN)
                        return NULL;
                if (r >= 0)
                        return closed_error("port");
                return set_errno(r, NULL);
        }
        b = PyObject_New(PortBufferObject, &PortBuffer_Type);
        if (!b) {
                shmz_port_buf_free(self->p, c.buf);
                port_leave(self);
                return NULL;
        }
        b->port = (PortObject *) Py_NewRef(self);
        b->buf = c.buf;
        b->size = c.size;
        b->gone = false;
        b->exports = 0;
        b->borrows = (struct borrows){};
        b->sent = false;
        b->linked = true;
        b->view_ref = NULL;
        port_link(self, &b->child, CHILD_BUFFER);
        port_leave(self); /* the link holds the port now */
        mv = PyMemoryView_FromObject((PyObject *) b);
        if (mv) {
                b->view_ref = PyWeakref_NewRef(mv, NULL);
                if (!b->view_ref)
                        Py_CLEAR(mv);
        }
        Py_DECREF(b);
        return mv;
}

struct send_ctx {
        struct shmz_port *p;
        struct shmz_msg m;
};

static int send_op(void *userdata, int64_t t) {
        struct send_ctx *c = userdata;

        return shmz_port_send(c->p, &c->m, t);
}

/* The message to send from Python arguments; *ret_pb: the port buffer it travels in, if one. */
static int msg_from_args(PortObject *self, PyObject *data, Py_buffer *view, unsigned type, unsigned stream, int last,
                         PyObject *fd, struct shmz_msg *ret, PortBufferObject **ret_pb) {
        PortBufferObject *pb = NULL;

        *ret = (struct shmz_msg){ .type = type, .stream = stream, .flags = last ? SHMZ_MSG_LAST : 0, .fd = -1 };
        if (fd && fd != Py_None) {
                ret->fd = PyObject_AsFileDescriptor(fd);
                if (ret->fd < 0)
                        return -1;
        }
        if (PyObject_GetBuffer(data, view, PyBUF_SIMPLE) < 0)
                return -1;
        /*
         * Found by address, not by type: any object over a buffer of ours (a
         * memoryview slice, a numpy array) would travel in place, and the
         * buffer with it.
         */
        for (ChildObject *c = self->children; c; c = c->next) {
                PortBufferObject *b = (PortBufferObject *) c;

                if (c->kind == CHILD_BUFFER && !b->gone && (uint8_t *) view->buf >= (uint8_t *) b->buf &&
                    (uint8_t *) view->buf < (uint8_t *) b->buf + b->size) {
                        pb = b;
                        break;
                }
        }
        if (pb) {
                PyObject *orig = pb->view_ref ? PyWeakref_GetObject(pb->view_ref) : NULL;
                PyObject *mbuf = NULL;
                Py_ssize_t allowed = 0;

                if (view->buf != pb->buf) {
                        PyErr_SetString(PyExc_ValueError,
                                        "a port buffer travels in place from its start: send b[:n], not b[k:]");
                        goto fail;
                }
                /*
                 * Sending gives the memory away, and the views of it go: any view
                 * but the one buffer() returned and the one sent (a numpy array,
                 * another slice) would write into the peer's message. Every
                 * memoryview on the buffer's managed buffer holds a reference to it.
                 */
                if (orig && orig != Py_None) {
                        mbuf = (PyObject *) ((PyMemoryViewObject *) orig)->mbuf;
                        allowed++;
                }
                if (PyMemoryView_Check(data) && data != orig && PyMemoryView_GET_BASE(data) == (PyObject *) pb) {
                        if (mbuf && (PyObject *) ((PyMemoryViewObject *) data)->mbuf != mbuf)
                                allowed = -1; /* two managed buffers: a view made from buf.obj */
                        mbuf = (PyObject *) ((PyMemoryViewObject *) data)->mbuf;
                        allowed += allowed >= 0;
                }
                if (allowed < 0 || pb->exports > 1 || (mbuf ? Py_REFCNT(mbuf) > allowed : pb->exports > 0) ||
                    (PyMemoryView_Check(data) && ((PyMemoryViewObject *) data)->exports > 1) ||
                    (orig && orig != Py_None && orig != data && ((PyMemoryViewObject *) orig)->exports > 0)) {
                        PyErr_SetString(PyExc_BufferError,
                                        "other views of the port buffer exist (a numpy array over it?): delete them "
                                        "before sending");
                        goto fail;
                }
        }
        ret->data = view->buf;
        ret->size = (size_t) view->len;
        *ret_pb = pb;
        return 0;
fail:
        PyBuffer_Release(view);
        return -1;
}

/* send(data) alone, the common call, skips the parser's tuple and dict (vectorcall). */
static int send_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, PyObject **data, unsigned *type,
                     unsigned *stream, int *last, PyObject **fd, PyObject **to) {
        static char *kwlist[] = { "data", "type", "stream", "last", "fd", "timeout", NULL };
        PyObject *tuple, *kw = NULL;
        int ok;

        if (nargs == 1 && !kwnames) {
                *data = args[0];
                return 0;
        }
        tuple = PyTuple_New(nargs);
        if (!tuple)
                return -1;
        for (Py_ssize_t i = 0; i < nargs; i++)
                PyTuple_SET_ITEM(tuple, i, Py_NewRef(args[i]));
        for (Py_ssize_t i = 0; kwnames && i < PyTuple_GET_SIZE(kwnames); i++) {
                if (!kw && !(kw = PyDict_New()))
                        break;
                if (PyDict_SetItem(kw, PyTuple_GET_ITEM(kwnames, i), args[nargs + i]) < 0)
                        Py_CLEAR(kw);
                if (!kw)
                        break;
        }
        ok = (!kwnames || kw) &&
             PyArg_ParseTupleAndKeywords(tuple, kw, "O|IIpOO:send", kwlist, data, type, stream, last, fd, to);
        Py_DECREF(tuple);
        Py_XDECREF(kw);
        return ok ? 0 : -1;
}

static PyObject *Port_send(PortObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
        PyObject *data, *fd = Py_None, *to = Py_None;
        unsigned type = 0, stream = 0;
        struct send_ctx c = {};
        PortBufferObject *pb = NULL;
        Py_buffer view;
        int last = 0, r;
        int64_t t;

        if (send_args(args, nargs, kwnames, &data, &type, &stream, &last, &fd, &to) < 0 || timeout_from(to, &t) < 0 ||
            port_enter(self) < 0)
                return NULL;
        if (msg_from_args(self, data, &view, type, stream, last, fd, &c.m, &pb) < 0) {
                port_leave(self);
                return NULL;
        }
        c.p = self->p;
        if (pb)
                Py_INCREF(pb);
        /* The GIL stays for what need not wait (small, inline); the view keeps the data alive. */
        r = shmz_port_send(c.p, &c.m, 0);
        if ((r == -EAGAIN) && t != 0)
                r = run_sliced(send_op, &c, t, &self->closed, "port");
        PyBuffer_Release(&view);
        port_leave(self);
        if (pb) {
                if (r >= 0)
                        portbuffer_revoke(pb, data, true);
                Py_DECREF(pb);
        }
        if (r == INT_MIN)
                return NULL;
        if (r < 0)
                return set_errno(r, NULL);
        Py_RETURN_NONE;
}

static PyObject *Port_call(PortObject *self, PyObject *args, PyObject *kw) {
        static char *kwlist[] = { "data", "type", "deadline", "fd", NULL };
        PyObject *data, *deadline = Py_None, *fd = Py_None;
        PortBufferObject *pb = NULL;
        struct call_state *s;
        uint64_t deadline_ns = 0;
        unsigned type = 0;
        struct shmz_msg m;
        CallObject *call;
        Py_buffer view;
        int r;

        if (!PyArg_ParseTupleAndKeywords(args, kw, "O|IOO:call", kwlist, &data, &type, &deadline, &fd))
                return NULL;
        if (deadline != Py_None) {
                /* time.monotonic() seconds: CLOCK_MONOTONIC, as the library's deadlines. */
                double d = PyFloat_AsDouble(deadline);

                if (d == -1.0 && PyErr_Occurred())
                        return NULL;
                deadline_ns = d <= 0 ? 1 : (uint64_t) (d * 1e9);
        }
        if (port_enter(self) < 0)
                return NULL;
        if (msg_from_args(self, data, &view, type, 0, 0, fd, &m, &pb) < 0) {
                port_leave(self);
                return NULL;
        }
        s = calloc(1, sizeof(*s));
        call = s ? PyObject_New(CallObject, &Call_Type) : NULL;
        if (!call) {
                free(s);
                PyBuffer_Release(&view);
                port_leave(self);
                return PyErr_NoMemory();
        }
        pthread_mutex_init(&s->lock, NULL);
        s->refs = 2;
        s->tail = &s->head;
        call->s = s;
        call->port = (PortObject *) Py_NewRef(self);
        call->linked = true;
        port_link(self, &call->child, CHILD_CALL);
        if (pb)
                Py_INCREF(pb);
        NOGIL(r = shmz_port_call(self->p, &m, deadline_ns, call_reply, s, NULL));
        PyBuffer_Release(&view);
        port_leave(self);
        if (pb) {
                if (r >= 0)
                        portbuffer_revoke(pb, data, true);
                Py_DECREF(pb);
        }
        if (r < 0) {
                call_state_unref(s); /* the library never calls the handler */
                Py_DECREF(call);
                return set_errno(r, NULL);
        }
        return (PyObject *) call;
}

static PyObject *Port_fileno(PortObject *self, PyObject *unused) {
        int fd;

        if (self->closed)
                return closed_error("port");
        fd = shmz_port_fd(self->p);
        if (fd < 0)
                return set_errno(fd, NULL);
        return PyLong_FromLong(fd);
}

static PyObject *Port_set_spin(PortObject *self, PyObject *arg) {
        double s = arg == Py_None ? -1.0 : PyFloat_AsDouble(arg);

        if (s == -1.0 && PyErr_Occurred())
                return NULL;
        if (self->closed)
                return closed_error("port");
        if (arg == Py_None) {
                self->spin = (struct spin){ .fixed = -1, .set = self->spin.set };
                Py_RETURN_NONE;
        }
        self->spin.fixed = s <= 0 ? 0 : s >= 9.2e9 ? INT64_MAX : (int64_t) (s * 1e9);
        self->spin.set = (uint64_t) self->spin.fixed;
        (void) shmz_port_set_spin(self->p, self->spin.set);
        Py_RETURN_NONE;
}

static PyObject *Port_get_peer(PortObject *self, void *unused) {
        pid_t pid;
        uid_t uid;
        gid_t gid;
        int r;

        if (self->closed)
                return closed_error("port");
        r = shmz_port_peer(self->p, &pid, &uid, &gid);
        if (r < 0)
                return set_errno(r, NULL);
        return Py_BuildValue("(iII)", (int) pid, (unsigned) uid, (unsigned) gid);
}

static PyObject *Port_get_closed(PortObject *self, void *unused) {
        return PyBool_FromLong(self->closed);
}

static PyMethodDef Port_methods[] = {
        { "buffer", (PyCFunction) (void (*)(void)) Port_buffer, METH_VARARGS | METH_KEYWORDS,
          "buffer(size, timeout=None) -> writable memoryview in the port's shared memory; send() takes it in place" },
        { "send", (PyCFunction) (void (*)(void)) Port_send, METH_FASTCALL | METH_KEYWORDS,
          "send(data, type=0, stream=0, last=False, fd=None, timeout=None)" },
        { "recv", (PyCFunction) (void (*)(void)) Port_recv, METH_FASTCALL | METH_KEYWORDS,
          "recv(timeout=None) -> Message" },
        { "call", (PyCFunction) (void (*)(void)) Port_call, METH_VARARGS | METH_KEYWORDS,
          "call(data, type=0, deadline=None, fd=None) -> iterator of the replies, ending on LAST; deadline in "
          "time.monotonic() seconds" },
        { "fileno", (PyCFunction) Port_fileno, METH_NOARGS, "readable when a message waits or the peer is gone" },
        { "set_spin", (PyCFunction) Port_set_spin, METH_O,
          "set_spin(seconds): a receive looks at the ring that long before it sleeps (0: sleeps at once); "
          "set_spin(None): the default, up to 30 us while that catches the messages" },
        { "close", (PyCFunction) Port_close, METH_NOARGS, NULL },
        { "__enter__", return_self, METH_NOARGS, NULL },
        { "__exit__", (PyCFunction) Port_exit, METH_VARARGS, NULL },
        { NULL },
};

static PyGetSetDef Port_getset[] = {
        { "peer", (getter) Port_get_peer, NULL, "(pid, uid, gid) as the daemon saw them", NULL },
        { "closed", (getter) Port_get_closed, NULL, NULL, NULL },
        { NULL },
};

static PyTypeObject Port_Type = {
        PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmzone.Port",
        .tp_basicsize = sizeof(PortObject),
        .tp_flags = Py_TPFLAGS_DEFAULT,
        .tp_doc = "A connection between two processes; payloads travel through shared memory.",
        .tp_dealloc = (destructor) Port_dealloc,
        .tp_methods = Port_methods,
        .tp_getset = Port_getset,
};

/* ---- what revoke_views() needs of each exporter --------------------------------------------------- */

static struct borrows *borrows_of(PyObject *exporter) {
        if (Py_TYPE(exporter) == &Zone_Type)
                return &((ZoneObject *) exporter)->borrows;
        if (Py_TYPE(exporter) == &Message_Type)
                return &((MessageObject *) exporter)->borrows;
        return &((PortBufferObject *) exporter)->borrows;
}

/* The last borrowed view went: what close() or release() deferred happens now. */
static void settle(PyObject *exporter) {
        if (Py_TYPE(exporter) == &Zone_Type) {
                if (((ZoneObject *) exporter)->closed)
                        zone_finish((ZoneObject *) exporter);
        } else if (Py_TYPE(exporter) == &Message_Type) {
                if (((MessageObject *) exporter)->released)
                        message_finish((MessageObject *) exporter);
        } else if (((PortBufferObject *) exporter)->gone)
                portbuffer_finish((PortBufferObject *) exporter);
}

/* ---- module ------------------------------------------------------------------------------------ */

/* asyncio's side is Python's own: an await on the port's fd between non-blocking receives. */
static const char async_source[] = "import asyncio\n"
                                   "async def recv_async(self):\n"
                                   "    \"\"\"await p.recv_async() -> Message\"\"\"\n"
                                   "    loop = asyncio.get_running_loop()\n"
                                   "    fd = self.fileno()\n"
                                   "    while True:\n"
                                   "        try:\n"
                                   "            return self.recv(timeout=0)\n"
                                   "        except BlockingIOError:\n"
                                   "            pass\n"
                                   "        fut = loop.create_future()\n"
                                   "        loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))\n"
                                   "        try:\n"
                                   "            await fut\n"
                                   "        finally:\n"
                                   "            loop.remove_reader(fd)\n";

static int add_async(void) {
        PyObject *globals, *code, *r, *fn;

        globals = PyDict_New();
        if (!globals)
                return -1;
        if (PyDict_SetItemString(globals, "__builtins__", PyEval_GetBuiltins()) < 0 ||
            PyDict_SetItemString(globals, "__name__", PyUnicode_FromString("shmzone")) < 0) {
                Py_DECREF(globals);
                return -1;
        }
        code = Py_CompileString(async_source, "<shmzone>", Py_file_input);
        r = code ? PyEval_EvalCode(code, globals, globals) : NULL;
        Py_XDECREF(code);
        Py_XDECREF(r);
        fn = r ? PyDict_GetItemString(globals, "recv_async") : NULL;
        if (!fn || PyDict_SetItemString(Port_Type.tp_dict, "recv_async", fn) < 0) {
                Py_DECREF(globals);
                return -1;
        }
        PyType_Modified(&Port_Type);
        Py_DECREF(globals);
        return 0;
}

static PyMethodDef module_methods[] = {
        { "open_path", (PyCFunction) (void (*)(void)) open_path, METH_VARARGS | METH_KEYWORDS,
          "open_path(path, readonly=False) -> Zone, through the FUSE view" },
        { NULL },
};

static struct PyModuleDef shmzone_module = {
        PyModuleDef_HEAD_INIT,
        .m_name = "shmzone",
        .m_doc = "Zones and ports of shmzoned, their memory in place.",
        .m_size = -1,
        .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit_shmzone(void);
PyMODINIT_FUNC PyInit_shmzone(void) {
        PyTypeObject *types[] = { &Client_Type, &Zone_Type,    &ZoneLock_Type,   &Listener_Type,
                                  &Port_Type,   &Message_Type, &PortBuffer_Type, &Call_Type };
        PyObject *m, *gc;

        for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++)
                if (PyType_Ready(types[i]) < 0)
                        return NULL;
        if (add_async() < 0)
                return NULL;
        m = PyModule_Create(&shmzone_module);
        if (!m)
                return NULL;
        gc = PyImport_ImportModule("gc");
        if (!gc)
                goto fail;
        gc_get_referrers = PyObject_GetAttrString(gc, "get_referrers");
        Py_DECREF(gc);
        str_release = PyUnicode_InternFromString("release");
        if (!gc_get_referrers || !str_release)
                goto fail;
        ZoneStat_Type = PyStructSequence_NewType(&zone_stat_desc);
        DaemonStatus_Type = PyStructSequence_NewType(&status_desc);
        if (!ZoneStat_Type || !DaemonStatus_Type)
                goto fail;
        /* An OSError with errno EOWNERDEAD: the lock is the caller's, what it protects needs repair. */
        OwnerDied = PyErr_NewExceptionWithDoc("shmzone.OwnerDied",
                                              "The zone lock's last holder died holding it; the caller holds it now.",
                                              PyExc_OSError, NULL);
        if (!OwnerDied)
                goto fail;
        for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++)
                if (PyModule_AddObjectRef(m, strrchr(types[i]->tp_name, '.') + 1, (PyObject *) types[i]) < 0)
                        goto fail;
        if (PyModule_AddObjectRef(m, "OwnerDied", OwnerDied) < 0 ||
            PyModule_AddObjectRef(m, "ZoneStat", (PyObject *) ZoneStat_Type) < 0 ||
            PyModule_AddObjectRef(m, "DaemonStatus", (PyObject *) DaemonStatus_Type) < 0 ||
            PyModule_AddIntConstant(m, "LAST", SHMZ_MSG_LAST) < 0 ||
            PyModule_AddIntConstant(m, "ZONE_HEADER_SIZE", SHMZ_ZONE_HEADER_SIZE) < 0 ||
            PyModule_AddStringConstant(m, "DEFAULT_SOCKET", SHMZ_DEFAULT_SOCKET) < 0 ||
            PyModule_AddStringConstant(m, "DEFAULT_MOUNT", SHMZ_DEFAULT_MOUNT) < 0)
                goto fail;
        return m;
fail:
        Py_DECREF(m);
        return NULL;
}
