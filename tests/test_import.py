"""Importing cachec prints nothing, with or without Triton installed."""
import subprocess
import sys


def test_import_is_quiet():
    done = subprocess.run([sys.executable, "-c", "import cachec"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == "", done.stderr
