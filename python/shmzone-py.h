/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * shmzone for Python, what its files share: zones and ports of libshmzone, their memory exported
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
#pragma once

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

/*
 * The head of the objects that own library state (Client, Zone, Listener,
 * Port): closed once close() was called, users what still needs the library
 * object; each type's finish frees it once the object is closed and unused.
 */
#define OWNER_HEAD                                                                                                     \
        PyObject_HEAD int closed;                                                                                      \
        Py_ssize_t users;

typedef struct {
        OWNER_HEAD
} OwnerObject;

/* One more user; -1 with ValueError ("operation on a closed <what>") once closed. */
int owner_enter(void *self, const char *what);
/* One user less: true if the object is closed and unused now (its finish is due). */
bool owner_leave(void *self);
/* The getter of closed and __exit__ (which calls close()), for all of them. */
PyObject *owner_get_closed(PyObject *self, void *unused);
PyObject *owner_exit(PyObject *self, PyObject *args);
/* fileno(): the library's fd, or OSError for its negative errno. */
PyObject *fd_result(int fd);

/* How long a blocking call sleeps in the library before it looks at close() and signals again. */
#define SLICE_NS (50 * 1000 * 1000LL)

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

typedef struct {
        OWNER_HEAD /* users: calls in flight */
                struct shmz_client *c;
} ClientObject;

typedef struct {
        OWNER_HEAD /* users: exports + calls in flight */
                struct shmz_zone *z;
        Py_ssize_t exports; /* buffers handed out */
        Py_ssize_t holds;   /* its lock, taken through this object and not unlocked yet */
        struct borrows borrows;
        bool readonly;
} ZoneObject;

/* The zone lock. The calling thread holds it: unlock from the same thread. */
typedef struct {
        PyObject_HEAD ZoneObject *zone;
} ZoneLockObject;

typedef struct {
        OWNER_HEAD
        struct shmz_listener *l;
} ListenerObject;

/*
 * Received messages kept under a lock, filled without the GIL: a call's
 * replies, and what shmz_port_dispatch() hands to the port's handler while a
 * call() waits for its replies (kept for recv()).
 */
struct inbox_item {
        struct shmz_msg m;
        struct inbox_item *next;
};

struct inbox {
        pthread_mutex_t lock;
        struct inbox_item *head, **tail;
};
void inbox_init(struct inbox *q);
/* With q->lock held: false if there was no memory for it (the caller still has the message). */
bool inbox_put_locked(struct inbox *q, const struct shmz_msg *m);
bool inbox_take_locked(struct inbox *q, struct shmz_msg *ret);
/* A received message the caller drops: its fd closed, its memory released. */
void msg_drop(struct shmz_port *p, struct shmz_msg *m);

struct spin {
        int64_t fixed;    /* set_spin()'s, or -1: adaptive */
        uint64_t set;     /* what the library has now */
        unsigned skip;    /* receives left that sleep at once */
        unsigned backoff; /* the last wasted spin's skip (0: the last spin caught its message) */
        bool large;       /* the last message was over SPIN_SIZE_MAX: the next one is not spun for */
};

/* Objects that hold the port's memory: revoked at close (linked while they hold it). */
typedef struct child {
        PyObject_HEAD struct child *prev, *next;
        int kind; /* CHILD_* */
} ChildObject;

enum { CHILD_MESSAGE, CHILD_BUFFER, CHILD_CALL };

typedef struct {
        OWNER_HEAD /* users: calls in flight + children */
                struct shmz_port *p;
        ChildObject *children;
        struct inbox *inbox;
        struct spin spin;
} PortObject;

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

typedef struct {
        ChildObject child;
        PortObject *port;
        struct call_state *s;
        bool linked;
} CallObject;

extern PyObject *OwnerDied, *gc_get_referrers, *str_release;
extern PyStructSequence_Desc zone_stat_desc, status_desc;
extern PyTypeObject Client_Type;
extern PyTypeObject *DaemonStatus_Type;
extern PyTypeObject *ZoneStat_Type;
extern PyTypeObject Zone_Type;
extern PyTypeObject ZoneLock_Type;
extern PyTypeObject Listener_Type;
extern PyTypeObject Port_Type;
extern PyTypeObject PortBuffer_Type;
extern PyTypeObject Message_Type;
extern PyTypeObject Call_Type;
void release_weak_view(PyObject **ref);
bool release_view(PyObject *v);
void revoke_views(PyObject *exporter);
/*
 * Runs op(ctx, t) with the GIL released in slices of at most SLICE_NS until it
 * returns anything but -ETIMEDOUT/-EAGAIN or the timeout passes. Between
 * slices, with the GIL: signals, then *closed. Returns op's result, or
 * INT_MIN with a Python exception set.
 */
typedef int (*sliced_op_t)(void *ctx, int64_t timeout_ns);
int run_sliced(sliced_op_t op, void *ctx, int64_t timeout_ns, const int *closed, const char *what);
uint64_t now_ns(void);
int timeout_from(PyObject *o, int64_t *ret);
PyObject *closed_error(const char *what);
PyObject *set_errno_str(int r, const char *what);
PyObject *set_errno(int r, PyObject *what);
PyObject *return_self(PyObject *self, PyObject *unused);
PyObject *open_path(PyObject *module, PyObject *args, PyObject *kw);
PyObject *zone_new(struct shmz_zone *z, bool readonly);
void zone_finish(ZoneObject *self);
PyObject *listener_new(struct shmz_listener *l);
int msg_from_args(PortObject *self, PyObject *data, Py_buffer *view, unsigned type, unsigned stream, int last,
                  PyObject *fd, struct shmz_msg *ret, PortBufferObject **ret_pb);
int port_enter(PortObject *self);
void port_unlink(PortObject *self, ChildObject *c);
void port_link(PortObject *self, ChildObject *c, int kind);
void port_leave(PortObject *self);
PyObject *port_new(struct shmz_port *p);
void portbuffer_revoke(PortBufferObject *pb, PyObject *data, bool sent);
void portbuffer_finish(PortBufferObject *self);
void message_release(MessageObject *self);
PyObject *message_new(PortObject *port, const struct shmz_msg *m);
void message_finish(MessageObject *self);
PyObject *Port_call(PortObject *self, PyObject *args, PyObject *kw);
void call_finish(CallObject *self);
