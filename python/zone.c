/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "shmzone-py.h"

/* ---- Zone -------------------------------------------------------------------------------------- */

void zone_finish(ZoneObject *self) {
        if (self->users == 0 && self->borrows.n == 0 && self->z) {
                shmz_zone_close(self->z);
                self->z = NULL;
        }
}

static int zone_enter(ZoneObject *self) {
        return owner_enter(self, "zone");
}

static void zone_leave(ZoneObject *self) {
        if (owner_leave(self))
                zone_finish(self);
}

PyObject *zone_new(struct shmz_zone *z, bool readonly) {
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

static PyObject *Zone_get_readonly(ZoneObject *self, void *unused) {
        return PyBool_FromLong(self->readonly);
}

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

PyTypeObject ZoneLock_Type = {
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
        { "__exit__", owner_exit, METH_VARARGS, NULL },
        { NULL },
};

static PyGetSetDef Zone_getset[] = {
        { "name", (getter) Zone_get_name, NULL, NULL, NULL },
        { "size", (getter) Zone_get_size, NULL, "usable bytes", NULL },
        { "existed", (getter) Zone_get_existed, NULL, "True if its data predates this open", NULL },
        { "closed", owner_get_closed, NULL, NULL, NULL },
        { "readonly", (getter) Zone_get_readonly, NULL, NULL, NULL },
        { "root", (getter) Zone_get_root, (setter) Zone_set_root, "offset of the zone's top-level object, 0: none",
          NULL },
        { NULL },
};

PyTypeObject Zone_Type = {
        PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmzone.Zone",
        .tp_basicsize = sizeof(ZoneObject),
        .tp_flags = Py_TPFLAGS_DEFAULT,
        .tp_doc = "A zone: memoryview(zone) is its usable bytes in place.",
        .tp_dealloc = (destructor) Zone_dealloc,
        .tp_methods = Zone_methods,
        .tp_getset = Zone_getset,
        .tp_as_buffer = &Zone_as_buffer,
};

PyObject *open_path(PyObject *module, PyObject *args, PyObject *kw) {
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
