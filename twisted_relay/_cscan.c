/*
 * Native versions of the relay's two per-frame loops: scan_run (scan.py), over
 * frames that need nothing but the scan and the domain's checks, and
 * audit_records (audit/format.py), which makes the audit log's records.
 * Optional: when this cannot be built, the pure-Python versions are used, with
 * the same results (tests check both against each other).
 *
 * Written to the limited API, so one build (abi3) serves every Python from 3.11.
 */
#define Py_LIMITED_API 0x030B0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static uint32_t le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t le64(const unsigned char *p)
{
    return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32;
}

/* CRC-32 (IEEE 802.3, as zlib.crc32), eight bytes at a time. */
static uint32_t crc_table[8][256];

static void
crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
}

static uint32_t
crc32_update(uint32_t crc, const unsigned char *p, size_t n)
{
    crc = ~crc;
    while (n >= 8) {
        uint32_t a = crc ^ le32(p), b = le32(p + 4);
        crc = crc_table[7][a & 0xff] ^ crc_table[6][(a >> 8) & 0xff]
            ^ crc_table[5][(a >> 16) & 0xff] ^ crc_table[4][a >> 24]
            ^ crc_table[3][b & 0xff] ^ crc_table[2][(b >> 8) & 0xff]
            ^ crc_table[1][(b >> 16) & 0xff] ^ crc_table[0][b >> 24];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = crc_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

/*
 * The strict TLV walk of wire.tlv_spans over the payload p[0:n]: every TLV
 * whole, an extended TLV's reserved byte 0, and its type allowed
 * (allowed[type] != 0).
 */
static int
tlvs_allowed(const unsigned char *p, size_t n, const unsigned char *allowed)
{
    const unsigned char *end = p + n;
    while (p < end) {
        unsigned type = p[0];
        size_t length;
        if (type == 255) {
            if (end - p < 5 || p[1] != 0)  /* cut short, or reserved byte set */
                return 0;
            type = p[2];
            length = (size_t)p[3] | (size_t)p[4] << 8;
            p += 5;
        } else {
            if (end - p < 2)
                return 0;
            length = p[1];
            p += 2;
        }
        if ((size_t)(end - p) < length || !allowed[type])
            return 0;
        p += length;
    }
    return 1;
}

/*
 * The types of the whole TLVs of the payload p[0:n] before any malformed
 * one, as a 256-bit set: what control.Subscription.wants looks at.
 */
static void
tlv_types(const unsigned char *p, size_t n, uint64_t types[4])
{
    const unsigned char *end = p + n;
    types[0] = types[1] = types[2] = types[3] = 0;
    while (p < end) {
        unsigned type = p[0];
        size_t length;
        if (type == 255) {
            if (end - p < 5 || p[1] != 0)
                return;
            type = p[2];
            length = (size_t)p[3] | (size_t)p[4] << 8;
            p += 5;
        } else {
            if (end - p < 2)
                return;
            length = p[1];
            p += 2;
        }
        if ((size_t)(end - p) < length)
            return;
        types[type >> 6] |= (uint64_t)1 << (type & 63);
        p += length;
    }
}

/* One subscription's filter and the frames it picked so far. */
typedef struct {
    uint64_t sources[4], types[4];
    int any_source, any_type;
    Py_ssize_t start, stop, frames, size;
    PyObject *spans;
} Filter;

/* A 256-byte table (or b"": anything) as a 256-bit set; -1 on error. */
static int
table_bits(PyObject *table, uint64_t bits[4], int *any)
{
    Py_buffer b;
    if (PyObject_GetBuffer(table, &b, PyBUF_SIMPLE) < 0)
        return -1;
    bits[0] = bits[1] = bits[2] = bits[3] = 0;
    *any = b.len == 0;
    if (b.len != 0 && b.len != 256) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "a filter's tables must be empty or 256 bytes");
        return -1;
    }
    for (Py_ssize_t i = 0; i < b.len; i++)
        if (((const unsigned char *)b.buf)[i])
            bits[i >> 6] |= (uint64_t)1 << (i & 63);
    PyBuffer_Release(&b);
    return 0;
}

static int
add_span(Filter *f)
{
    PyObject *span = Py_BuildValue("nn", f->start, f->stop);
    if (span == NULL)
        return -1;
    int failed = PyList_Append(f->spans, span);
    Py_DECREF(span);
    return failed;
}

static int
has(const uint64_t bits[4], unsigned i)
{
    return (bits[i >> 6] >> (i & 63)) & 1;
}

static PyObject *
pick_runs(PyObject *module, PyObject *args)
{
    Py_buffer view;
    PyObject *filters, *result = NULL;
    Filter *f = NULL;
    Py_ssize_t n = 0, i;

    if (!PyArg_ParseTuple(args, "y*O:pick_runs", &view, &filters))
        return NULL;
    if ((n = PySequence_Size(filters)) < 0)
        goto done;
    if ((f = PyMem_Calloc(n ? n : 1, sizeof(Filter))) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int walk = 0;
    for (i = 0; i < n; i++) {
        PyObject *pair = PySequence_GetItem(filters, i), *sources = NULL, *types = NULL;
        int failed = pair == NULL || PySequence_Size(pair) != 2
            || (sources = PySequence_GetItem(pair, 0)) == NULL
            || (types = PySequence_GetItem(pair, 1)) == NULL
            || table_bits(sources, f[i].sources, &f[i].any_source) < 0
            || table_bits(types, f[i].types, &f[i].any_type) < 0;
        Py_XDECREF(sources);
        Py_XDECREF(types);
        Py_XDECREF(pair);
        if (failed) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "each filter is (sources, tlv_types)");
            goto done;
        }
        if ((f[i].spans = PyList_New(0)) == NULL)
            goto done;
        f[i].start = -1;
        walk |= !f[i].any_type;
    }
    const unsigned char *buf = view.buf;
    Py_ssize_t offset = 0;
    uint64_t types[4] = {0, 0, 0, 0};
    while (view.len - offset >= 32) {
        const unsigned char *h = buf + offset;
        uint32_t payload = le32(h + 24);
        if ((uint64_t)(view.len - offset - 32) < payload)
            break;
        Py_ssize_t frame_end = offset + 32 + (Py_ssize_t)payload;
        if (walk)
            tlv_types(h + 32, payload, types);
        for (i = 0; i < n; i++) {
            Filter *g = &f[i];
            if (!(g->any_source || has(g->sources, h[6])))
                continue;
            if (!(g->any_type || (types[0] & g->types[0]) || (types[1] & g->types[1])
                  || (types[2] & g->types[2]) || (types[3] & g->types[3])))
                continue;
            g->frames++;
            g->size += frame_end - offset;
            if (g->start >= 0 && g->stop == offset) {
                g->stop = frame_end;
                continue;
            }
            if (g->start >= 0 && add_span(g) < 0)
                goto done;
            g->start = offset;
            g->stop = frame_end;
        }
        offset = frame_end;
    }
    if ((result = PyList_New(n)) == NULL)
        goto done;
    for (i = 0; i < n; i++) {
        PyObject *item;
        if ((f[i].start >= 0 && add_span(&f[i]) < 0)
            || (item = Py_BuildValue("Onn", f[i].spans, f[i].frames, f[i].size)) == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SetItem(result, i, item);
    }
done:
    if (f != NULL)
        for (i = 0; i < n; i++)
            Py_XDECREF(f[i].spans);
    PyMem_Free(f);
    PyBuffer_Release(&view);
    return result;
}

static PyObject *
scan_run(PyObject *module, PyObject *args)
{
    Py_buffer view, allowed;
    Py_ssize_t offset, end, frames = 0;
    unsigned long long max_payload, last;
    long domain, source;
    int verify;

    if (!PyArg_ParseTuple(args, "y*nnKllKpy*:scan_run", &view, &offset, &end, &max_payload,
                          &domain, &source, &last, &verify, &allowed))
        return NULL;
    if (allowed.len != 0 && allowed.len != 256) {
        PyBuffer_Release(&view);
        PyBuffer_Release(&allowed);
        PyErr_SetString(PyExc_ValueError, "allowed must be empty or 256 bytes");
        return NULL;
    }
    if (end > view.len)
        end = view.len;
    const unsigned char *buf = view.buf;
    const unsigned char *types = allowed.len ? allowed.buf : NULL;
    while (offset >= 0 && end - offset >= 32) {
        const unsigned char *h = buf + offset;
        uint32_t size = le32(h + 24);
        uint64_t sequence = le64(h + 8);
        if (le32(h) != 0xDEADBEEFu || h[5] != 1 || size > max_payload
            || (uint64_t)(end - offset - 32) < size)
            break;
        Py_ssize_t frame_end = offset + 32 + (Py_ssize_t)size;
        if (h[4] != domain || h[6] != source || sequence == 0 || sequence - 1 != last)
            break;
        if (verify && crc32_update(crc32_update(0, h, 28), h + 32, size) != le32(h + 28))
            break;
        if (types != NULL && !tlvs_allowed(h + 32, size, types))
            break;
        frames++;
        last = sequence;
        offset = frame_end;
    }
    PyBuffer_Release(&view);
    PyBuffer_Release(&allowed);
    return Py_BuildValue("nnK", offset, frames, last);
}

static void
put32(unsigned char *p, uint32_t v)
{
    p[0] = v & 0xff; p[1] = (v >> 8) & 0xff; p[2] = (v >> 16) & 0xff; p[3] = v >> 24;
}

/* Walk the whole frames of one run: their count and record bytes, or -1. */
static Py_ssize_t
run_size(const unsigned char *buf, Py_ssize_t len, Py_ssize_t *frames)
{
    Py_ssize_t offset = 0, size = 0;
    while (offset < len) {
        if (len - offset < 32)
            return -1;
        Py_ssize_t frame = 32 + (Py_ssize_t)le32(buf + offset + 24);
        if (frame > len - offset)
            return -1;
        size += 16 + frame + 4;
        offset += frame;
        (*frames)++;
    }
    return size;
}

/*
 * The records are built with the GIL released (the runs are bytes, which
 * nobody can change meanwhile), so the reactor thread runs while the audit
 * log's writer thread builds them.
 */
static PyObject *
audit_records(PyObject *module, PyObject *args)
{
    PyObject *runs, *result = NULL, *sequences = NULL, *data = NULL;
    unsigned long long received;
    unsigned long client, crc;
    Py_ssize_t frames = 0, total = 0, held = 0;
    int64_t last[256];
    char seen[256] = {0};

    if (!PyArg_ParseTuple(args, "O!Kkk:audit_records", &PyList_Type, &runs, &received, &client,
                          &crc))
        return NULL;
    Py_ssize_t n = PyList_Size(runs);
    Py_buffer *views = PyMem_Calloc(n ? n : 1, sizeof(Py_buffer));
    if (views == NULL)
        return PyErr_NoMemory();
    for (; held < n; held++) {
        PyObject *run = PyList_GetItem(runs, held);
        if (!PyBytes_Check(run)) {  /* immutable while the GIL is released below */
            PyErr_SetString(PyExc_TypeError, "each run must be bytes");
            goto done;
        }
        if (PyObject_GetBuffer(run, &views[held], PyBUF_SIMPLE) < 0)
            goto done;
        Py_ssize_t size = run_size(views[held].buf, views[held].len, &frames);
        if (size < 0) {
            PyBuffer_Release(&views[held]);
            PyErr_SetString(PyExc_ValueError, "a run does not hold whole frames");
            goto done;
        }
        total += size;
    }
    data = PyBytes_FromStringAndSize(NULL, total);
    if (data == NULL)
        goto done;
    unsigned char *out = (unsigned char *)PyBytes_AsString(data);
    uint32_t chain = (uint32_t)crc;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        const unsigned char *buf = views[i].buf;
        Py_ssize_t offset = 0;
        while (offset < views[i].len) {
            const unsigned char *h = buf + offset;
            uint32_t frame = 32 + le32(h + 24);
            put32(out, frame);
            put32(out + 4, (uint32_t)received);
            put32(out + 8, (uint32_t)(received >> 32));
            put32(out + 12, (uint32_t)client);
            memcpy(out + 16, h, frame);
            chain = crc32_update(chain, out, 16 + frame);
            put32(out + 16 + frame, chain);
            out += 16 + frame + 4;
            last[h[6]] = (int64_t)le64(h + 8);
            seen[h[6]] = 1;
            offset += frame;
        }
    }
    Py_END_ALLOW_THREADS
    sequences = PyDict_New();
    if (sequences == NULL)
        goto done;
    for (int source = 0; source < 256; source++) {
        if (!seen[source])
            continue;
        PyObject *key = PyLong_FromLong(source);
        PyObject *value = PyLong_FromUnsignedLongLong((unsigned long long)last[source]);
        int failed = key == NULL || value == NULL || PyDict_SetItem(sequences, key, value) < 0;
        Py_XDECREF(key);
        Py_XDECREF(value);
        if (failed)
            goto done;
    }
    result = Py_BuildValue("OknO", data, (unsigned long)chain, frames, sequences);
done:
    for (Py_ssize_t i = 0; i < held; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    Py_XDECREF(data);
    Py_XDECREF(sequences);
    return result;
}

static PyMethodDef methods[] = {
    {"scan_run", scan_run, METH_VARARGS,
     "scan_run(buf, offset, end, max_payload, domain, source, last, verify, allowed)"
     " -> (offset, frames, last)"},
    {"pick_runs", pick_runs, METH_VARARGS,
     "pick_runs(run, [(sources, tlv_types), ...]) -> [(spans, frames, size), ...]"},
    {"audit_records", audit_records, METH_VARARGS,
     "audit_records(runs, received_ns, client_id, crc) -> (records, crc, count, sequences)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cscan", "Native per-frame loops of the relay.", -1, methods,
};

PyMODINIT_FUNC
PyInit__cscan(void)
{
    crc_init();
    return PyModule_Create(&module);
}
