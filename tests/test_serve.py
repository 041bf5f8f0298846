"""``clipscope serve`` and the endpoint backend together, on the loopback interface: an audit and a
typographic attack run through HTTP give the figures of the in-process run (the known answer is the
in-process computation itself: same predictions and metrics exactly, probabilities equal up to float
rounding), and the server batches concurrent requests, never reads local paths (nor a path given as the
whole body), refuses requests over its limits (413) or beyond its requests in flight (503, which the client
retries), keys its embedding cache by the model id and checks the key when told to.
"""
from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml

import clipscope
from clipscope.audit import run_audit
from clipscope.endpoint import EndpointAuthError, load_endpoint
from clipscope.cli import build_parser, main
from clipscope.organism import SHAPES
from clipscope.organism.scenes import object_scene
from clipscope.serve import ServerThread, ZeroShotServer, serve
from clipscope.typographic import Attack, PromptDefence, TextStyle, evaluate, sweep

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = Path(clipscope.__file__).parent / "audit" / "specs" / "organism_planted_bias.yaml"
#: Probabilities travel as JSON numbers: float32 -> float64 text -> float32 is exact, so only a different
#: batching of the forward pass on the server could move them; measured 0.0 difference (2026-12-01), and
#: 1e-6 leaves room for batch-size-dependent kernels on other machines.
PROB_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def server(organism):
    with ServerThread(organism) as running:
        yield running


@pytest.fixture(scope="module")
def scenes():
    out = [object_scene(shape=SHAPES[i % len(SHAPES)], seed=7_000_000 + i) for i in range(24)]
    return [s.image for s in out], [s.meta["shape"] for s in out]


def _png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _post(url: str, payload, **kwargs) -> httpx.Response:
    body = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    return httpx.post(url, content=body, headers={"Content-Type": "application/json", **kwargs}, timeout=30)


@pytest.mark.slow
def test_an_audit_through_the_endpoint_equals_the_in_process_audit(organism, server, tmp_path):
    spec = yaml.safe_load(SPEC.read_text())
    spec["data"]["n"] = 90
    spec["bootstrap"]["n"] = 200
    spec["batch_size"] = 32
    local = run_audit(spec, models=[organism], cache_dir=tmp_path / "embeddings", write=False, progress=False)
    spec["models"] = [{"name": "endpoint:" + server.url, "endpoint": {"cache_dir": str(tmp_path / "answers")}}]
    spec["output"] = str(tmp_path / "report")
    path = tmp_path / "endpoint_audit.yaml"
    path.write_text(yaml.safe_dump(spec))
    before, embedded = server.server.stats["rows"], server.server.stats["embedded"]
    with pytest.warns(UserWarning, match="retrieval metrics need image and text embeddings"):
        remote = run_audit(path, write=False, progress=False)
    assert server.server.stats["rows"] - before == 90 * 2  # every figure, once per taxonomy ...
    assert server.server.stats["embedded"] - embedded == 90  # ... through the image tower once
    for table in ("groups", "summary", "changes", "class_shares", "label_issues"):
        ours, theirs = getattr(local, table), getattr(remote, table)
        assert set(theirs["model"]) <= {"endpoint:" + server.url}
        pd.testing.assert_frame_equal(ours.drop(columns="model"), theirs.drop(columns="model"), check_exact=True)
    pd.testing.assert_frame_equal(local.predictions, remote.predictions)
    assert len(local.retrieval) and remote.retrieval.empty  # retrieval needs embeddings
    # the planted disparity is found through HTTP too: group B is called "thief" most often (measured on these
    # 90 figures, 2026-12-01: A 0.00, B 0.27, C 0.07)
    rates = remote.rates("harm:crime", "group", taxonomy="roles+thief").set_index("group")["rate"]
    assert rates.idxmax() == "B"
    # `clipscope audit` on the same spec: every answer comes from the cache, nothing is sent again
    assert main(["audit", str(path), "--out", str(tmp_path / "cli")]) == 0
    assert server.server.stats["rows"] - before == 90 * 2
    assert (tmp_path / "cli" / "report.html").is_file()


@pytest.mark.slow
def test_a_typographic_attack_and_sweep_through_the_endpoint_equal_the_in_process_run(organism, server, scenes,
                                                                                        tmp_path):
    images, labels = scenes
    endpoint = load_endpoint(server.url, cache_dir=tmp_path)
    attack = Attack.untargeted(TextStyle(size=0.25, padding=0.1), "center")
    for defence in (None, PromptDefence()):
        ours = evaluate(organism, images, labels, SHAPES, attack, defence=defence, progress=False)
        theirs = evaluate(endpoint, images, labels, SHAPES, attack, defence=defence, progress=False)
        text = ["key", "label", "text", "clean_prediction", "attacked_prediction"]
        pd.testing.assert_frame_equal(ours.frame[text], theirs.frame[text])
        numbers = [c for c in ours.frame.columns if c not in text]
        np.testing.assert_allclose(ours.frame[numbers].to_numpy(float), theirs.frame[numbers].to_numpy(float),
                                   atol=PROB_TOLERANCE, rtol=0)
        exact = {k: v for k, v in ours.metrics.items() if k != "mean_target_probability"}
        assert {k: theirs.metrics[k] for k in exact} == exact
        assert theirs.metrics["mean_target_probability"] == pytest.approx(ours.metrics["mean_target_probability"],
                                                                          abs=PROB_TOLERANCE)
    ours = sweep(organism, images, labels, SHAPES, attack, {"size": [0.14, 0.25]}, progress=False)
    theirs = sweep(endpoint, images, labels, SHAPES, attack, {"size": [0.14, 0.25]}, progress=False)
    pd.testing.assert_frame_equal(ours.frame, theirs.frame, atol=PROB_TOLERANCE, rtol=0)
    # the organism reads the written word: measured success 0.17 at size 0.14 and 0.58 at 0.25 on these 24 scenes
    # (2026-12-01; tests/test_typographic_organism.py: 0.52-0.57 at 0.25 on blocks of 180)
    assert ours.frame["attack_success_rate"].iloc[-1] > 0.3


def test_the_server_never_reads_local_paths_and_refuses_malformed_requests(server, tmp_path):
    secret = tmp_path / "secret.png"
    object_scene(shape="star", seed=1).image.save(secret)
    rows = _post(server.url, {"input_data": {"columns": ["image", "text"], "data": [[str(secret), "star, circle"]]}})
    assert rows.status_code == 200
    assert rows.json()[0]["probs"] is None and "local file paths are not allowed" in rows.json()[0]["error"]
    bad = _post(server.url, {"input_data": {"data": [[5, "a, b"]]}})
    assert bad.status_code == 400 and "input_data.data[0][0]" in bad.json()["error"]
    assert _post(server.url, b"{not json").status_code == 400
    assert httpx.get(server.url.replace("/score", "/health")).json()["status"] == "ok"


def test_the_server_refuses_requests_above_its_limits_before_decoding_or_scoring(organism):
    from starlette.testclient import TestClient
    server = ZeroShotServer(organism, max_request_bytes=20_000, max_rows=3, max_labels=3, max_label_chars=10,
                            max_url_rows=1)
    cell = _png_b64(object_scene(shape="star", seed=2).image)
    cases = [([[cell, "star, circle"]] + [[cell]] * 3, "4 rows; this server takes at most 3"),
             ([[cell, "a, b, c, d"]], "4 labels; this server takes at most 3"),
             ([[cell, "star, " + "x" * 11]], "11 characters in its longest label; this server takes at most 10"),
             ([["https://example.com/a.png", "a, b"], ["https://example.com/b.png"]], "2 rows with an image URL")]
    with TestClient(server.app) as client:
        for rows, message in cases:
            answer = client.post("/score", json={"input_data": {"data": rows}})
            assert answer.status_code == 413 and message in answer.json()["error"]
        too_big = client.post("/score", json={"input_data": {"data": [["A" * 30_000, "star, circle"]]}})
        assert too_big.status_code == 413 and "20000 bytes" in too_big.json()["error"]
    assert server.stats["passes"] == server.stats["embedded"] == 0  # nothing reached the model


def test_a_busy_server_answers_503_with_retry_after(organism, scenes):
    images, _ = scenes
    with ServerThread(organism, max_in_flight=1, window_ms=300) as busy:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(_post, busy.url, {"input_data": {"data": [[_png_b64(images[0]), "star, circle"]]}})
            while not busy.server.stats["in_flight"] and not first.done():  # the first waits in the 300 ms window
                time.sleep(0.005)
            refused = _post(busy.url, {"input_data": {"data": [[_png_b64(images[1]), "star, circle"]]}})
            assert first.result().status_code == 200
    # the endpoint client waits Retry-After on a 503 and retries (tests/test_endpoint.py)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1" and busy.server.stats["busy"] == 1


def test_cached_image_embeddings_are_keyed_by_the_model_id(organism, scenes):
    from starlette.testclient import TestClient
    server = ZeroShotServer(organism)
    request = {"input_data": {"data": [[_png_b64(scenes[0][0]), ", ".join(SHAPES)]]}}
    with TestClient(server.app) as client:
        plain = client.post("/score", json=request).json()[0]["probs"]
        with organism.transform_embeddings(lambda e: e.clamp(min=0), "relu"):  # not a rotation: answers change
            flipped = client.post("/score", json=request).json()[0]["probs"]
            expected = organism.zero_shot(scenes[0][:1], SHAPES, progress=False).probs[0].numpy()
    assert server.stats["embedded"] == 2  # the cached plain embedding was not reused under the transform
    np.testing.assert_allclose(flipped, expected, atol=PROB_TOLERANCE, rtol=0)
    assert not np.allclose(plain, flipped)


def test_concurrent_requests_with_the_same_labels_share_one_model_pass(organism, scenes):
    images, _ = scenes
    with ServerThread(organism, window_ms=300) as batching:
        def one(image):
            answer = _post(batching.url, {"input_data": {"data": [[_png_b64(image), ", ".join(SHAPES)]]}})
            return answer.json()[0]["probs"]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(one, images[:6]))
        assert batching.server.stats["requests"] == 6 and batching.server.stats["passes"] <= 2
    expected = organism.zero_shot(images[:6], SHAPES, progress=False).probs.numpy()
    np.testing.assert_allclose(np.array(answers), expected, atol=PROB_TOLERANCE, rtol=0)


def test_a_server_with_a_key_refuses_requests_without_it(organism, scenes, tmp_path, monkeypatch):
    monkeypatch.setenv("SERVE_KEY", "k3y")
    monkeypatch.delenv("CLIPSCOPE_ENDPOINT_KEY", raising=False)
    with ServerThread(organism, key_env="SERVE_KEY") as keyed:
        with pytest.raises(EndpointAuthError, match="HTTP 401"):
            load_endpoint(keyed.url, cache=False).zero_shot(scenes[0][:1], SHAPES)
        monkeypatch.setenv("CLIPSCOPE_ENDPOINT_KEY", "k3y")
        assert load_endpoint(keyed.url, cache=False).zero_shot(scenes[0][:1], SHAPES).probs.shape == (1, len(SHAPES))
        # a non-ASCII header is a wrong key (401), not a server error
        answer = httpx.post(keyed.url, content=b"{}", headers={"Authorization": "Bearer k\u00e9y".encode()})
        assert answer.status_code == 401


def test_a_key_on_a_non_loopback_host_without_tls_is_warned_about(organism, monkeypatch):
    import uvicorn
    monkeypatch.setenv("SERVE_KEY", "k3y")
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.update(kwargs))
    with pytest.warns(UserWarning, match="plain http"):
        serve(organism, host="0.0.0.0", key_env="SERVE_KEY")
    serve(organism, host="0.0.0.0", key_env="SERVE_KEY", ssl_certfile="cert.pem", ssl_keyfile="key.pem")
    assert (started["ssl_certfile"], started["ssl_keyfile"]) == ("cert.pem", "key.pem")


def test_serve_binds_loopback_and_serves_the_organism_by_default():
    args = build_parser().parse_args(["serve"])
    assert (args.model, args.host) == ("organism", "127.0.0.1")


def test_the_serve_command_passes_its_options_to_the_server(monkeypatch, scenes):
    import uvicorn
    from starlette.testclient import TestClient
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.update(app=app, **kwargs))
    assert main(["serve", "--port", "8123", "--max-rows", "1"]) == 0
    assert (started["host"], started["port"]) == ("127.0.0.1", 8123)
    with TestClient(started["app"]) as client:
        cell = _png_b64(scenes[0][0])
        one = client.post("/score", json={"input_data": {"data": [[cell, "star, circle"]]}})
        two = client.post("/score", json={"input_data": {"data": [[cell, "star, circle"], [cell]]}})
    assert one.status_code == 200 and len(one.json()[0]["probs"]) == 2
    assert two.status_code == 413  # --max-rows 1


def test_a_request_body_that_is_not_a_json_object_is_refused_and_no_file_is_opened(organism, tmp_path,
                                                                                   monkeypatch):
    from starlette.testclient import TestClient
    request = tmp_path / "req.json"  # a valid request file: a server that read it would answer 200
    cell = _png_b64(object_scene(shape="star", seed=3).image)
    request.write_text(json.dumps({"input_data": {"data": [[cell, "star, circle"]]}}))
    opened = []
    real_read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: opened.append(self) or real_read_bytes(self))
    with TestClient(ZeroShotServer(organism).app) as client:
        for body in (str(request), str(tmp_path / "missing.json"), "/dev/zero"):
            answer = client.post("/score", content=json.dumps(body), headers={"Content-Type": "application/json"})
            assert answer.status_code == 400 and "a JSON object" in answer.json()["error"]
        assert client.post("/score", content=b"[1, 2]").status_code == 400
    assert opened == []
