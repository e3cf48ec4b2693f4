/* The spliced phase of a session in C: one thread, one epoll set, recv/send per read.
 *
 * Once a session has finished its startup in Python, both sockets are handed here: the
 * thread moves bytes client -> instance and instance -> client without the GIL, counts
 * them, and keeps a running count of message boundaries in both streams: instance -> client
 * so the proxy can still add its own ErrorResponse when an instance dies, client -> instance
 * to know when the client has said Terminate (then the instance closing is the normal end;
 * a pair added with keep_server stops there, Terminate withheld, so the server connection
 * can serve the next client). When a side
 * closes, fails, or Python asks to stop, the pair leaves the epoll set and is reported
 * through an eventfd with the bytes not yet written; Python then finishes the session.
 * The thread never closes a descriptor: the Python transports own them.
 *
 * Memory per pair is a few hundred bytes; a copy of unsent bytes is kept only while a
 * peer cannot take them, and that direction stops reading until it can (backpressure).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#define READ_SIZE (256 * 1024) /* as uvloop reads; the most a blocked direction holds */
#define MAX_EVENTS 64

enum { RUNNING = 0, ENDED = 1 };
/* Why a pair ended; the index into REASONS. */
enum { R_CLIENT = 0, R_INSTANCE, R_STOPPED, R_FAILED, R_TERMINATED };
static const char *REASONS[] = {"client", "instance", "stopped", "failed", "terminated"};
#define TERMINATE 'X'

/* Message framing of one direction: where the next message starts, and the type of the
 * last message whose header was complete. */
typedef struct {
    uint32_t need; /* body bytes of the current message still to come */
    unsigned char hdr[5];
    int hdr_len; /* header bytes of the next message seen so far */
    unsigned char last_type;
    unsigned char ready_status; /* of the last ReadyForQuery: 'I', 'T' or 'E' */
    /* Up: the client's Query, Sync and FunctionCall messages (each answered by one
     * ReadyForQuery); down: the ReadyForQuery messages. */
    uint64_t counted; /* each counted once whole */
    int pending;      /* the current message is counted, its body still coming */
} framing_t;

static int counted_up(unsigned char t) { return t == 'Q' || t == 'S' || t == 'F'; }

struct pair;

typedef struct {
    struct pair *pair;
    int fd;
    uint32_t interest; /* what epoll watches now */
} endpoint_t;

typedef struct {
    endpoint_t *src, *dst;
    char *pending; /* bytes read from src that dst has not taken yet */
    size_t pending_off, pending_len;
    uint64_t bytes;
} direction_t;

typedef struct pair {
    uint64_t id;
    int state;
    int reason;
    int registered;
    endpoint_t client, instance;
    direction_t up;   /* client -> instance */
    direction_t down; /* instance -> client */
    framing_t up_frames, down_frames;
    int keep_server;  /* stop before a Terminate instead of passing it on */
    int stop_requested;
    int reported;              /* published to Python: the thread no longer touches it */
    struct pair *next;         /* all pairs, under the lock */
    struct pair *ended_next;   /* ended in this epoll batch, thread-private */
} pair_t;

typedef struct {
    PyObject_HEAD
    int epfd, ctlfd, notifyfd;
    pthread_t thread;
    int started, quit;
    pthread_mutex_t lock; /* guards the list, registered/stop flags and quit */
    pair_t *pairs;
    pair_t *ended; /* ended in the current batch, not yet published (thread-private) */
    uint64_t next_id;
    char *buf;
} RelayObject;

/* --- the relay thread ------------------------------------------------------------------ */

/* Follow the framing over `data`; return the offset in it at which a Terminate message
 * starts with its whole header inside `data`, or -1. */
static ssize_t track(framing_t *f, const unsigned char *data, size_t n, int up) {
    size_t i = 0;
    ssize_t terminate_at = -1;
    while (i < n) {
        if (f->need > 0) {
            if (f->last_type == 'Z' && f->need == 1) f->ready_status = data[i];
            size_t take = n - i < f->need ? n - i : f->need;
            f->need -= (uint32_t)take;
            i += take;
            if (f->need == 0 && f->pending) {
                f->counted++;
                f->pending = 0;
            }
            continue;
        }
        f->hdr[f->hdr_len++] = data[i++];
        if (f->hdr_len == 5) {
            uint32_t len = ((uint32_t)f->hdr[1] << 24) | ((uint32_t)f->hdr[2] << 16) |
                           ((uint32_t)f->hdr[3] << 8) | (uint32_t)f->hdr[4];
            f->need = len >= 4 ? len - 4 : 0; /* a length below 4 is the peer's bug */
            f->hdr_len = 0;
            f->last_type = f->hdr[0];
            if (up ? counted_up(f->hdr[0]) : f->hdr[0] == 'Z') {
                if (f->need == 0)
                    f->counted++;
                else
                    f->pending = 1;
            }
            if (up && f->hdr[0] == TERMINATE && i >= 5 && terminate_at < 0)
                terminate_at = (ssize_t)(i - 5);
        }
    }
    return terminate_at;
}

static int at_boundary(const framing_t *f) { return f->need == 0 && f->hdr_len == 0; }

static void set_interest(RelayObject *r, endpoint_t *e, uint32_t want) {
    if (e->interest == want) return;
    struct epoll_event ev = {.events = want, .data.ptr = e};
    epoll_ctl(r->epfd, EPOLL_CTL_MOD, e->fd, &ev);
    e->interest = want;
}

static void update(RelayObject *r, pair_t *p) {
    /* Read from a side only while what it sent before has been taken by its peer. */
    set_interest(r, &p->client, (p->up.pending_len ? 0 : EPOLLIN) |
                                    (p->down.pending_len ? EPOLLOUT : 0));
    set_interest(r, &p->instance, (p->down.pending_len ? 0 : EPOLLIN) |
                                      (p->up.pending_len ? EPOLLOUT : 0));
}

/* Take a pair out of the epoll set. Python may free it only once published: events of
 * the same batch can still name it. */
static void end_pair(RelayObject *r, pair_t *p, int reason) {
    if (p->state == ENDED) return;
    p->state = ENDED;
    p->reason = reason;
    epoll_ctl(r->epfd, EPOLL_CTL_DEL, p->client.fd, NULL);
    epoll_ctl(r->epfd, EPOLL_CTL_DEL, p->instance.fd, NULL);
    p->ended_next = r->ended;
    r->ended = p;
}

static void publish(RelayObject *r) {
    if (r->ended == NULL) return;
    pthread_mutex_lock(&r->lock);
    for (pair_t *p = r->ended; p; p = p->ended_next) p->reported = 1;
    r->ended = NULL;
    pthread_mutex_unlock(&r->lock);
    uint64_t one = 1;
    ssize_t w = write(r->notifyfd, &one, sizeof one);
    (void)w;
}

/* Write what dst has not taken yet; 0 when done or still waiting, -1 when dst failed. */
static int flush(direction_t *d) {
    while (d->pending_len) {
        ssize_t w = send(d->dst->fd, d->pending + d->pending_off, d->pending_len, MSG_NOSIGNAL);
        if (w < 0) return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? 0 : -1;
        d->pending_off += (size_t)w;
        d->pending_len -= (size_t)w;
    }
    free(d->pending);
    d->pending = NULL;
    d->pending_off = 0;
    return 0;
}

static int reason_of(pair_t *p, endpoint_t *e) {
    return e == &p->client ? R_CLIENT : R_INSTANCE;
}

/* One read from e, passed on to its peer; the rest kept if the peer is full. */
static void pump(RelayObject *r, pair_t *p, endpoint_t *e) {
    direction_t *d = e == &p->client ? &p->up : &p->down;
    ssize_t n = recv(e->fd, r->buf, READ_SIZE, 0);
    if (n == 0) {
        end_pair(r, p, reason_of(p, e));
        return;
    }
    if (n < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            end_pair(r, p, reason_of(p, e));
        return;
    }
    int held = 0;
    if (d == &p->down) {
        track(&p->down_frames, (unsigned char *)r->buf, (size_t)n, 0);
    } else {
        ssize_t x = track(&p->up_frames, (unsigned char *)r->buf, (size_t)n, 1);
        /* Withheld only when every query has its answer: else the server ends, as asked. */
        if (x >= 0 && p->keep_server && p->up_frames.counted == p->down_frames.counted) {
            n = x; /* the Terminate and anything after it stay here */
            held = 1;
        }
    }
    __atomic_add_fetch(&d->bytes, (uint64_t)n, __ATOMIC_RELAXED);
    ssize_t w = send(d->dst->fd, r->buf, (size_t)n, MSG_NOSIGNAL);
    if (w < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            /* Keep the bytes: Python reports them with the pair. */
            w = 0;
            d->pending = malloc((size_t)n);
            if (d->pending) {
                memcpy(d->pending, r->buf, (size_t)n);
                d->pending_len = (size_t)n;
            }
            end_pair(r, p, reason_of(p, d->dst));
            return;
        }
        w = 0;
    }
    if (w < n) {
        d->pending = malloc((size_t)(n - w));
        if (d->pending == NULL) {
            end_pair(r, p, R_FAILED);
            return;
        }
        memcpy(d->pending, r->buf + w, (size_t)(n - w));
        d->pending_len = (size_t)(n - w);
    }
    /* The client is done; what it sent before is reported unsent if not yet taken. */
    if (held) end_pair(r, p, R_TERMINATED);
}

static void on_event(RelayObject *r, endpoint_t *e, uint32_t events) {
    pair_t *p = e->pair;
    if (p->state == ENDED) return;
    if (events & EPOLLOUT) {
        direction_t *in = e == &p->client ? &p->down : &p->up;
        if (flush(in) < 0) {
            end_pair(r, p, reason_of(p, e));
            return;
        }
    }
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
        direction_t *out = e == &p->client ? &p->up : &p->down;
        if (out->pending_len == 0) {
            pump(r, p, e);
        } else if (events & (EPOLLHUP | EPOLLERR)) {
            end_pair(r, p, reason_of(p, e));
        }
    }
    if (p->state != ENDED) update(r, p);
}

static void take_commands(RelayObject *r, int *quit) {
    uint64_t v;
    ssize_t got = read(r->ctlfd, &v, sizeof v);
    (void)got;
    pthread_mutex_lock(&r->lock);
    *quit = r->quit;
    for (pair_t *p = r->pairs; p; p = p->next) {
        if (!p->registered) {
            p->registered = 1;
            p->client.interest = p->instance.interest = EPOLLIN;
            struct epoll_event ec = {.events = EPOLLIN, .data.ptr = &p->client};
            struct epoll_event ei = {.events = EPOLLIN, .data.ptr = &p->instance};
            if (epoll_ctl(r->epfd, EPOLL_CTL_ADD, p->client.fd, &ec) < 0 ||
                epoll_ctl(r->epfd, EPOLL_CTL_ADD, p->instance.fd, &ei) < 0) {
                end_pair(r, p, R_FAILED);
            }
        }
        if (p->stop_requested && p->state != ENDED) end_pair(r, p, R_STOPPED);
    }
    pthread_mutex_unlock(&r->lock);
}

static void *run(void *arg) {
    RelayObject *r = arg;
    struct epoll_event evs[MAX_EVENTS];
    int quit = 0;
    while (!quit) {
        int n = epoll_wait(r->epfd, evs, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            break;
        }
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == NULL) {
                take_commands(r, &quit);
            } else {
                on_event(r, evs[i].data.ptr, evs[i].events);
            }
        }
        publish(r);
    }
    return NULL;
}

/* --- the Python face ------------------------------------------------------------------- */

static void wake(RelayObject *r) {
    uint64_t one = 1;
    ssize_t w = write(r->ctlfd, &one, sizeof one);
    (void)w;
}

static pair_t *find(RelayObject *r, uint64_t id) {
    for (pair_t *p = r->pairs; p; p = p->next)
        if (p->id == id) return p;
    return NULL;
}

static void free_pair(pair_t *p) {
    free(p->up.pending);
    free(p->down.pending);
    free(p);
}

static PyObject *Relay_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    RelayObject *r = (RelayObject *)type->tp_alloc(type, 0);
    if (r == NULL) return NULL;
    r->epfd = r->ctlfd = r->notifyfd = -1;
    r->next_id = 1;
    pthread_mutex_init(&r->lock, NULL);
    r->buf = malloc(READ_SIZE);
    r->epfd = epoll_create1(EPOLL_CLOEXEC);
    r->ctlfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    r->notifyfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (r->buf == NULL || r->epfd < 0 || r->ctlfd < 0 || r->notifyfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(r);
        return NULL;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(r->epfd, EPOLL_CTL_ADD, r->ctlfd, &ev) < 0 ||
        pthread_create(&r->thread, NULL, run, r) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(r);
        return NULL;
    }
    r->started = 1;
    return (PyObject *)r;
}

static void stop_thread(RelayObject *r) {
    if (!r->started) return;
    pthread_mutex_lock(&r->lock);
    r->quit = 1;
    pthread_mutex_unlock(&r->lock);
    wake(r);
    Py_BEGIN_ALLOW_THREADS
    pthread_join(r->thread, NULL);
    Py_END_ALLOW_THREADS
    r->started = 0;
}

static void Relay_dealloc(RelayObject *r) {
    stop_thread(r);
    while (r->pairs) {
        pair_t *p = r->pairs;
        r->pairs = p->next;
        free_pair(p);
    }
    if (r->epfd >= 0) close(r->epfd);
    if (r->ctlfd >= 0) close(r->ctlfd);
    if (r->notifyfd >= 0) close(r->notifyfd);
    free(r->buf);
    pthread_mutex_destroy(&r->lock);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyObject *Relay_add(RelayObject *r, PyObject *args) {
    int cfd, ifd, keep_server = 0, ready = 0;
    unsigned long long unanswered = 0;
    if (!PyArg_ParseTuple(args, "ii|piK", &cfd, &ifd, &keep_server, &ready, &unanswered))
        return NULL;
    if (!r->started) {
        PyErr_SetString(PyExc_RuntimeError, "relay is closed");
        return NULL;
    }
    int fds[2] = {cfd, ifd};
    for (int i = 0; i < 2; i++) {
        int fl = fcntl(fds[i], F_GETFL);
        if (fl < 0 || fcntl(fds[i], F_SETFL, fl | O_NONBLOCK) < 0)
            return PyErr_SetFromErrno(PyExc_OSError);
    }
    pair_t *p = calloc(1, sizeof *p);
    if (p == NULL) return PyErr_NoMemory();
    p->client = (endpoint_t){.pair = p, .fd = cfd};
    p->instance = (endpoint_t){.pair = p, .fd = ifd};
    p->up = (direction_t){.src = &p->client, .dst = &p->instance};
    p->down = (direction_t){.src = &p->instance, .dst = &p->client};
    p->keep_server = keep_server;
    p->up_frames.counted = unanswered; /* queries sent before, not yet answered */
    if (ready) { /* the instance's stream so far ended with this ReadyForQuery status */
        p->down_frames.last_type = 'Z';
        p->down_frames.ready_status = (unsigned char)ready;
    }
    pthread_mutex_lock(&r->lock);
    p->id = r->next_id++;
    p->next = r->pairs;
    r->pairs = p;
    pthread_mutex_unlock(&r->lock);
    wake(r);
    return PyLong_FromUnsignedLongLong(p->id);
}

static PyObject *Relay_stop(RelayObject *r, PyObject *arg) {
    uint64_t id = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    pthread_mutex_lock(&r->lock);
    pair_t *p = find(r, id);
    if (p) p->stop_requested = 1;
    pthread_mutex_unlock(&r->lock);
    wake(r);
    return PyBool_FromLong(p != NULL);
}

static PyObject *Relay_counts(RelayObject *r, PyObject *arg) {
    uint64_t id = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    uint64_t up = 0, down = 0;
    pthread_mutex_lock(&r->lock);
    pair_t *p = find(r, id);
    if (p) {
        up = __atomic_load_n(&p->up.bytes, __ATOMIC_RELAXED);
        down = __atomic_load_n(&p->down.bytes, __ATOMIC_RELAXED);
    }
    pthread_mutex_unlock(&r->lock);
    return Py_BuildValue("KK", (unsigned long long)up, (unsigned long long)down);
}

/* The instance's transaction status if its stream ends right after a ReadyForQuery, else "". */
static PyObject *ready_status(const framing_t *f) {
    int ready = at_boundary(f) && f->last_type == 'Z' && f->ready_status;
    return PyBytes_FromStringAndSize((const char *)&f->ready_status, ready ? 1 : 0);
}

static PyObject *pending_bytes(direction_t *d) {
    return PyBytes_FromStringAndSize(d->pending ? d->pending + d->pending_off : "",
                                     (Py_ssize_t)d->pending_len);
}

/* Pairs that ended since the last call, as tuples: (id, reason, at_boundary, unsent to
 * client, unsent to instance, bytes up, bytes down, client sent Terminate, ready status,
 * the instance's stream ended with an ErrorResponse: its own last word). */
static PyObject *Relay_collect(RelayObject *r, PyObject *unused) {
    uint64_t v;
    ssize_t got = read(r->notifyfd, &v, sizeof v);
    (void)got;
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    pthread_mutex_lock(&r->lock);
    pair_t **link = &r->pairs;
    while (*link) {
        pair_t *p = *link;
        if (!p->reported) {
            link = &p->next;
            continue;
        }
        *link = p->next;
        PyObject *item = Py_BuildValue(
            "KsNNNKKNNN", (unsigned long long)p->id, REASONS[p->reason],
            PyBool_FromLong(at_boundary(&p->down_frames)), pending_bytes(&p->down),
            pending_bytes(&p->up), (unsigned long long)p->up.bytes,
            (unsigned long long)p->down.bytes,
            PyBool_FromLong(p->up_frames.last_type == TERMINATE), ready_status(&p->down_frames),
            PyBool_FromLong(at_boundary(&p->down_frames) && p->down_frames.last_type == 'E'));
        free_pair(p);
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            pthread_mutex_unlock(&r->lock);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
    }
    pthread_mutex_unlock(&r->lock);
    return out;
}

static PyObject *Relay_close(RelayObject *r, PyObject *unused) {
    stop_thread(r);
    Py_RETURN_NONE;
}

static PyObject *Relay_notify_fd(RelayObject *r, void *closure) {
    return PyLong_FromLong(r->notifyfd);
}

static PyMethodDef Relay_methods[] = {
    {"add", (PyCFunction)Relay_add, METH_VARARGS,
     "add(client_fd, instance_fd, keep_server=False, ready=0, unanswered=0) -> id: relay "
     "between two connected non-TLS sockets; with keep_server, end before the client's "
     "Terminate if every query was answered; ready: the status byte of the ReadyForQuery "
     "the instance's stream ended with so far; unanswered: queries still to be answered"},
    {"stop", (PyCFunction)Relay_stop, METH_O,
     "stop(id) -> bool: end a pair soon; it is reported by collect()"},
    {"counts", (PyCFunction)Relay_counts, METH_O,
     "counts(id) -> (client to instance, instance to client) bytes relayed so far"},
    {"collect", (PyCFunction)Relay_collect, METH_NOARGS,
     "collect() -> list of ended pairs (id, reason, at_boundary, unsent_to_client, "
     "unsent_to_instance, bytes_up, bytes_down, client_terminated, ready_status, "
     "ended_with_error)"},
    {"close", (PyCFunction)Relay_close, METH_NOARGS, "stop the relay thread"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Relay_getset[] = {
    {"notify_fd", (getter)Relay_notify_fd, NULL, "readable when collect() has pairs", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "taidon_proxy.net._splice.Relay",
    .tp_doc = "A thread relaying spliced sessions between client and instance sockets.",
    .tp_basicsize = sizeof(RelayObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Relay_new,
    .tp_dealloc = (destructor)Relay_dealloc,
    .tp_methods = Relay_methods,
    .tp_getset = Relay_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_splice", "The spliced phase of sessions, relayed in C.", -1, NULL,
};

PyMODINIT_FUNC PyInit__splice(void) {
    if (PyType_Ready(&RelayType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&RelayType);
    if (PyModule_AddObject(m, "Relay", (PyObject *)&RelayType) < 0) {
        Py_DECREF(&RelayType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
