"""The pages in a real browser (headless Chromium through Playwright) against live servers on loopback:
chat streams and stops, the routing view colours each token by the route endpoint's expert in every layer,
the per-task view of a task-routed model, the API key flow, a dashboard that grows while a real training
run writes, a compare directory with every model; and no page ever asks anything of another origin.
Screenshots are saved under test-artifacts/browser (see browser_util)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from browser_util import Watched, launch
from serve_util import InProcessServer, endless_ckpt, tiny_ckpt

pytest.importorskip("fastapi")
import moekit  # noqa: E402
from moekit.config import ModelConfig  # noqa: E402
from moekit.data import load_tokenizer  # noqa: E402
from moekit.infer import Engine  # noqa: E402
from moekit.model import Transformer  # noqa: E402
from moekit.serve import create_app, create_dashboard_app  # noqa: E402

KEY = "page-k3y"
TEXT = "ROMEO: But soft, what light through yonder window breaks?"


@pytest.fixture(scope="module")
def browser():
    pw, browser = launch()
    yield browser
    browser.close()
    pw.stop()


@pytest.fixture()
def stop_later():
    """Servers a test started, stopped after its pages are closed (a polling page must not see them go)."""
    servers = []
    yield servers.append
    for s in servers:
        assert s.stop()


@pytest.fixture()
def open_page(stop_later, browser, request):
    """open_page(server) -> a Watched page at the server's origin; on teardown: a screenshot, then the
    checks every page must pass (nothing off-origin, no console error)."""
    opened = []

    def _open(server, path="/"):
        w = Watched(browser, server.base, request.node.name.replace("[", "-").replace("]", ""))
        w.page.goto(server.base + path)
        opened.append(w)
        return w

    yield _open
    for w in opened:
        w.shot("-end")
        off, errors = w.off_origin(), w.errors
        w.close()
        assert off == [], f"the page asked another origin: {off}"
        assert errors == [], f"console errors: {errors}"


def _serve(path, **kw):
    model, tok = moekit.load(path)
    engine = Engine(model, tok, max_batch=2)
    server = InProcessServer(create_app(engine, "tiny", **kw))
    server.engine = engine
    return server


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    s = _serve(tiny_ckpt(tmp_path_factory.mktemp("tiny") / "ckpt"))
    yield s
    assert s.stop()


@pytest.fixture(scope="module")
def endless_server(tmp_path_factory):
    s = _serve(endless_ckpt(tmp_path_factory.mktemp("endless") / "ckpt"))
    yield s
    assert s.stop()


def _route(server, text, **extra):
    status, body, _ = server.raw("POST", "/v1/moekit/route", {"prompt": text, **extra},
                                 headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200, body
    return json.loads(body)


# --------------------------------------------------------------------------- chat
def test_a_prompt_streams_its_answer_and_stop_ends_a_long_one(open_page, endless_server):
    w = open_page(endless_server)
    page = w.page
    page.wait_for_function("() => document.getElementById('status').textContent.includes('experts')")
    # count how often the answer's text changes while it arrives: a streamed answer changes many times
    page.evaluate("""() => { window.updates = 0; new MutationObserver(() => window.updates++)
        .observe(document.getElementById('conversation'), {subtree: true, childList: true, characterData: true}); }""")
    page.fill("#max-tokens", "24")
    page.fill("#seed", "1")
    page.fill("#prompt", "Hello there")
    page.click("#send")
    page.wait_for_function("() => !document.getElementById('send').disabled && "
                           "document.querySelectorAll('.msg.assistant').length === 1")
    answer = page.inner_text(".msg.assistant")
    assert answer.strip() and page.inner_text(".msg.user") == "Hello there"
    assert page.evaluate("window.updates") > 5  # token by token, not one block at the end
    assert page.query_selector(".msg.error") is None
    w.shot("-answer")

    # a long answer (4,000 tokens: many seconds) stopped as soon as it starts arriving
    page.fill("#max-tokens", "4000")
    page.fill("#prompt", "Tell me everything")
    started = time.monotonic()
    page.click("#send")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant').length === 2 && "
                           "document.querySelectorAll('.msg.assistant')[1].textContent.length > 0")
    assert page.is_enabled("#stop")
    page.click("#stop")
    page.wait_for_function("() => !document.getElementById('send').disabled")
    stopped = page.inner_text(".msg.assistant >> nth=1")
    time.sleep(1.0)
    assert page.inner_text(".msg.assistant >> nth=1") == stopped  # nothing arrives after the stop
    assert page.is_disabled("#stop") and page.query_selector(".msg.error") is None
    # the server let go of the request: its slot is free long before 4,000 tokens could have been made
    deadline = time.monotonic() + 10
    while endless_server.engine.requests and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not endless_server.engine.requests
    assert time.monotonic() - started < 30
    # the conversation goes on after a stop
    page.fill("#max-tokens", "8")
    page.fill("#prompt", "and then?")
    page.click("#send")
    page.wait_for_function("() => !document.getElementById('send').disabled && "
                           "document.querySelectorAll('.msg.assistant').length === 3")


# --------------------------------------------------------------------------- routing view
def _tokens(page):
    return page.eval_on_selector_all(".tok", """spans => spans.map(s => ({text: s.textContent,
        expert: Number(s.dataset.expert), colour: getComputedStyle(s).backgroundColor}))""")


def test_every_token_is_coloured_by_the_route_endpoints_expert_in_every_layer(open_page, tiny_server):
    w = open_page(tiny_server)
    page = w.page
    page.wait_for_function("() => document.getElementById('status').textContent.includes('experts')")
    page.fill("#prompt", TEXT)
    page.click("#route-prompt")
    ref = _route(tiny_server, TEXT)
    n = len(ref["tokens"])
    page.wait_for_function(f"() => document.querySelectorAll('.tok').length === {n}")
    layers = page.eval_on_selector_all("#layer option", "os => os.map(o => o.textContent)")
    assert layers == [f"layer {i}" for i in ref["layers"]] and len(layers) >= 2
    colours = {}
    seen_experts = set()
    for li in range(len(layers)):
        page.select_option("#layer", str(li))
        shown = _tokens(page)
        assert [t["text"] for t in shown] == [t["text"] for t in ref["tokens"]]
        assert [t["expert"] for t in shown] == [t["experts"][li][0] for t in ref["tokens"]], f"layer {li}"
        for t in shown:  # one colour per expert, the same in every layer, different experts told apart
            assert colours.setdefault(t["expert"], t["colour"]) == t["colour"]
            seen_experts.add(t["expert"])
        bars = page.eval_on_selector_all("#bars .bar span:last-child", "ss => ss.map(s => Number(s.textContent))")
        assert bars == ref["load"][li]
        w.shot(f"-layer{li}")
    assert len(seen_experts) > 1 and len(set(colours.values())) == len(colours)
    cells = page.eval_on_selector_all("#heatmap .cell", "cs => cs.length")
    assert cells == len(layers) * ref["num_experts"]
    # hover a token: every layer's experts and gate weights for it
    page.hover(".tok >> nth=3")
    detail = page.inner_text("#detail")
    tok = ref["tokens"][3]
    for li, layer in enumerate(ref["layers"]):
        pairs = ", ".join(f"expert {e} ({g:.3f})" for e, g in zip(tok["experts"][li], tok["gates"][li]))
        assert f"layer {layer}: {pairs}" in detail
    # tap (click) another: the same, for that token
    page.click(".tok >> nth=5")
    assert page.inner_text("#detail").startswith(f"token 5: id {ref['tokens'][5]['id']}")
    assert page.is_hidden("#tasks-view")  # no tasks, no task view


@pytest.fixture(scope="module")
def task_server(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny-moe", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, expert_ffn_dim=64,
                                  max_seq_len=128, tasks=["plays", "code"], task_routing="task")
    s = _serve(moekit.save(Transformer(cfg), load_tokenizer(), tmp_path_factory.mktemp("tasks") / "ckpt"))
    yield s
    assert s.stop()


def test_a_task_routed_model_shows_which_experts_each_task_uses(open_page, task_server):
    w = open_page(task_server)
    page = w.page
    page.wait_for_function("() => document.getElementById('status').textContent.includes('experts')")
    assert page.is_visible("#task-label") and page.is_visible("#tasks-view")
    assert page.eval_on_selector_all("#task option", "os => os.map(o => o.value)") == ["plays", "code"]
    page.fill("#prompt", TEXT)
    page.click("#route-prompt")
    page.wait_for_selector(".tok")
    page.click("#route-tasks")
    page.wait_for_function("() => [...document.querySelectorAll('#task-table .cell')].some(c => Number(c.dataset.share) > 0)")
    info = json.loads(task_server.raw("GET", "/v1/moekit/info")[1])
    for li in range(2):
        page.select_option("#layer", str(li))
        cells = page.eval_on_selector_all("#task-table .cell", """cs => cs.map(c => ({task: c.dataset.task,
            expert: Number(c.dataset.expert), own: c.classList.contains('own'), share: Number(c.dataset.share)}))""")
        for task in ("plays", "code"):
            mine = [c for c in cells if c["task"] == task]
            assert [c["expert"] for c in mine if c["own"]] == info["task_experts"][task]
            assert all(c["share"] == 0 for c in mine if not c["own"])  # its tokens never leave its experts
            ref = _route(task_server, TEXT, task=task)["load"][li]
            assert [c["share"] for c in mine] == pytest.approx([n / sum(ref) for n in ref], abs=1e-4)
    w.shot("-tasks")


# --------------------------------------------------------------------------- API key
def test_with_an_api_key_the_page_says_so_then_works_once_it_is_entered(stop_later, open_page, tmp_path):
    server = _serve(tiny_ckpt(tmp_path / "ckpt"), api_key=KEY)
    stop_later(server)
    w = open_page(server)
    page = w.page
    page.wait_for_function("() => document.getElementById('status').textContent.includes('API key')")
    assert "needs an API key" in page.inner_text("#status")
    page.fill("#prompt", "Hi")
    page.click("#send")
    page.wait_for_selector(".msg.error")
    assert "API key" in page.inner_text(".msg.error")
    w.shot("-no-key")
    w.errors.clear()  # the browser logs each 401 response as a console error: expected here
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('experts')")
    page.fill("#max-tokens", "6")
    page.fill("#prompt", "Hi again")
    page.click("#send")
    page.wait_for_function("() => !document.getElementById('send').disabled && "
                           "document.querySelectorAll('.msg.assistant').length === 2")
    assert page.query_selector_all(".msg.error") and len(page.query_selector_all(".msg.error")) == 1
    page.fill("#prompt", TEXT)
    page.click("#route-prompt")
    page.wait_for_selector(".tok")
    # the key stays in this tab's session only: never in localStorage, and a new session starts without it
    assert page.evaluate("sessionStorage.getItem('moekit-api-key')") == KEY
    assert page.evaluate("localStorage.length") == 0
    fresh = open_page(server)
    assert fresh.page.input_value("#api-key") == ""
    fresh.page.wait_for_function("() => document.getElementById('status').textContent.includes('API key')")
    fresh.errors.clear()


# --------------------------------------------------------------------------- dashboard
def _points(page, canvas):
    return int(page.get_attribute(f"#{canvas}", "data-points") or 0)


def test_the_dashboard_of_a_run_still_training_grows(stop_later, open_page, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    trainer = subprocess.Popen([sys.executable, "-m", "moekit", "train", "--preset", "tiny-moe", "--out", str(run),
                                "--max-steps", "100000", "--batch-size", "2", "--seq-len", "32", "--log-every", "5",
                                "--eval-every", "20", "--eval-batches", "1", "--save-every", "100000",
                                "--threads", "1", "--quiet"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 1):
            assert trainer.poll() is None, trainer.stderr.read()
            assert time.monotonic() < deadline, "the training run wrote no metrics in 2 minutes"
            time.sleep(0.2)
        server = InProcessServer(create_dashboard_app(run))
        stop_later(server)
        w = open_page(server)
        page = w.page
        page.wait_for_function("() => Number(document.getElementById('train_loss').dataset.points || 0) > 0")
        first = _points(page, "train_loss")
        w.shot("-first")
        page.wait_for_function(f"() => Number(document.getElementById('train_loss').dataset.points) > {first}",
                               timeout=90_000)  # the page polls every 2 s; the run logs every 5 steps
        page.wait_for_function("() => Number(document.getElementById('val_loss').dataset.points || 0) > 0", timeout=90_000)
        assert trainer.poll() is None  # still training: these points arrived live
        for canvas in ("aux_loss", "lr", "tokens_per_s", "expert_load"):
            page.wait_for_function(f"() => Number(document.getElementById('{canvas}').dataset.points || 0) > 0")
        assert page.inner_text("#legend") == "run"
        w.shot("-grown")
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(30)


def test_the_dashboard_of_a_compare_directory_shows_every_model_and_seed(stop_later, open_page, tmp_path):
    root = tmp_path / "compare"
    names = ["dense-s0", "dense-s1", "moe-sigmoid_bias-s0", "moe-sigmoid_bias-s1"]
    for i, name in enumerate(names):
        (root / name).mkdir(parents=True)
        moe = name.startswith("moe")
        lines = []
        for step in range(1, 11):
            rec = {"step": step * 10, "tokens": step * 1000, "train_loss": 5.0 - 0.2 * step - 0.01 * i, "lr": 3e-3,
                   "elapsed_s": step * 0.5}
            if moe:
                rec |= {"aux_loss": 0.01, "expert_load": [[0.25, 0.25, 0.3, 0.2], [0.1, 0.4, 0.25, 0.25]]}
            lines.append(json.dumps(rec))
            if step % 5 == 0:
                lines.append(json.dumps({"step": step * 10, "tokens": step * 1000, "val_loss": 5.1 - 0.2 * step}))
        (root / name / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (root / "report.md").write_text("# report\n")
    server = InProcessServer(create_dashboard_app(root))
    stop_later(server)
    w = open_page(server)
    page = w.page
    page.wait_for_function("() => document.querySelectorAll('#legend [data-run]').length === 4")
    assert page.eval_on_selector_all("#legend [data-run]", "ss => ss.map(s => s.dataset.run)") == names
    page.wait_for_function("() => document.getElementById('val_loss').dataset.lines.split('|').length === 4")
    assert page.get_attribute("#val_loss", "data-lines").split("|") == names
    assert _points(page, "train_loss") == 40 and _points(page, "val_loss") == 8
    assert page.get_attribute("#aux_loss", "data-lines").split("|") == names[2:]  # dense runs have none
    # expert load: the first run that has it, per layer, one line per expert
    assert page.input_value("#load-run") == "moe-sigmoid_bias-s0"
    assert _points(page, "expert_load") == 4 * 10
    page.select_option("#load-layer", "1")
    assert page.get_attribute("#expert_load", "data-lines") == "expert 0|expert 1|expert 2|expert 3"
    w.shot("-compare")
