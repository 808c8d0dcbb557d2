/*
 * Native version of twisted_relay.scan.scan_run: the relay's inner loop over
 * frames that need nothing but the scan. Optional: when it cannot be built,
 * the pure-Python version in scan.py is used, with the same results (tests
 * check both against each other).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static uint32_t le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t le64(const unsigned char *p)
{
    return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32;
}

static PyObject *
scan_run(PyObject *module, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t offset, end, frames = 0;
    unsigned long long max_payload, last;
    long domain, source;

    if (!PyArg_ParseTuple(args, "y*nnKllK:scan_run", &view, &offset, &end, &max_payload,
                          &domain, &source, &last))
        return NULL;
    if (end > view.len)
        end = view.len;
    const unsigned char *buf = view.buf;
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
        frames++;
        last = sequence;
        offset = frame_end;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("nnK", offset, frames, last);
}

static PyMethodDef methods[] = {
    {"scan_run", scan_run, METH_VARARGS,
     "scan_run(buf, offset, end, max_payload, domain, source, last) -> (offset, frames, last)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cscan", "Native inner loop of the relay's scan.", -1, methods,
};

PyMODINIT_FUNC
PyInit__cscan(void)
{
    return PyModule_Create(&module);
}
