/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "shmzone-py.h"

PyObject *OwnerDied, *gc_get_referrers, *str_release;

static struct borrows *borrows_of(PyObject *exporter);
static void settle(PyObject *exporter);

/* ---- errors ------------------------------------------------------------------------------------ */

/* OSError's subclass for the errno (FileExistsError, TimeoutError, ...); NULL for returning. */
PyObject *set_errno(int r, PyObject *what) {
        errno = r < 0 ? -r : r;
        if (what)
                return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, what);
        return PyErr_SetFromErrno(PyExc_OSError);
}

PyObject *set_errno_str(int r, const char *what) {
        PyObject *o = what ? PyUnicode_DecodeFSDefault(what) : NULL;

        set_errno(r, o);
        Py_XDECREF(o);
        return NULL;
}

PyObject *closed_error(const char *what) {
        PyErr_Format(PyExc_ValueError, "operation on a closed %s", what);
        return NULL;
}

/* None: -1 (forever); seconds, 0 or more: nanoseconds. */
int timeout_from(PyObject *o, int64_t *ret) {
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

uint64_t now_ns(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000000ull + (uint64_t) ts.tv_nsec;
}

int run_sliced(sliced_op_t op, void *ctx, int64_t timeout_ns, const int *closed, const char *what) {
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
void revoke_views(PyObject *exporter) {
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
bool release_view(PyObject *v) {
        PyObject *r = PyObject_CallMethodNoArgs(v, str_release);

        if (!r) {
                PyErr_Clear();
                return false;
        }
        Py_DECREF(r);
        return true;
}

/* Releases the memoryview a weak reference leads to, if it still lives. */
void release_weak_view(PyObject **ref) {
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

/* ---- what the owners share ------------------------------------------------------------------- */

int owner_enter(void *self, const char *what) {
        OwnerObject *o = self;

        if (o->closed) {
                closed_error(what);
                return -1;
        }
        o->users++;
        return 0;
}

bool owner_leave(void *self) {
        OwnerObject *o = self;

        return --o->users == 0 && o->closed;
}

PyObject *owner_get_closed(PyObject *self, void *unused) {
        return PyBool_FromLong(((OwnerObject *) self)->closed);
}

PyObject *owner_exit(PyObject *self, PyObject *args) {
        return PyObject_CallMethod(self, "close", NULL);
}

PyObject *fd_result(int fd) {
        return fd < 0 ? set_errno(fd, NULL) : PyLong_FromLong(fd);
}

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
