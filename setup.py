"""The optional compiled data plane, agent._fastpath (C over OpenSSL's libcrypto).

Everything else is in pyproject.toml. Building needs gcc, the Python headers and libssl-dev
(packaging/setup.sh installs them). If the build fails the install still succeeds, with a
warning, and the agent runs its pure-Python data plane (`dataplane = "auto"`);
AGENT_NATIVE=0 skips the build, AGENT_NATIVE=1 makes a failed build an error.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCES = ["native/module.c", "native/crypto.c", "native/transport.c", "native/offload.c", "native/io.c", "native/udp.c", "native/lanes.c", "native/pump.c"]
WANT = os.environ.get("AGENT_NATIVE", "")


class OptionalBuildExt(build_ext):
    """Build agent._fastpath if the toolchain allows; warn instead of failing."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any compiler or linker failure
            self._skip(e)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            self._skip(e)

    def _skip(self, error: Exception) -> None:
        if WANT == "1":
            raise error
        sys.stderr.write(
            f"warning: agent._fastpath was not built ({error}); the pure-Python data plane "
            "will run (install gcc, python3-dev and libssl-dev, then reinstall)\n"
        )


ext_modules = []
if WANT != "0":
    ext_modules.append(
        Extension(
            "agent._fastpath",
            sources=SOURCES,
            depends=[
                "native/fastpath.h",
                "native/transport.h",
                "native/offload.h",
                "native/offload_py.h",
                "native/lanes.h",
            ],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror=implicit"],
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
