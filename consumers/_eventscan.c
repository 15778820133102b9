/* Native fast paths of the consumer thread: message_runs (at the end) turns librdkafka's
 * messages into SourceRecord runs, and scan, the fast path of consumers.decode.decode_batch,
 * decodes one micro-batch per call.
 *
 * scan(records, input_dim, max_event_bytes) reads the value of every SourceRecord of the
 * micro-batch as a JSON event and writes its features straight into one float32 matrix: no
 * Python object per feature, no dict per event. The scanning of a large micro-batch runs
 * without the GIL, so the training thread runs beside it. Returns
 *
 *     (offsets, rows, ids, labels, tasks, timestamps, sources, nonfinite, unsure)
 *
 * offsets: {(topic, partition): last offset + 1} over every record; rows: a bytearray of
 * float32, input_dim per accepted record, in input order; ids, labels, tasks: one entry per
 * accepted record (a label or task is a str or None); timestamps: a bytearray of int64, the
 * event's ts or, when it has none, the record's timestamp; sources: the accepted records
 * without their values; nonfinite: the accepted rows holding a NaN or an infinity as float32
 * (the batch checks reject them); unsure: the indices of the records this scanner did not
 * accept.
 *
 * INVARIANT (the same as the simdjson fast path's): this scanner only ever accepts. A record it
 * accepts is one the reference path (consumers.decode._parse) would accept with the same
 * values, bit for bit in float32; anything it is not sure of goes to `unsure`, and the
 * reference path alone decides rejections and their reasons. What it accepts: one JSON object
 * of ASCII text, strings without escapes, names not repeated, "id" a string of 1..256
 * characters, "features" an array of exactly input_dim numbers, "label" and "task" a non-empty
 * string, an integer of at most 18 digits or null, "ts" a non-negative integer of at most 18
 * digits or null, any other name with a string, number, true, false or null value.
 * tests/unit/consumers/test_native_decode.py compares it with the reference path.
 *
 * Numbers: the reference path rounds the decimal text to the nearest double (orjson), then
 * the double to the nearest float32 (numpy). Here the text's digits (at most 19 significant)
 * times at most two powers of ten from a table give the value within 2^-50.6 in double
 * arithmetic; if a neighbourhood of 2^-48 around that rounds to one float32, so do the exact
 * value and its nearest double (rounding is monotonic), and that float32 is the answer.
 * Otherwise (about one number in 2^23, or an exponent beyond 10^+-44) the text goes
 * through Python's correctly rounded PyOS_string_to_double and one cast, which is what the
 * reference path computes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_ID_CHARS 256
#define MAX_CLASS_DIGITS 18
#define MAX_NUMBER_TEXT 64 /* longer numbers (e.g. 400 digits) are left to the reference */
/* A micro-batch of at least this many bytes is scanned without the GIL, so that a training
   thread's Python runs beside it. A small one keeps the GIL: giving it up and taking it back
   costs more than the scan when another thread is waiting for it (docs/performance.md). */
#define RELEASE_GIL_BYTES (256 * 1024)

enum { ACCEPT = 0, UNSURE = 1, NEED_SLOW = 2 };
enum { KIND_ABSENT = 0, KIND_NULL, KIND_STR, KIND_INT };

typedef struct {
    const char *start;
    Py_ssize_t len;
    int kind;
} Text;

typedef struct {
    Text id, label, task;
    int ts_kind;
    long long ts;
} Fields;

typedef struct {
    const char *start, *end;
    uint64_t mant;
    int digits, exp10, neg, is_int, overflow;
} Number;

/* Powers of ten as the nearest doubles (the positive ones up to 10^22 exactly). */
#define MAX_POW10 22
static const double POW10[MAX_POW10 + 1] = {
    1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
    1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
};
static const double POW10_NEG[MAX_POW10 + 1] = {
    1e-0,  1e-1,  1e-2,  1e-3,  1e-4,  1e-5,  1e-6,  1e-7,  1e-8,  1e-9,  1e-10, 1e-11,
    1e-12, 1e-13, 1e-14, 1e-15, 1e-16, 1e-17, 1e-18, 1e-19, 1e-20, 1e-21, 1e-22,
};

static inline const char *skip_ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    return p;
}

static inline int is_digit(char c) { return (unsigned)(c - '0') < 10u; }

/* A string of printable ASCII without escapes; *pp is just past the opening quote. */
static int scan_string(const char **pp, const char *end, Text *out) {
    const char *p = *pp, *start = p;
    while (p < end) {
        unsigned char c = (unsigned char)*p;
        if (c == '"') {
            out->start = start;
            out->len = p - start;
            out->kind = KIND_STR;
            *pp = p + 1;
            return ACCEPT;
        }
        if (c < 0x20 || c > 0x7e || c == '\\') return UNSURE;
        p++;
    }
    return UNSURE;
}

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
/* Eight ASCII digits at p as one number, in a few integer operations, or -1 when the eight
   bytes are not all digits. Loaded little-endian, the first digit is the lowest byte. */
static inline int64_t eight_digits(const char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    /* every byte in '0'..'9': its high nibble is 3, and still 3 after adding 6 */
    if (((v & 0xF0F0F0F0F0F0F0F0u) | (((v + 0x0606060606060606u) & 0xF0F0F0F0F0F0F0F0u) >> 4)) !=
        0x3333333333333333u)
        return -1;
    v -= 0x3030303030303030u;
    v = v * 10 + (v >> 8); /* bytes 0, 2, 4, 6: the digit pairs 01, 23, 45, 67 (at most 99) */
    /* (pair01 * 10^6 + pair45 * 10^2) and (pair23 * 10^4 + pair67), summed in the high half */
    uint64_t a = (v & 0x000000FF000000FFu) * (100 + (UINT64_C(1000000) << 32));
    uint64_t b = ((v >> 16) & 0x000000FF000000FFu) * (1 + (UINT64_C(10000) << 32));
    return (int64_t)((a + b) >> 32);
}
#define HAVE_EIGHT_DIGITS 1
#endif

/* A run of digits from p: their count, and their value while it fits 19 digits. */
static inline const char *digits(const char *p, const char *end, uint64_t *mant, int *count) {
    const char *q = p;
    uint64_t m = *mant;
#ifdef HAVE_EIGHT_DIGITS
    while (end - q >= 8) {
        int64_t eight = eight_digits(q);
        if (eight < 0) break;
        m = m * 100000000u + (uint64_t)eight;
        q += 8;
    }
#endif
    while (q < end && (unsigned)(*q - '0') < 10u) m = m * 10u + (uint64_t)(*q++ - '0');
    *mant = m; /* meaningless (wrapped) when the count says more than 19 digits in all */
    *count += (int)(q - p);
    return q;
}

/* One number by the JSON grammar: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)? */
static int scan_number(const char **pp, const char *end, Number *n) {
    const char *p = *pp;
    n->start = p;
    n->mant = 0;
    n->digits = 0;
    n->exp10 = 0;
    n->neg = 0;
    n->is_int = 1;
    if (p < end && *p == '-') {
        n->neg = 1;
        p++;
    }
    if (p >= end) return UNSURE;
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        p = digits(p, end, &n->mant, &n->digits);
    } else {
        return UNSURE;
    }
    if (p < end && *p == '.') {
        p++;
        n->is_int = 0;
        if (p >= end || !is_digit(*p)) return UNSURE;
        if (n->mant == 0) { /* leading zeros of the fraction are not significant */
            const char *q = p;
            while (q < end && *q == '0') q++;
            n->exp10 -= (int)(q - p);
            p = q;
        }
        const char *q = digits(p, end, &n->mant, &n->digits);
        n->exp10 -= (int)(q - p);
        p = q;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        int eneg = 0, e = 0;
        p++;
        n->is_int = 0;
        if (p < end && (*p == '+' || *p == '-')) eneg = *p++ == '-';
        if (p >= end || !is_digit(*p)) return UNSURE;
        for (; p < end && is_digit(*p); p++)
            if (e < 100000) e = e * 10 + (*p - '0');
        n->exp10 += eneg ? -e : e;
    }
    n->overflow = n->digits > 19;
    n->end = p;
    *pp = p;
    return ACCEPT;
}

/* The float32 the reference path would compute from this number's text. */
static int number_to_float32(const Number *n, int allow_slow, float *out) {
    if (n->is_int) { /* a Python int: exact in a double below 2^53, as numpy converts it */
        if (n->overflow || n->mant > (UINT64_C(1) << 53)) return UNSURE;
        *out = (float)(double)n->mant;
        if (n->neg && n->mant != 0) *out = -*out; /* -0 is the int 0: no sign */
        return ACCEPT;
    }
    if (!n->overflow && n->mant == 0) {
        *out = n->neg ? -0.0f : 0.0f;
        return ACCEPT;
    }
    if (!n->overflow && n->exp10 >= -2 * MAX_POW10 && n->exp10 <= 2 * MAX_POW10) {
        /* At most five roundings of 2^-53 each (the digits, two table entries, two products):
           x is within 2^-50.6 of the exact value, whose nearest double is within 2^-53 more.
           A multiplication, not a division: a division costs as much as the digits. */
        const double *table = n->exp10 < 0 ? POW10_NEG : POW10;
        int e = n->exp10 < 0 ? -n->exp10 : n->exp10;
        double x = (double)n->mant;
        if (e > MAX_POW10) {
            x *= table[MAX_POW10];
            e -= MAX_POW10;
        }
        x *= table[e];
        float lo = (float)(x * (1.0 - 0x1p-48)), hi = (float)(x * (1.0 + 0x1p-48));
        if (lo == hi) {
            *out = n->neg ? -lo : lo;
            return ACCEPT;
        }
    }
    if (!allow_slow) return NEED_SLOW;
    Py_ssize_t len = n->end - n->start;
    if (len >= MAX_NUMBER_TEXT) return UNSURE;
    char text[MAX_NUMBER_TEXT];
    memcpy(text, n->start, (size_t)len);
    text[len] = '\0';
    char *stop = NULL;
    double d = PyOS_string_to_double(text, &stop, NULL);
    if (d == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return UNSURE;
    }
    if (stop != text + len || !isfinite(d)) return UNSURE; /* out of double range: the reference decides */
    *out = (float)d;
    return ACCEPT;
}

static int scan_features(const char **pp, const char *end, Py_ssize_t dim, float *row,
                         int allow_slow) {
    const char *p = skip_ws(*pp, end);
    Py_ssize_t count = 0;
    Number n;
    if (p < end && *p == ']') return UNSURE; /* empty: input_dim is at least 1 */
    for (;;) {
        if (count == dim) return UNSURE;
        if (scan_number(&p, end, &n) != ACCEPT) return UNSURE;
        int r = number_to_float32(&n, allow_slow, &row[count]);
        if (r != ACCEPT) return r;
        count++;
        p = skip_ws(p, end);
        if (p >= end) return UNSURE;
        if (*p == ',') {
            p = skip_ws(p + 1, end);
            continue;
        }
        if (*p == ']') break;
        return UNSURE;
    }
    if (count != dim) return UNSURE;
    *pp = p + 1;
    return ACCEPT;
}

static inline int literal(const char **pp, const char *end, const char *word, size_t len) {
    if ((size_t)(end - *pp) < len || memcmp(*pp, word, len) != 0) return 0;
    *pp += len;
    return 1;
}

/* A label or task: a non-empty string, an integer whose str() is its text, or null. */
static int scan_class(const char **pp, const char *end, Text *out) {
    const char *p = *pp;
    if (p < end && *p == '"') {
        p++;
        if (scan_string(&p, end, out) != ACCEPT || out->len == 0) return UNSURE;
    } else if (literal(&p, end, "null", 4)) {
        out->kind = KIND_NULL;
    } else {
        Number n;
        if (scan_number(&p, end, &n) != ACCEPT || !n.is_int || n.overflow ||
            n.digits > MAX_CLASS_DIGITS)
            return UNSURE;
        if (n.neg && n.mant == 0) return UNSURE; /* -0 is the int 0, whose str is "0" */
        out->start = n.start;
        out->len = n.end - n.start;
        out->kind = KIND_INT;
    }
    *pp = p;
    return ACCEPT;
}

static int scan_ts(const char **pp, const char *end, Fields *f) {
    const char *p = *pp;
    if (literal(&p, end, "null", 4)) {
        f->ts_kind = KIND_NULL;
    } else {
        Number n;
        if (scan_number(&p, end, &n) != ACCEPT || !n.is_int || n.neg || n.overflow ||
            n.digits > MAX_CLASS_DIGITS)
            return UNSURE;
        f->ts_kind = KIND_INT;
        f->ts = (long long)n.mant;
    }
    *pp = p;
    return ACCEPT;
}

/* The value of a name this scanner does not use: a scalar, or unsure. */
static int skip_scalar(const char **pp, const char *end) {
    const char *p = *pp;
    if (p >= end) return UNSURE;
    if (*p == '"') {
        Text ignored;
        p++;
        if (scan_string(&p, end, &ignored) != ACCEPT) return UNSURE;
    } else if (!literal(&p, end, "null", 4) && !literal(&p, end, "true", 4) &&
               !literal(&p, end, "false", 5)) {
        Number n;
        if (scan_number(&p, end, &n) != ACCEPT) return UNSURE;
    }
    *pp = p;
    return ACCEPT;
}

enum { SEEN_ID = 1, SEEN_FEATURES = 2, SEEN_LABEL = 4, SEEN_TASK = 8, SEEN_TS = 16 };

static int name_bit(const Text *name) {
    switch (name->len) {
    case 2:
        if (memcmp(name->start, "id", 2) == 0) return SEEN_ID;
        if (memcmp(name->start, "ts", 2) == 0) return SEEN_TS;
        return 0;
    case 4: return memcmp(name->start, "task", 4) == 0 ? SEEN_TASK : 0;
    case 5: return memcmp(name->start, "label", 5) == 0 ? SEEN_LABEL : 0;
    case 8: return memcmp(name->start, "features", 8) == 0 ? SEEN_FEATURES : 0;
    default: return 0;
    }
}

static int scan_record(const char *p, const char *end, Py_ssize_t dim, float *row, Fields *f,
                       int allow_slow) {
    int seen = 0;
    memset(f, 0, sizeof(*f));
    p = skip_ws(p, end);
    if (p >= end || *p != '{') return UNSURE;
    p = skip_ws(p + 1, end);
    for (;;) {
        Text name;
        if (p >= end || *p != '"') return UNSURE; /* also the empty object: no id */
        p++;
        if (scan_string(&p, end, &name) != ACCEPT) return UNSURE;
        p = skip_ws(p, end);
        if (p >= end || *p != ':') return UNSURE;
        p = skip_ws(p + 1, end);
        int bit = name_bit(&name), r = ACCEPT;
        if (seen & bit) return UNSURE; /* a repeated name: the reference keeps the last */
        seen |= bit;
        switch (bit) {
        case SEEN_ID:
            if (p >= end || *p != '"') return UNSURE;
            p++;
            r = scan_string(&p, end, &f->id);
            if (r == ACCEPT && (f->id.len == 0 || f->id.len > MAX_ID_CHARS)) r = UNSURE;
            break;
        case SEEN_FEATURES:
            if (p >= end || *p != '[') return UNSURE;
            p++;
            r = scan_features(&p, end, dim, row, allow_slow);
            break;
        case SEEN_LABEL: r = scan_class(&p, end, &f->label); break;
        case SEEN_TASK: r = scan_class(&p, end, &f->task); break;
        case SEEN_TS: r = scan_ts(&p, end, f); break;
        default: r = skip_scalar(&p, end); break;
        }
        if (r != ACCEPT) return r;
        p = skip_ws(p, end);
        if (p < end && *p == ',') {
            p = skip_ws(p + 1, end);
            continue;
        }
        if (p < end && *p == '}') break;
        return UNSURE;
    }
    if (skip_ws(p + 1, end) != end) return UNSURE; /* something after the object */
    if ((seen & (SEEN_ID | SEEN_FEATURES)) != (SEEN_ID | SEEN_FEATURES)) return UNSURE;
    return ACCEPT;
}

/* ---- the Python side -------------------------------------------------------------------- */

/* A SourceRecord (a tuple subclass without a Python-level __new__): steals the five items. */
static PyObject *new_record(PyTypeObject *type, PyObject *items[5]) {
    PyObject *rec = type->tp_alloc(type, 5);
    if (rec == NULL) {
        for (int k = 0; k < 5; k++) Py_XDECREF(items[k]);
        return NULL;
    }
    for (int k = 0; k < 5; k++) PyTuple_SET_ITEM(rec, k, items[k]);
    return rec;
}

/* The record without its value (what EventBatch.sources keeps). */
static PyObject *without_value(PyObject *rec) {
    PyObject *items[5];
    for (int k = 0; k < 5; k++) items[k] = Py_NewRef(k == 3 ? Py_None : PyTuple_GET_ITEM(rec, k));
    return new_record(Py_TYPE(rec), items);
}


static PyObject *class_object(const Text *t) {
    if (t->kind == KIND_STR || t->kind == KIND_INT)
        return PyUnicode_DecodeASCII(t->start, t->len, NULL);
    Py_RETURN_NONE;
}

/* {(topic, partition): last offset + 1} over every record (valid or not). */
static int add_offsets(PyObject *offsets, PyObject *const *items, Py_ssize_t n) {
    PyObject *key = NULL;
    long long best = -1;
    for (Py_ssize_t i = 0; i <= n; i++) {
        PyObject *rec = i < n ? items[i] : NULL;
        int same = key != NULL && rec != NULL &&
                   PyObject_RichCompareBool(PyTuple_GET_ITEM(key, 0), PyTuple_GET_ITEM(rec, 0),
                                            Py_EQ) == 1 &&
                   PyObject_RichCompareBool(PyTuple_GET_ITEM(key, 1), PyTuple_GET_ITEM(rec, 1),
                                            Py_EQ) == 1;
        if (key != NULL && !same) { /* the end of a run of one partition: keep its maximum */
            PyObject *held = PyDict_GetItemWithError(offsets, key); /* borrowed */
            long long before = held != NULL ? PyLong_AsLongLong(held) : -1;
            PyObject *next = (held == NULL && PyErr_Occurred()) ? NULL
                                                               : PyLong_FromLongLong(best);
            int r = next == NULL || (before == -1 && PyErr_Occurred()) ? -1
                    : best > before ? PyDict_SetItem(offsets, key, next) : 0;
            Py_XDECREF(next);
            Py_CLEAR(key);
            if (r < 0) return -1;
        }
        if (rec == NULL) break;
        if (key == NULL) {
            key = PyTuple_Pack(2, PyTuple_GET_ITEM(rec, 0), PyTuple_GET_ITEM(rec, 1));
            if (key == NULL) return -1;
            best = -1;
        }
        long long offset = PyLong_AsLongLong(PyTuple_GET_ITEM(rec, 2));
        if (offset == -1 && PyErr_Occurred()) {
            Py_DECREF(key);
            return -1;
        }
        if (offset + 1 > best) best = offset + 1;
    }
    return 0;
}

static int append_new(PyObject *list, PyObject *item) {
    if (item == NULL) return -1;
    int r = PyList_Append(list, item);
    Py_DECREF(item);
    return r;
}

/* The first pass, on bytes only (no Python object is touched): may run without the GIL. */
static void scan_all(PyObject *const *values, Py_ssize_t n, Py_ssize_t dim, float *matrix,
                     Fields *fields, int *status) {
    for (Py_ssize_t i = 0; i < n; i++) {
        if (values[i] == NULL) continue;
        const char *start = PyBytes_AS_STRING(values[i]);
        status[i] = scan_record(start, start + PyBytes_GET_SIZE(values[i]), dim,
                                matrix + i * dim, &fields[i], 0);
    }
}

static PyObject *scan(PyObject *self, PyObject *args) {
    PyObject *records;
    Py_ssize_t dim, max_bytes;
    (void)self;
    if (!PyArg_ParseTuple(args, "Onn:scan", &records, &dim, &max_bytes)) return NULL;
    if (dim < 1 || max_bytes < 1) {
        PyErr_SetString(PyExc_ValueError, "input_dim and max_event_bytes must be >= 1");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(records, "records must be a sequence");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *result = NULL, *offsets = NULL, *rows = NULL, *ids = NULL, *labels = NULL,
             *tasks = NULL, *stamps = NULL, *sources = NULL, *nonfinite = NULL, *unsure = NULL;
    PyObject **values = NULL;
    Fields *fields = NULL;
    int *status = NULL;
    Py_ssize_t total_bytes = 0;

    if (n > 0 && (size_t)dim > PY_SSIZE_T_MAX / sizeof(float) / (size_t)n) {
        PyErr_SetString(PyExc_OverflowError, "micro-batch too large");
        goto done;
    }
    values = PyMem_Calloc((size_t)n + 1, sizeof(PyObject *));
    fields = PyMem_Calloc((size_t)n + 1, sizeof(Fields));
    status = PyMem_Calloc((size_t)n + 1, sizeof(int));
    rows = PyByteArray_FromStringAndSize(NULL, n * dim * (Py_ssize_t)sizeof(float));
    stamps = PyByteArray_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(int64_t));
    offsets = PyDict_New();
    if (!values || !fields || !status || !rows || !stamps || !offsets) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *rec = items[i];
        if (!PyTuple_Check(rec) || PyTuple_GET_SIZE(rec) < 5) {
            PyErr_SetString(PyExc_TypeError, "records must be SourceRecord tuples");
            goto done;
        }
        PyObject *value = PyTuple_GET_ITEM(rec, 3);
        if (PyBytes_CheckExact(value) && PyBytes_GET_SIZE(value) > 0 &&
            PyBytes_GET_SIZE(value) <= max_bytes) {
            Py_INCREF(value);
            values[i] = value;
            total_bytes += PyBytes_GET_SIZE(value);
        }
        status[i] = UNSURE;
    }
    if (add_offsets(offsets, items, n) < 0) goto done;

    float *matrix = (float *)PyByteArray_AS_STRING(rows);
    if (total_bytes >= RELEASE_GIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        scan_all(values, n, dim, matrix, fields, status);
        Py_END_ALLOW_THREADS
    } else {
        scan_all(values, n, dim, matrix, fields, status);
    }

    ids = PyList_New(0);
    labels = PyList_New(0);
    tasks = PyList_New(0);
    sources = PyList_New(0);
    nonfinite = PyList_New(0);
    unsure = PyList_New(0);
    if (!ids || !labels || !tasks || !sources || !nonfinite || !unsure) goto done;
    int64_t *ts_column = (int64_t *)PyByteArray_AS_STRING(stamps);
    Py_ssize_t kept = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (status[i] == NEED_SLOW) { /* a number the quick test could not settle */
            const char *start = PyBytes_AS_STRING(values[i]);
            status[i] = scan_record(start, start + PyBytes_GET_SIZE(values[i]), dim,
                                    matrix + i * dim, &fields[i], 1);
        }
        if (status[i] != ACCEPT) {
            if (append_new(unsure, PyLong_FromSsize_t(i)) < 0) goto done;
            continue;
        }
        Fields *f = &fields[i];
        if (append_new(ids, PyUnicode_DecodeASCII(f->id.start, f->id.len, NULL)) < 0 ||
            append_new(labels, class_object(&f->label)) < 0 ||
            append_new(tasks, class_object(&f->task)) < 0)
            goto done;
        if (f->ts_kind == KIND_INT) {
            ts_column[kept] = f->ts;
        } else { /* the record's own timestamp */
            ts_column[kept] = PyLong_AsLongLong(PyTuple_GET_ITEM(items[i], 4));
            if (ts_column[kept] == -1 && PyErr_Occurred()) goto done;
        }
        if (append_new(sources, without_value(items[i])) < 0) goto done;
        float *row = matrix + kept * dim;
        if (kept != i) memmove(row, matrix + i * dim, (size_t)dim * sizeof(float));
        int finite = 1;
        for (Py_ssize_t k = 0; k < dim; k++) finite &= isfinite(row[k]) != 0;
        if (!finite && append_new(nonfinite, PyLong_FromSsize_t(kept)) < 0) goto done;
        kept++;
    }
    if (PyByteArray_Resize(rows, kept * dim * (Py_ssize_t)sizeof(float)) < 0 ||
        PyByteArray_Resize(stamps, kept * (Py_ssize_t)sizeof(int64_t)) < 0)
        goto done;
    result = PyTuple_Pack(9, offsets, rows, ids, labels, tasks, stamps, sources, nonfinite, unsure);

done:
    if (values != NULL)
        for (Py_ssize_t i = 0; i < n; i++) Py_XDECREF(values[i]);
    PyMem_Free(values);
    PyMem_Free(fields);
    PyMem_Free(status);
    Py_XDECREF(offsets);
    Py_XDECREF(rows);
    Py_XDECREF(ids);
    Py_XDECREF(labels);
    Py_XDECREF(tasks);
    Py_XDECREF(stamps);
    Py_XDECREF(sources);
    Py_XDECREF(nonfinite);
    Py_XDECREF(unsure);
    Py_DECREF(seq);
    return result;
}

/* ---- message_runs: librdkafka messages to SourceRecord runs --------------------------- */

static PyObject *s_error, *s_topic, *s_partition, *s_offset, *s_value, *s_timestamp;

static PyObject *call(PyObject *obj, PyObject *name) { return PyObject_CallMethodNoArgs(obj, name); }

static PyObject *message_runs(PyObject *self, PyObject *args) {
    PyObject *messages, *record_type;
    (void)self;
    if (!PyArg_ParseTuple(args, "OO!:message_runs", &messages, &PyType_Type, &record_type))
        return NULL;
    if (!PyType_IsSubtype((PyTypeObject *)record_type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "record_type must be a tuple subclass (SourceRecord)");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(messages, "messages must be a sequence");
    if (seq == NULL) return NULL;
    PyObject *out = PyList_New(0), *run = NULL, *topic = NULL, *partition = NULL;
    if (out == NULL) goto fail;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *m = PySequence_Fast_GET_ITEM(seq, i);
        PyObject *error = call(m, s_error);
        if (error == NULL) goto fail;
        int failed = error != Py_None; /* a transient fetch error: librdkafka retries it */
        Py_DECREF(error);
        if (failed) continue;
        PyObject *items[5] = {NULL, NULL, NULL, NULL, NULL};
        PyObject *names[4] = {s_topic, s_partition, s_offset, s_value};
        int k = 0;
        while (k < 4 && (items[k] = call(m, names[k])) != NULL) k++;
        if (k == 4) {
            PyObject *stamp = call(m, s_timestamp); /* (type, milliseconds) */
            if (stamp != NULL && PyTuple_Check(stamp) && PyTuple_GET_SIZE(stamp) == 2)
                items[4] = Py_NewRef(PyTuple_GET_ITEM(stamp, 1));
            else if (stamp != NULL)
                PyErr_SetString(PyExc_TypeError, "Message.timestamp() must return a pair");
            Py_XDECREF(stamp);
        }
        if (items[4] == NULL) {
            for (k = 0; k < 5; k++) Py_XDECREF(items[k]);
            goto fail;
        }
        int same = run != NULL ? PyObject_RichCompareBool(items[1], partition, Py_EQ) : 0;
        if (same == 1) same = PyObject_RichCompareBool(items[0], topic, Py_EQ);
        if (same < 0) {
            for (int k = 0; k < 5; k++) Py_XDECREF(items[k]);
            goto fail;
        }
        if (!same) { /* a new run: (key, records) */
            Py_XSETREF(topic, Py_NewRef(items[0]));
            Py_XSETREF(partition, Py_NewRef(items[1]));
            Py_XSETREF(run, PyList_New(0));
            PyObject *key = run ? PyTuple_Pack(2, topic, partition) : NULL;
            PyObject *pair = key ? PyTuple_Pack(2, key, run) : NULL;
            Py_XDECREF(key);
            if (pair == NULL || PyList_Append(out, pair) < 0) {
                Py_XDECREF(pair);
                for (int k = 0; k < 5; k++) Py_XDECREF(items[k]);
                goto fail;
            }
            Py_DECREF(pair);
        }
        if (append_new(run, new_record((PyTypeObject *)record_type, items)) < 0) goto fail;
    }
    Py_XDECREF(run);
    Py_XDECREF(topic);
    Py_XDECREF(partition);
    Py_DECREF(seq);
    return out;
fail:
    Py_XDECREF(out);
    Py_XDECREF(run);
    Py_XDECREF(topic);
    Py_XDECREF(partition);
    Py_DECREF(seq);
    return NULL;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS,
     "scan(records, input_dim, max_event_bytes) -> (offsets, rows, ids, labels, tasks, "
     "timestamps, sources, nonfinite, unsure)"},
    {"message_runs", message_runs, METH_VARARGS,
     "message_runs(messages, record_type) -> [((topic, partition), [record, ...]), ...]: "
     "confluent-kafka Messages (those without an error) as runs of one partition, in order"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "consumers._eventscan",
    .m_doc = "Native fast paths of the consumer thread (see the source's header).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__eventscan(void) {
    if (!(s_error = PyUnicode_InternFromString("error")) ||
        !(s_topic = PyUnicode_InternFromString("topic")) ||
        !(s_partition = PyUnicode_InternFromString("partition")) ||
        !(s_offset = PyUnicode_InternFromString("offset")) ||
        !(s_value = PyUnicode_InternFromString("value")) ||
        !(s_timestamp = PyUnicode_InternFromString("timestamp")))
        return NULL;
    return PyModule_Create(&module);
}
