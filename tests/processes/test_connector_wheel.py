"""`pip wheel .` builds the connector alone: no simulator module and no demo credential in what production installs."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from expensify_exact_sandbox.cli import DEMO_CREDENTIALS_ENV
from tests.conftest import REPO


def test_the_connector_wheel_holds_no_simulator_and_no_demo_credential(tmp_path):
    source = tmp_path / "source"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:  # a clean copy: no build/ or egg-info of an earlier build can leak into the wheel
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True, text=True)
    [wheel] = (tmp_path / "dist").glob("expensify_exact-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        text = {name: archive.read(name).decode("utf-8", "replace") for name in names}
    modules = [n for n in names if n.endswith(".py")]
    assert "expensify_exact/core/posting.py" in modules and "expensify_exact/cli/main.py" in modules
    assert not [n for n in names if not n.startswith(("expensify_exact/", "expensify_exact-"))], names
    assert not [n for n in modules if "sandbox" in Path(n).name or "freemarker" in n or "seed" in Path(n).name]
    leaked = {f"{env} in {name}" for name, body in text.items() for env, secret in DEMO_CREDENTIALS_ENV.items()
              if secret in body}
    assert not leaked, sorted(leaked)
