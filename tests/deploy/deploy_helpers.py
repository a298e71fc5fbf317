"""What the deploy tests share."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).is_file()), None
    )
    if found is None:
        pytest.fail("nginx is not installed: ./test.sh installs it (Debian: apt-get install nginx)")
    return found
