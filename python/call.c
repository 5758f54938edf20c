/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "shmzone-py.h"

/* ---- Call: the replies of one call ------------------------------------------------------------- */

/*
 * Shared between the iterator and the library's reply handler, which runs in
 * whichever thread dispatches (without the GIL) or in shmz_port_close().
 * Two references: the library's (until the handler's last call: an error or
 * a reply flagged LAST) and the iterator's.
 */
struct call_state {
        struct inbox q; /* its lock guards the rest too */
        int refs;
        bool ended;    /* the library called the handler for the last time */
        int error;     /* how it ended: 0 (LAST), -EPIPE, -ETIMEDOUT */
        bool orphaned; /* the iterator went: replies are released at once */
};

static void call_state_unref(struct call_state *s) {
        bool last;

        pthread_mutex_lock(&s->q.lock);
        last = --s->refs == 0;
        pthread_mutex_unlock(&s->q.lock);
        if (last) {
                pthread_mutex_destroy(&s->q.lock);
                free(s);
        }
}

static void call_reply(struct shmz_port *p, int error, struct shmz_msg *reply, void *userdata) {
        struct call_state *s = userdata;
        bool end = error < 0 || (reply && (reply->flags & SHMZ_MSG_LAST));

        pthread_mutex_lock(&s->q.lock);
        if (reply && (s->orphaned || !inbox_put_locked(&s->q, reply))) {
                msg_drop(p, reply);
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
        pthread_mutex_unlock(&s->q.lock);
        if (end)
                call_state_unref(s);
}

static void call_drain(CallObject *self) {
        struct inbox left = {}; /* its lock unused: ours alone */
        struct shmz_msg m;

        pthread_mutex_lock(&self->s->q.lock);
        self->s->orphaned = true;
        left.head = self->s->q.head;
        self->s->q.head = NULL;
        self->s->q.tail = &self->s->q.head;
        pthread_mutex_unlock(&self->s->q.lock);
        while (inbox_take_locked(&left, &m))
                msg_drop(self->port->p, &m);
}

void call_finish(CallObject *self) {
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
        bool got;

        pthread_mutex_lock(&s->q.lock);
        got = inbox_take_locked(&s->q, ret);
        *ret_ended = s->ended;
        *ret_error = s->error;
        pthread_mutex_unlock(&s->q.lock);
        return got;
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
        pthread_mutex_lock(&c->s->q.lock);
        has = c->s->q.head != NULL;
        ended = c->s->ended;
        pthread_mutex_unlock(&c->s->q.lock);
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

PyTypeObject Call_Type = {
        PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmzone.Call",
        .tp_basicsize = sizeof(CallObject),
        .tp_flags = Py_TPFLAGS_DEFAULT,
        .tp_doc = "The replies of a call, ending with the one flagged LAST.",
        .tp_dealloc = (destructor) Call_dealloc,
        .tp_iter = PyObject_SelfIter,
        .tp_iternext = (iternextfunc) Call_next,
};

PyObject *Port_call(PortObject *self, PyObject *args, PyObject *kw) {
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
        inbox_init(&s->q);
        s->refs = 2;
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
