"""What `pip install` of the project gets: a wheel built from this checkout carries every file of the
package, the kernel sources and headers compiled on first use and the web UI's files among them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_carries_every_file_of_the_package(tmp_path):
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    tracked = [f for f in files if f.startswith("mistralrs_py/")]
    assert any(f.endswith(".h") for f in tracked) and any(f.startswith("mistralrs_py/server/ui/") for f in tracked)
    # NOTE: built from a copy of the tracked files: a build folder left in the checkout would hand
    # the wheel files that the package data no longer names
    src = tmp_path / "src"
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    [wheel] = tmp_path.glob("mistralrs_py-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in tracked if f not in names]
    assert not missing, f"not in the wheel (add them to [tool.setuptools.package-data]): {missing}"
