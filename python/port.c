/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "shmzone-py.h"

/* ---- Port -------------------------------------------------------------------------------------- */

void msg_drop(struct shmz_port *p, struct shmz_msg *m) {
        if (m->fd >= 0)
                close(m->fd);
        shmz_msg_release(p, m);
}

void inbox_init(struct inbox *q) {
        pthread_mutex_init(&q->lock, NULL);
        q->head = NULL;
        q->tail = &q->head;
}

bool inbox_put_locked(struct inbox *q, const struct shmz_msg *m) {
        struct inbox_item *it = malloc(sizeof(*it));

        if (!it)
                return false;
        it->m = *m;
        it->next = NULL;
        *q->tail = it;
        q->tail = &it->next;
        return true;
}

bool inbox_take_locked(struct inbox *q, struct shmz_msg *ret) {
        struct inbox_item *it = q->head;

        if (!it)
                return false;
        q->head = it->next;
        if (!q->head)
                q->tail = &q->head;
        *ret = it->m;
        free(it);
        return true;
}

static void inbox_handler(struct shmz_port *p, struct shmz_msg *m, void *userdata) {
        struct inbox *q = userdata;
        bool kept;

        pthread_mutex_lock(&q->lock);
        kept = inbox_put_locked(q, m);
        pthread_mutex_unlock(&q->lock);
        if (!kept) /* nowhere to keep it: it goes as one nobody handled would */
                msg_drop(p, m);
}

static bool inbox_pop(struct inbox *q, struct shmz_msg *ret) {
        bool got;

        pthread_mutex_lock(&q->lock);
        got = inbox_take_locked(q, ret);
        pthread_mutex_unlock(&q->lock);
        return got;
}

PyObject *port_new(struct shmz_port *p) {
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
        inbox_init(self->inbox);
        shmz_port_set_handler(p, inbox_handler, self->inbox);
        return (PyObject *) self;
}

static void port_close_now(PortObject *self) {
        struct shmz_msg m;

        if (!self->p)
                return;
        if (self->inbox)
                while (inbox_pop(self->inbox, &m)) {
                        msg_drop(self->p, &m);
                }
        shmz_port_close(self->p);
        self->p = NULL;
        if (self->inbox) {
                pthread_mutex_destroy(&self->inbox->lock);
                free(self->inbox);
                self->inbox = NULL;
        }
}

void port_leave(PortObject *self) {
        if (owner_leave(self))
                port_close_now(self);
}

void port_link(PortObject *self, ChildObject *c, int kind) {
        c->kind = kind;
        c->prev = NULL;
        c->next = self->children;
        if (c->next)
                c->next->prev = c;
        self->children = c;
        self->users++;
}

void port_unlink(PortObject *self, ChildObject *c) {
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

/* ---- Port methods ------------------------------------------------------------------------------ */

int port_enter(PortObject *self) {
        return owner_enter(self, "port");
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

/* A receive's or a send's: the port and the message. */
struct msg_ctx {
        struct shmz_port *p;
        struct shmz_msg m;
};

static int recv_op(void *userdata, int64_t t) {
        struct msg_ctx *c = userdata;

        return shmz_port_recv(c->p, &c->m, t);
}

/*
 * A receive spins (in the library, the GIL released) for up to SPIN_NS before
 * it sleeps: a peer in another process that answers at once (request and
 * reply) answers within a few microseconds, and a sleep costs both sides a
 * wake-up that takes longer than the whole reply. A spin that ends in a sleep
 * anyway (an idle port, a peer that waits for a CPU on a loaded machine) was
 * wasted, so after each the next 1, 2, 4, ... SPIN_BACKOFF_MAX receives sleep
 * at once; one that the spin catches starts the count again. After a message
 * over SPIN_SIZE_MAX the next receive sleeps at once too: its peer spends
 * longer than a spin making the next (1 MiB is some 100 us of writes), and
 * a spinner only takes CPU time from it on a shared machine (measured: a
 * stream of 1 MiB arrays 2x slower). set_spin(s) fixes the spin instead.
 */
#define SPIN_NS (30 * 1000LL)
#define SPIN_BACKOFF_MAX 64u
#define SPIN_SIZE_MAX (64 * 1024)

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
                want = sp->large ? 0 : SPIN_NS;
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
        struct msg_ctx c;
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
                if (r >= 0)
                        self->spin.large = c.m.size > SPIN_SIZE_MAX;
        }
        if (r >= 0 && self->closed) { /* closed while we waited: the message goes back */
                msg_drop(self->p, &c.m);
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

static int send_op(void *userdata, int64_t t) {
        struct msg_ctx *c = userdata;

        return shmz_port_send(c->p, &c->m, t);
}

/* The message to send from Python arguments; *ret_pb: the port buffer it travels in, if one. */
int msg_from_args(PortObject *self, PyObject *data, Py_buffer *view, unsigned type, unsigned stream, int last,
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
        struct msg_ctx c = {};
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

static PyObject *Port_fileno(PortObject *self, PyObject *unused) {
        if (self->closed)
                return closed_error("port");
        return fd_result(shmz_port_fd(self->p));
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
        { "__exit__", owner_exit, METH_VARARGS, NULL },
        { NULL },
};

static PyGetSetDef Port_getset[] = {
        { "peer", (getter) Port_get_peer, NULL, "(pid, uid, gid) as the daemon saw them", NULL },
        { "closed", owner_get_closed, NULL, NULL, NULL },
        { NULL },
};

PyTypeObject Port_Type = {
        PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmzone.Port",
        .tp_basicsize = sizeof(PortObject),
        .tp_flags = Py_TPFLAGS_DEFAULT,
        .tp_doc = "A connection between two processes; payloads travel through shared memory.",
        .tp_dealloc = (destructor) Port_dealloc,
        .tp_methods = Port_methods,
        .tp_getset = Port_getset,
};
