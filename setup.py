"""
Only the optional native scan lives here (pyproject.toml has the rest): if it
cannot be compiled, the package installs and runs with the pure-Python scan.
It is built against the limited API, so one wheel (abi3) serves every
supported Python.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "twisted_relay._cscan",
            ["twisted_relay/_cscan.c"],
            optional=True,
            py_limited_api=True,
        )
    ],
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
