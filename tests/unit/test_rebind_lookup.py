"""Where find_rebind_lib looks when neither --rebind-lib nor the environment names a library."""

import os

import pytest

from websockify.arbiter import wrap


def make_package(base, *parts):
    """An installed-looking websockify package directory under ``base``."""
    package = os.path.join(str(base), *parts, "websockify")
    os.makedirs(os.path.join(package, "arbiter"))
    return package


def touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(b"\x7fELF")
    return path


@pytest.mark.parametrize("site", [("usr", "lib", "python3", "dist-packages"),
                                  ("usr", "local", "lib", "python3.11", "site-packages"),
                                  ("venv", "lib", "python3.12", "site-packages")])
def test_prefix_library_of_an_installed_package(tmp_path, site):
    package = make_package(tmp_path, *site)
    prefix_lib = os.path.dirname(os.path.dirname(os.path.dirname(package)))
    assert wrap._prefix_library(package) is None        # not there yet
    lib = touch(os.path.join(prefix_lib, "websockify", "rebind.so"))
    assert wrap._prefix_library(package) == lib


@pytest.mark.parametrize("parts", [("src",), ("usr", "lib", "websockify-tree"),
                                   ("usr", "lib", "ruby", "site-packages")])
def test_no_prefix_library_for_a_source_tree(tmp_path, parts):
    # A checkout or a copy is not an install: it never borrows a library.
    package = make_package(tmp_path, *parts)
    touch(os.path.join(str(tmp_path), "usr", "lib", "websockify", "rebind.so"))
    touch(os.path.join(os.path.dirname(os.path.dirname(package)), "websockify", "rebind.so"))
    assert wrap._prefix_library(package) is None


def test_debian_place_is_used_after_the_built_library(tmp_path, monkeypatch):
    package = make_package(tmp_path, "usr", "lib", "python3", "dist-packages")
    debian_lib = touch(os.path.join(str(tmp_path), "usr", "lib", "websockify", "rebind.so"))
    monkeypatch.delenv(wrap.REBIND_LIB_ENV, raising=False)
    monkeypatch.setattr(wrap, "_package_dir", lambda: package)
    assert wrap.find_rebind_lib() == debian_lib
    built = touch(os.path.join(package, "_rebind.so"))
    assert wrap.find_rebind_lib() == built
    # --rebind-lib and the environment still come first.
    other = touch(os.path.join(str(tmp_path), "other.so"))
    monkeypatch.setenv(wrap.REBIND_LIB_ENV, other)
    assert wrap.find_rebind_lib() == other


def test_nothing_found_is_a_wrap_error(tmp_path, monkeypatch):
    package = make_package(tmp_path, "usr", "lib", "python3", "dist-packages")
    monkeypatch.delenv(wrap.REBIND_LIB_ENV, raising=False)
    monkeypatch.setattr(wrap, "_package_dir", lambda: package)
    with pytest.raises(wrap.WrapError, match="the rebind library was not built"):
        wrap.find_rebind_lib()
