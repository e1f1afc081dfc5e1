"""`python app.py` prepares the process for torch in worker threads, before torch loads."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from analysis.model import REPO_ROOT
from analysis.worker_threads import OPENMP_SETTINGS, prepare_for_worker_threads


def test_the_openmp_settings_are_set_and_a_users_own_are_kept(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("GOMP_SPINCOUNT", "12345")
    prepare_for_worker_threads()
    assert os.environ["OMP_WAIT_POLICY"] == OPENMP_SETTINGS["OMP_WAIT_POLICY"]
    assert os.environ["GOMP_SPINCOUNT"] == "12345"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's arena setting is glibc's")
def test_the_malloc_setting_takes_on_glibc(monkeypatch):
    for name in OPENMP_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert prepare_for_worker_threads() is True


def test_app_py_prepares_the_process_before_torch_loads():
    # app.py, run as `python app.py --help`, with the function wrapped to note whether torch was loaded by then.
    script = """
import runpy, sys
import analysis.worker_threads as worker_threads
prepare = worker_threads.prepare_for_worker_threads
def noting():
    print("torch loaded:", "torch" in sys.modules)
    return prepare()
worker_threads.prepare_for_worker_threads = noting
sys.argv = ["app.py", "--help"]
try:
    runpy.run_path("app.py", run_name="__main__")
except SystemExit:
    pass
import os
print(os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT"))
"""
    env = {key: value for key, value in os.environ.items() if key not in OPENMP_SETTINGS}
    lines = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert "torch loaded: False" in lines
    assert lines[-1] == " ".join(OPENMP_SETTINGS.values())
