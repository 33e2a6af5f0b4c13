"""The package itself: imports, exceptions, plugins, module layout."""

import subprocess
import sys

import pytest

import kvferry
import kvferry.nixl


def test_import_does_not_import_numpy_or_torch():
    code = "import sys, kvferry, kvferry.nixl, kvferry.nixl._api; print('numpy' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_exceptions_mirror_error_kinds():
    kinds = ["InvalidParam", "Backend", "NotFound", "Mismatch", "NotAllowed", "RepostActive", "NotSupported",
             "RemoteDisconnect", "Canceled", "Timeout", "Malformed", "Internal"]
    for k in kinds:
        cls = getattr(kvferry, f"{k}Error")
        assert issubclass(cls, kvferry.Error) and cls.kind == k
    assert issubclass(kvferry.TimeoutError, TimeoutError)
    with pytest.raises(kvferry.InvalidParamError) as e:
        kvferry.Agent("", [])
    assert "non-empty" in str(e.value) and e.value.kind == "InvalidParam"
    assert e.value.status == "NIXL_ERR_INVALID_PARAM"


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(kvferry.Error) as e:
        kvferry.Agent("pkg-unknown", ["NOPE"])
    assert "NOPE" in str(e.value) and "TCP" in str(e.value)


def test_plugins_and_params():
    assert {"LOCAL", "TCP", "POSIX"} <= set(kvferry.plugins())
    mems, params = kvferry.plugin_params("TCP")
    assert "DRAM" in mems and all(isinstance(v, str) for v in params.values())


def test_nixl_module_layout_and_install():
    from kvferry.nixl import _api, _bindings, _utils, logging

    assert hasattr(_api, "nixl_agent") and hasattr(_api, "nixl_agent_config")
    assert hasattr(_bindings, "nixlXferDList") and hasattr(_bindings, "nixlRemoteDisconnectError")
    assert all(hasattr(_utils, f) for f in ("malloc_passthru", "free_passthru", "ba_buf", "verify_transfer"))
    assert logging.get_logger("_api").name == "nixl.api"
    kvferry.nixl.install()
    try:
        import nixl
        import nixl._api as api
        from nixl._bindings import nixlNotFoundError  # noqa: F401

        assert nixl is kvferry.nixl and api is _api
        assert nixl.nixl_agent is _api.nixl_agent
    finally:
        kvferry.nixl.uninstall()
    assert "nixl" not in sys.modules


def test_python_m_kvferry_nixl_runs_a_script(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import sys, nixl._api\nprint(nixl._api.__name__, sys.argv[1:])\n")
    out = subprocess.run([sys.executable, "-m", "kvferry.nixl", str(script), "a", "b"], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "kvferry.nixl._api ['a', 'b']"


def test_stubs_and_py_typed_ship():
    import importlib.resources as r

    files = {p.name for p in r.files("kvferry").iterdir()}
    assert "py.typed" in files and "__init__.pyi" in files


def test_rust_logs_reach_python_logging(caplog):
    import logging
    import time

    from kvferry import _kvferry

    with caplog.at_level(logging.WARNING, logger="kvferry"):
        _kvferry._emit_log("warn", "a warning from Rust")
        _kvferry._emit_log("debug", "below the default filter")
        deadline = time.time() + 5
        while not any("a warning from Rust" in r.getMessage() for r in caplog.records) and time.time() < deadline:
            time.sleep(0.01)
    rec = [r for r in caplog.records if "a warning from Rust" in r.getMessage()]
    assert rec and rec[0].name == "kvferry.py" and rec[0].levelno == logging.WARNING, caplog.records
    assert not any("below the default filter" in r.getMessage() for r in caplog.records)
