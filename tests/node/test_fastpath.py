"""Which data plane runs (`[interface] dataplane`), and what the daemon says about it."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

from agent.node import fastpath
from agent.proto.wireguard.transport import PYTHON


def no_module(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def fake(name: str, package: str | None = None) -> ModuleType:
        if name == "agent._fastpath":
            raise ImportError("libcrypto.so.3: cannot open shared object file")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", fake)


def test_python_is_the_twin_and_needs_no_reason() -> None:
    impl = fastpath.select("python")
    assert (impl.name, impl.transport, impl.reason) == ("python", PYTHON, "")
    assert impl.describe() == "python"


def test_auto_without_the_module_runs_python_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    no_module(monkeypatch)
    impl = fastpath.select("auto")
    assert impl.name == "python"
    assert impl.transport is PYTHON
    assert impl.reason.startswith("auto: the compiled module does not load: libcrypto.so.3")
    assert impl.describe().startswith("python (auto: ")


def test_native_without_the_module_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    no_module(monkeypatch)
    with pytest.raises(fastpath.NativeUnavailable, match="dataplane = 'native' but"):
        fastpath.select("native")


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="auto, native, python"):
        fastpath.select("fast")


def test_auto_and_native_take_the_module_where_it_loads() -> None:
    pytest.importorskip("agent._fastpath", reason="the compiled module is not built")
    for mode in ("auto", "native"):
        impl = fastpath.select(mode)
        assert (impl.name, impl.transport.name, impl.reason) == ("native", "native", "")
        assert impl.module is not None
