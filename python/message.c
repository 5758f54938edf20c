/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "shmzone-py.h"

/* ---- Message ----------------------------------------------------------------------------------- */

void message_finish(MessageObject *self) {
        if (self->done || self->exports > 0 || self->borrows.n > 0)
                return;
        self->done = true;
        if (self->own_fd && self->m.fd >= 0)
                close(self->m.fd);
        self->m.fd = -1;
        shmz_msg_release(self->port->p, &self->m);
        port_unlink(self->port, &self->child);
}

PyObject *message_new(PortObject *port, const struct shmz_msg *m) {
        MessageObject *self = PyObject_New(MessageObject, &Message_Type);

        if (!self) {
                msg_drop(port->p, (struct shmz_msg *) m);
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
void message_release(MessageObject *self) {
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

PyTypeObject Message_Type = {
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

void portbuffer_finish(PortBufferObject *self) {
        if (!self->linked || self->exports > 0 || self->borrows.n > 0)
                return;
        self->linked = false;
        if (!self->sent)
                shmz_port_buf_free(self->port->p, self->buf);
        port_unlink(self->port, &self->child);
}

/* After a send from a port buffer: the caller's views of it go (the views left keep the port's memory). */
void portbuffer_revoke(PortBufferObject *pb, PyObject *data, bool sent) {
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

PyTypeObject PortBuffer_Type = {
        PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmzone.PortBuffer",
        .tp_basicsize = sizeof(PortBufferObject),
        .tp_flags = Py_TPFLAGS_DEFAULT,
        .tp_doc = "What Port.buffer()'s memoryviews point into.",
        .tp_dealloc = (destructor) PortBuffer_dealloc,
        .tp_as_buffer = &PortBuffer_as_buffer,
};
