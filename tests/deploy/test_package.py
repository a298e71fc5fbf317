"""chatgate as a package: ``python -m build`` makes an sdist and, from it, a wheel; the
wheel installed into a fresh virtualenv serves the page and answers a chat; ``pipx install``
of the source tree gives a working ``chatgate``; every one reports the version written
once, in ``chatgate.__version__``.

The build runs on a copy of the checkout (the files git tracks or would add), so that the
build's own output (``build/``, ``*.egg-info``) never lands in the working tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatgate import __version__
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM, free_port, stop_process, wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
INSTALL_S = 900  # dependencies from the index or pip's cache


def run(*args: str | Path, timeout: float = INSTALL_S, **kwargs: Any) -> str:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def clean_environment() -> dict[str, str]:
    """This process's environment without chatgate's settings, nor a PYTHONPATH that could
    put the checkout's sources before the installed package."""
    return {
        k: v for k, v in os.environ.items() if not k.startswith(("CHATGATE_", "OLLAMA_", "PIPX_")) and k != "PYTHONPATH"
    }


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkout's files as a commit of it would hold them: tracked, and new ones not
    ignored."""
    listed = run("git", "-C", REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard", timeout=60)
    tree = tmp_path_factory.mktemp("source") / "chatgate"
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():  # not a file deleted but not yet committed
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, tree / name)
    return tree


@dataclass
class Distributions:
    wheel: Path
    sdist: Path


@pytest.fixture(scope="module")
def distributions(source_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Distributions:
    """``python -m build``: the sdist, then the wheel built from the sdist (so the sdist
    must hold everything the wheel needs)."""
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--outdir", out, source_tree, env=clean_environment())
    [wheel] = out.glob("*.whl")
    [sdist] = out.glob("*.tar.gz")
    return Distributions(wheel, sdist)


def test_build_makes_a_wheel_and_an_sdist_with_the_page(distributions: Distributions) -> None:
    assert distributions.wheel.name == f"chatgate-{__version__}-py3-none-any.whl"
    assert distributions.sdist.name == f"chatgate-{__version__}.tar.gz"
    web = sorted(p.relative_to(REPO / "src").as_posix() for p in (REPO / "src/chatgate/web").rglob("*") if p.is_file())
    assert "chatgate/web/vendor/marked.umd.js" in web

    with zipfile.ZipFile(distributions.wheel) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read(f"chatgate-{__version__}.dist-info/METADATA").decode()
        entry_points = wheel.read(f"chatgate-{__version__}.dist-info/entry_points.txt").decode()
    assert set(web) <= names, sorted(set(web) - names)
    assert {"chatgate/py.typed", "chatgate/__init__.py", "chatgate/cli.py"} <= names
    assert not any(name.startswith(("tests/", "bench/", "deploy/")) for name in names)
    assert f"\nVersion: {__version__}\n" in metadata
    assert "Provides-Extra: local" in metadata
    assert "chatgate = chatgate.cli:main" in entry_points

    with tarfile.open(distributions.sdist) as sdist:
        members = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {"pyproject.toml", "README.md"} <= members
    assert {f"src/{name}" for name in web} <= members


@pytest.fixture(scope="module")
def fresh_venv(distributions: Distributions, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv with the wheel installed in it, and nothing of the checkout."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    run(sys.executable, "-m", "venv", venv, timeout=120)
    run(venv / "bin" / "python", "-m", "pip", "install", "-q", distributions.wheel, env=clean_environment())
    return venv


@contextmanager
def serving(chatgate: Path, fake: FakeLLM, workdir: Path) -> Iterator[str]:
    """``chatgate serve`` from ``chatgate``, in ``workdir`` (no .env there), against the fake
    upstream, its data (the SQLite file) under ``workdir``; its base URL once it is live."""
    port = free_port()
    log = workdir / "serve.log"
    env = {
        **clean_environment(),
        "PYTHONUNBUFFERED": "1",
        "CHATGATE_PROVIDER": "ollama",
        "OLLAMA_HOST": fake.url,
        "CHATGATE_MODEL": "fake-model",
        "CHATGATE_DATA_DIR": str(workdir / "data"),
    }
    with log.open("w") as output:
        process = subprocess.Popen(
            [chatgate, "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def live() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"chatgate serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            return httpx.get(f"{url}/health/live", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(live, timeout=60, interval=0.05, what="chatgate serve from the installed package")
        yield url
    finally:
        if process.poll() is None:
            stop_process(process)


def test_the_installed_wheel_serves_the_page_and_answers(fresh_venv: Path, fake: FakeLLM, tmp_path: Path) -> None:
    python = fresh_venv / "bin" / "python"
    installed = run(python, "-c", "import chatgate; print(chatgate.__file__)", cwd=tmp_path, env=clean_environment())
    assert Path(installed.strip()).is_relative_to(fresh_venv), installed
    assert run(fresh_venv / "bin" / "chatgate", "--version", timeout=60).strip() == f"chatgate {__version__}"

    with serving(fresh_venv / "bin" / "chatgate", fake, tmp_path) as url:
        page = httpx.get(f"{url}/", timeout=5)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'src="assets/app.js"' in page.text and 'src="assets/vendor/marked.umd.js"' in page.text
        script = httpx.get(f"{url}/assets/app.js", timeout=5)
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        assert script.text == (REPO / "src/chatgate/web/app.js").read_text()
        vendor = httpx.get(f"{url}/assets/vendor/marked.umd.js", timeout=5)
        assert vendor.status_code == 200 and vendor.text == (REPO / "src/chatgate/web/vendor/marked.umd.js").read_text()

        answer = httpx.post(f"{url}/chat", json={"message": "hello from the wheel"}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["reply"] == fake_reply(40)
        assert answer.json()["provider"] == "ollama"

        health = httpx.get(f"{url}/health", timeout=10).json()
        assert health["version"] == __version__ and health["status"] == "ok", health
    assert (tmp_path / "data" / "chatgate.db").is_file(), "the conversation went to CHATGATE_DATA_DIR"


def test_pipx_install_of_the_source_tree(source_tree: Path, fake: FakeLLM, tmp_path: Path) -> None:
    """``pipx install .`` in a checkout: pipx (from the test extra) with its home and bin
    folder under tmp_path, so nothing of the user's own pipx is touched."""
    env = {
        **clean_environment(),
        "PIPX_HOME": str(tmp_path / "pipx"),
        "PIPX_BIN_DIR": str(tmp_path / "bin"),
        "PIPX_MAN_DIR": str(tmp_path / "man"),
    }
    run(sys.executable, "-m", "pipx", "install", ".", cwd=source_tree, env=env)
    chatgate = tmp_path / "bin" / "chatgate"
    assert run(chatgate, "--version", timeout=60).strip() == f"chatgate {__version__}"
    with serving(chatgate, fake, tmp_path) as url:
        answer = httpx.post(f"{url}/chat", json={"message": "hello from pipx"}, timeout=30)
        assert answer.status_code == 200 and answer.json()["reply"] == fake_reply(40), answer.text
        assert httpx.get(f"{url}/health", timeout=10).json()["version"] == __version__
