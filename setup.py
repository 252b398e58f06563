"""Metadata is in setup.cfg; this file builds rebind.c.

rebind.c becomes websockify/_rebind*.so, an LD_PRELOAD library for wrapped
programs (Python never imports it). Without a C compiler the install still
succeeds, with a warning: only wrapping a program is then unavailable.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:
    from setuptools.errors import CCompilerError, ExecError, PlatformError
except ImportError:  # setuptools older than 59
    from distutils.errors import (CCompilerError, DistutilsExecError as ExecError,
                                  DistutilsPlatformError as PlatformError)


class OptionalBuildExt(build_ext):
    """Build the rebind library, or warn when there is no working compiler."""

    def initialize_options(self):
        super().initialize_options()
        self.failed = set()

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except (CCompilerError, ExecError, PlatformError, OSError) as exc:
            self.failed.add(ext.name)
            self.warn("could not build the rebind library (%s): websockify works, but "
                      "cannot wrap a program (-- COMMAND) unless --rebind-lib points "
                      "to a built rebind.so" % exc)

    def _only_built(self, method):
        # Later steps (in-place copy, editable wheels) must not look for what failed.
        everything = self.extensions
        self.extensions = [ext for ext in everything if ext.name not in self.failed]
        try:
            return method()
        finally:
            self.extensions = everything

    def copy_extensions_to_source(self):
        self._only_built(super().copy_extensions_to_source)

    def get_outputs(self):
        return self._only_built(super().get_outputs)

    def get_output_mapping(self):
        return self._only_built(super().get_output_mapping)


setup(
    ext_modules=[
        Extension("websockify._rebind", sources=["rebind.c"], libraries=["dl"]),
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
