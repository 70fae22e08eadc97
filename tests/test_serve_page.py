"""The pages shipped in the package, without a browser: served at ``/`` with a strict CSP, public
(no key) while the data stays behind it, every asset they reference served, nothing from another origin."""

import re
import shutil
import subprocess

import pytest
from serve_util import InProcessServer

from moekit.config import ModelConfig
from moekit.model import Transformer

pytest.importorskip("fastapi")
from moekit.infer import Engine  # noqa: E402
from moekit.serve import create_app, create_dashboard_app  # noqa: E402
from moekit.serve.page import STATIC  # noqa: E402

KEY = "k3y"


@pytest.fixture(scope="module")
def server():
    cfg = ModelConfig.from_preset("tiny-moe", dim=32, n_layers=1, n_heads=2, n_kv_heads=1, expert_ffn_dim=32,
                                  max_seq_len=32)
    s = InProcessServer(create_app(Engine(Transformer(cfg)), "tiny", api_key=KEY))
    yield s
    assert s.stop()


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    s = InProcessServer(create_dashboard_app(tmp_path_factory.mktemp("runs")))
    yield s
    assert s.stop()


def _assets(html: str) -> list[str]:
    return [a for a in re.findall(r'(?:src|href)="([^"]+)"', html) if not a.startswith("data:")]  # inline: no request


@pytest.mark.parametrize("which, page, script", [("server", "index.html", "/static/app.js"),
                                                 ("dashboard", "dashboard.html", "/static/dashboard.js")])
def test_the_page_is_served_with_a_strict_csp_and_every_asset(request, which, page, script):
    s = request.getfixturevalue(which)
    status, html, headers = s.raw("GET", "/")  # no key: the page itself holds no data
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert html == (STATIC / page).read_text()
    csp = headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp and headers["x-content-type-options"] == "nosniff"
    assets = _assets(html)
    assert script in assets and "/static/style.css" in assets
    for asset in assets:
        status, body, headers = s.raw("GET", asset)
        assert status == 200, asset
        assert headers["content-type"].startswith(("text/javascript", "text/css"))
        assert "content-security-policy" in headers
        assert body == (STATIC / asset.removeprefix("/static/")).read_text()
    # no inline script: every <script> names a file (the CSP would block an inline one anyway)
    assert all('src="' in tag for tag in re.findall(r"<script[^>]*>", html))
    assert not re.search(r"\son[a-z]+=", html)  # nor inline event handlers


def test_the_data_still_needs_the_key(server):
    assert server.raw("GET", "/v1/moekit/info")[0] == 401
    assert server.raw("GET", "/v1/moekit/info", headers={"Authorization": f"Bearer {KEY}"})[0] == 200


@pytest.mark.parametrize("path", ["/static/../app.py", "/static/%2e%2e%2fapp.py", "/static/nope.js",
                                  "/static/..%2F..%2Fconfig.py", "/static/"])
def test_only_the_shipped_files_are_served(server, path):
    status, body, _ = server.raw("GET", path)
    assert status == 404, (path, body)
    assert "def " not in body


def test_no_asset_refers_to_another_origin():
    """No CDN, no remote font: the page works offline and leaks no visit (the CSP would block them too)."""
    files = sorted(STATIC.iterdir())
    assert {f.name for f in files} >= {"index.html", "app.js", "style.css", "dashboard.html", "dashboard.js"}
    for f in files:
        text = f.read_text()
        assert not re.search(r"https?://", text), f.name
        assert "@import" not in text and "url(" not in text, f.name  # CSS fetches nothing either


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (a syntax check of the page's scripts)")
def test_the_scripts_parse():
    for f in sorted(STATIC.glob("*.js")):
        out = subprocess.run(["node", "--check", str(f)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, (f.name, out.stderr)
