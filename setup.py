"""
Only the optional native scan lives here (pyproject.toml has the rest): if it
cannot be compiled, the package installs and runs with the pure-Python scan.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("twisted_relay._cscan", ["twisted_relay/_cscan.c"], optional=True)])
