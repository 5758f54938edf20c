/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "shmzone-py.h"

/* ---- Client ------------------------------------------------------------------------------------ */

static void client_finish(ClientObject *self) {
        if (self->users == 0 && self->c) {
                shmz_disconnect(self->c);
                self->c = NULL;
        }
}

static int client_enter(ClientObject *self) {
        return owner_enter(self, "client");
}

static void client_leave(ClientObject *self) {
        if (owner_leave(self))
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

PyObject *return_self(PyObject *self, PyObject *unused) {
        return Py_NewRef(self);
}

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
PyStructSequence_Desc zone_stat_desc = { "shmzone.ZoneStat", "A zone's figures, as the daemon sees them.",
                                         zone_stat_fields, 14 };
PyTypeObject *ZoneStat_Type;

static PyStructSequence_Field status_fields[] = {
        { "budget", NULL },         { "budget_used", NULL },  { "quota", NULL },       { "zones", NULL },
        { "zones_unlinked", NULL }, { "clients", NULL },      { "requests", NULL },    { "errors", NULL },
        { "segments", NULL },       { "uptime_usec", NULL },  { "listeners", NULL },   { "ports", NULL },
        { "segment_bytes", NULL },  { "chunks", NULL },       { "chunks_used", NULL }, { "messages", NULL },
        { "message_bytes", NULL },  { "ports_closed", NULL }, { "peers_died", NULL },  { NULL, NULL },
};
PyStructSequence_Desc status_desc = { "shmzone.DaemonStatus", "The daemon's figures.", status_fields, 19 };
PyTypeObject *DaemonStatus_Type;

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
        { "__exit__", owner_exit, METH_VARARGS, NULL },
        { NULL },
};

static PyGetSetDef Client_getset[] = {
        { "daemon_pid", (getter) Client_get_daemon_pid, NULL, "the daemon's pid", NULL },
        { "closed", owner_get_closed, NULL, NULL, NULL },
        { NULL },
};

PyTypeObject Client_Type = {
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
