/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "shmzone-py.h"

/* ---- Listener ---------------------------------------------------------------------------------- */

PyObject *listener_new(struct shmz_listener *l) {
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
        if (owner_enter(self, "listener") < 0)
                return NULL;
        c.l = self->l;
        r = run_sliced(accept_op, &c, t, &self->closed, "listener");
        if (owner_leave(self))
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
        if (self->closed)
                return closed_error("listener");
        return fd_result(shmz_listener_fd(self->l));
}

static PyObject *Listener_close(ListenerObject *self, PyObject *unused) {
        __atomic_store_n(&self->closed, 1, __ATOMIC_RELEASE);
        listener_finish(self);
        Py_RETURN_NONE;
}

static PyMethodDef Listener_methods[] = {
        { "accept", (PyCFunction) (void (*)(void)) Listener_accept, METH_VARARGS | METH_KEYWORDS,
          "accept(timeout=None) -> Port" },
        { "fileno", (PyCFunction) Listener_fileno, METH_NOARGS, "readable when a connection waits" },
        { "close", (PyCFunction) Listener_close, METH_NOARGS, "the name goes" },
        { "__enter__", return_self, METH_NOARGS, NULL },
        { "__exit__", owner_exit, METH_VARARGS, NULL },
        { NULL },
};

static PyGetSetDef Listener_getset[] = {
        { "closed", owner_get_closed, NULL, NULL, NULL },
        { NULL },
};

PyTypeObject Listener_Type = {
        PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmzone.Listener",
        .tp_basicsize = sizeof(ListenerObject),
        .tp_flags = Py_TPFLAGS_DEFAULT,
        .tp_doc = "A published port name; accept() takes the connections.",
        .tp_dealloc = (destructor) Listener_dealloc,
        .tp_methods = Listener_methods,
        .tp_getset = Listener_getset,
};
