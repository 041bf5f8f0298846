"""Batch scoring survives bad requests: schema errors name the field, request files are read
carefully, local paths are refused for untrusted requests without revealing whether they exist,
image URLs are fetched with a timeout, a size cap and a content-type check, and the command line
says (exit 1) when every row failed."""
from __future__ import annotations

import base64
import io
import json
import socket
import string
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipscope.cli import main
from clipscope.model import ZeroShotResult
from clipscope.scoring import ParsedRequest, RequestError, is_public_address, parse_request, score

from .conftest import make_images

IMAGE = make_images(1, seed=3)[0]


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


PNG = _png(IMAGE)
B64 = base64.b64encode(PNG).decode()


def _request(*cells: str, labels: str = "cat, dog") -> dict:
    """A request whose first row carries ``labels``; one row per image cell."""
    rows = [[cells[0], labels]] + [[cell] for cell in cells[1:]]
    return {"input_data": {"columns": ["image", "text"], "data": rows}}


class FakeModel:
    """Stands in for a ClipModel: uniform probabilities; remembers the images it was given."""

    def __init__(self):
        self.seen = []

    def zero_shot(self, images, classes, *, batch_size=64, progress=None) -> ZeroShotResult:
        self.seen.extend(images)
        n, k = len(images), len(classes)
        return ZeroShotResult(torch.full((n, k), 1.0 / k), list(classes), (), list(range(n)), [])


# -- the request's shape --------------------------------------------------------------------

def _body(**input_data) -> dict:
    return {"input_data": {"columns": ["image", "text"], **input_data}}


@pytest.mark.parametrize("request_body,message", [
    (_body(data=[[B64, "cat"], [B64], [B64], [5]]), "input_data.data[3][0]: Input should be a valid string (got 5)"),
    (_body(data=[[B64, "cat"], [None]]), "input_data.data[1][0]: Input should be a valid string (got None)"),
    (_body(data=[[B64, "cat"], [B64], {"image": B64}]), "input_data.data[2]: Input should be a valid list"),
    (_body(data="abc"), "input_data.data: Input should be a valid list (got 'abc')"),
    ({"input_data": {"columns": ["image", "caption"], "data": [[B64, "cat"]]}},
     "input_data.columns[1]: Input should be 'image' or 'text' (got 'caption')"),
    ({"input_data": {"columns": ["text"], "data": [["cat"]]}}, "input_data.columns: must include 'image'"),
    ({"input_data": {"columns": ["image", "image"], "data": [[B64, B64]]}},
     "input_data.columns: each column may appear once"),
    ({"inputs": {}, "input_data": {"data": [[B64, "cat"]]}}, "inputs: unknown field (valid fields: input_data)"),
    (_body(data=[[B64, "cat"]], params={}), "input_data.params: unknown field (valid fields: columns, index, data)"),
    ({}, "input_data: missing required field"),
    (_body(), "input_data.data: missing required field"),
    (_body(data=[[B64, "cat"], [B64]], index=[0]), "input_data.index: has 1 entries but input_data.data has 2 rows"),
    (_body(data=[[B64, "cat"], [B64, "dog", "extra"]]), "input_data.data[1]: the row has 3 cells but columns"),
    (_body(data=[[B64, "cat, dog, cat"]]), "input_data.data[0][1]: each label may appear once; repeated: ['cat']"),
    (_body(data=[[B64, " , ,"]]), "input_data.data[0]: the first row must carry the labels"),
    ([1, 2], "request: the request must be a JSON object with an 'input_data' key (got [1, 2])"),
])
def test_schema_errors_name_the_bad_field(request_body, message):
    with pytest.raises(RequestError) as info:
        parse_request(request_body)
    assert message in str(info.value)


def test_many_schema_errors_are_listed_up_to_a_limit_and_counted():
    with pytest.raises(RequestError) as info:
        parse_request(_body(data=[[B64, "cat"]] + [[i] for i in range(8)]))
    text = str(info.value)
    assert "input_data.data[1][0]" in text and "input_data.data[5][0]" in text
    assert "input_data.data[6][0]" not in text and "and 3 more problem(s)" in text


def test_a_deeply_nested_value_is_a_schema_error_not_a_recursion_error():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(RequestError, match=r"input_data\.data\[0\]\[0\]: Input should be a valid string"):
        parse_request(_body(data=[[deep, "cat"]]))


def test_a_valid_request_parses_into_labels_and_image_cells():
    parsed = parse_request({"input_data": {"columns": ["text", "image"], "index": ["a", "b", "c"],
                                           "data": [[" cat ,dog,, red square", "IMG0"], ["", "IMG1"], ["x"]]}})
    assert parsed == ParsedRequest(["cat", "dog", "red square"], ["IMG0", "IMG1", None])


# -- where the request comes from ----------------------------------------------------------

def test_a_missing_request_file_says_so(tmp_path):
    for missing in (tmp_path / "nope.json", tmp_path / "sub" / "request"):
        with pytest.raises(RequestError) as info:
            parse_request(str(missing))
        assert str(info.value) == f"request file not found: {missing}"
    with pytest.raises(RequestError, match="request file not found: nope.json"):
        parse_request("nope.json")
    with pytest.raises(RequestError) as info:
        parse_request(tmp_path / "as-path-object")
    assert str(info.value) == f"request file not found: {tmp_path / 'as-path-object'}"


def test_text_that_is_neither_json_nor_a_path_is_invalid_json():
    with pytest.raises(RequestError, match="request is not valid JSON"):
        parse_request("nope")


def test_a_folder_is_not_a_request_file(tmp_path):
    with pytest.raises(RequestError, match="request path is a folder, not a JSON file"):
        parse_request(str(tmp_path))


def test_a_request_file_that_is_not_utf8_is_a_request_error(tmp_path):
    path = tmp_path / "latin1.json"
    raw = b'{"input_data": {"data": [["\xff", "caf\xe9"]]}}'
    path.write_bytes(raw)
    with pytest.raises(RequestError) as info:
        parse_request(str(path))
    assert str(info.value) == f"request file {path} is not UTF-8 text (byte 0xff at offset {raw.index(0xff)})"


def test_a_utf8_file_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(_request(B64)).encode())
    assert parse_request(path).labels == ["cat", "dog"]


@pytest.mark.parametrize("as_file", [False, True])
def test_deeply_nested_json_is_a_request_error(tmp_path, as_file):
    text = "[" * 100_000 + "]" * 100_000
    source = text
    if as_file:
        source = tmp_path / "deep.json"
        source.write_text(text)
    with pytest.raises(RequestError, match="request is not valid JSON \\(nested too deeply to parse\\)"):
        parse_request(source)


# -- local files are a trust decision -------------------------------------------------------

def test_trusted_requests_read_local_files(tmp_path):
    path = tmp_path / "there.png"
    IMAGE.save(path)
    model = FakeModel()
    results = score(_request(B64, str(path)), model)
    assert [r.get("error") for r in results] == [None, None]
    assert model.seen[1].tobytes() == IMAGE.tobytes()


def test_untrusted_requests_refuse_paths_with_one_message_whether_or_not_they_exist(tmp_path):
    existing, missing = tmp_path / "there.png", tmp_path / "not-there.png"
    IMAGE.save(existing)
    model = FakeModel()
    errors = [score(_request(B64, str(path)), model, allow_local_files=False)[1]["error"]
              for path in (existing, missing)]
    assert errors[0] == errors[1]
    assert errors[0] == ("row 1: not valid base64, and local file paths are not allowed in an untrusted request "
                         "(send the image as base64, a data: URI or an http(s) URL)")
    assert len(model.seen) == 2  # only the base64 rows were scored


def test_untrusted_requests_still_take_base64_and_data_uris():
    results = score(_request(B64, "data:image/png;base64," + B64), FakeModel(), allow_local_files=False)
    assert [r.get("error") for r in results] == [None, None]


@pytest.mark.parametrize("trusted", [True, False])
@pytest.mark.parametrize("url,scheme", [("file:///etc/hostname", "file"), ("ftp://example.com/cat.png", "ftp"),
                                        ("FILE:///etc/hostname", "file")])
def test_non_http_urls_are_refused(url, scheme, trusted):
    result = score(_request(B64, url), FakeModel(), allow_local_files=trusted)[1]
    assert result["probs"] is None
    assert result["error"] == f"row 1: URL scheme {scheme!r} is not supported; image URLs must be http or https"


@pytest.mark.parametrize("option,value", [("batch_size", 0), ("url_timeout", 0), ("url_timeout", float("nan")),
                                          ("max_url_bytes", -1), ("allow_local_files", "no")])
def test_bad_options_name_the_parameter(option, value):
    with pytest.raises(ValueError, match=f"{option}="):
        score(_request(B64), FakeModel(), **{option: value})


# -- image URLs -----------------------------------------------------------------------------

@pytest.fixture
def image_server(monkeypatch):
    """A loopback HTTP server with one route per behaviour; ``url(path)`` gives its address."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, body: bytes, content_type: str | None, length: bool = True) -> None:
            self.send_response(200)
            if content_type:
                self.send_header("Content-Type", content_type)
            if length:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def redirect(self, location: str) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self):
            routes = {
                "/cat.png": lambda: self.reply(PNG, "image/png"),
                "/cat-undeclared.png": lambda: self.reply(PNG, "image/png", length=False),
                "/page.html": lambda: self.reply(PNG, "text/html; charset=utf-8"),
                "/untyped": lambda: self.reply(PNG, None),
                "/to-cat": lambda: self.redirect("/cat.png"),
                "/to-file": lambda: self.redirect("file:///etc/hostname"),
                "/to-ftp": lambda: self.redirect("ftp://127.0.0.1/cat.png"),
                "/slow.png": self.slow,
                "/drip.png": self.drip,
            }
            route = routes.get(self.path)
            if route is None:
                self.send_error(404)
            else:
                route()

        def slow(self) -> None:  # answers only after the test is over (or a minute)
            release.wait(60)
            self.reply(PNG, "image/png")

        def drip(self) -> None:  # headers at once, then a trickle of the body, 20 bytes a second
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            for i in range(40):
                self.wfile.write(PNG[i:i + 1])
                self.wfile.flush()
                if release.wait(0.05):
                    return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    yield SimpleNamespace(url=lambda path: f"http://127.0.0.1:{port}{path}")
    release.set()
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def closed_port() -> int:
    """A loopback port where nothing listens."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


@pytest.mark.slow
def test_an_image_url_scores_like_the_same_image_as_base64(organism, image_server):
    results = score(_request(B64, image_server.url("/cat.png"), image_server.url("/to-cat")), organism)
    assert [r.get("error") for r in results] == [None, None, None]
    assert torch.allclose(torch.tensor(results[1]["probs"]), torch.tensor(results[0]["probs"]), atol=1e-6)
    assert torch.allclose(torch.tensor(results[2]["probs"]), torch.tensor(results[0]["probs"]), atol=1e-6)


def test_a_url_that_is_not_an_image_is_a_row_error(image_server):
    url = image_server.url("/page.html")
    result = score(_request(B64, url), FakeModel())[1]
    assert result["probs"] is None
    assert result["error"] == f"row 1: URL {url} is not an image: content type 'text/html', expected image/*"


def test_a_url_without_a_content_type_is_a_row_error(image_server):
    url = image_server.url("/untyped")
    result = score(_request(B64, url), FakeModel())[1]
    assert result["error"] == f"row 1: URL {url} is not an image: content type None, expected image/*"


@pytest.mark.parametrize("path", ["/cat.png", "/cat-undeclared.png"])
def test_a_url_larger_than_the_cap_is_a_row_error(image_server, path):
    url = image_server.url(path)
    model = FakeModel()
    results = score(_request(B64, url), model, max_url_bytes=len(PNG) - 1)
    assert results[0].get("error") is None
    assert results[1]["probs"] is None
    assert results[1]["error"].startswith(f"row 1: URL {url} is larger than the cap of {len(PNG) - 1} bytes")
    # the same URL under a cap it fits is fetched
    assert score(_request(B64, url), model, max_url_bytes=len(PNG))[1].get("error") is None


def test_a_url_that_does_not_answer_in_time_is_a_row_error(image_server):
    url = image_server.url("/slow.png")
    result = score(_request(B64, url), FakeModel(), url_timeout=0.5)[1]
    assert result["probs"] is None
    assert result["error"] == f"row 1: cannot fetch URL {url}: URLs need network access (timed out)"


def test_a_url_whose_body_trickles_past_the_timeout_is_a_row_error(image_server):
    url = image_server.url("/drip.png")
    result = score(_request(B64, url), FakeModel(), url_timeout=0.5)[1]
    assert result["error"] == (f"row 1: cannot fetch URL {url}: URLs need network access "
                               "(timed out: the response took longer than 0.5 s)")


@pytest.mark.parametrize("path,target", [("/to-file", "file:///etc/hostname"), ("/to-ftp", "ftp://127.0.0.1/cat.png")])
def test_a_redirect_to_a_non_http_url_is_refused(image_server, path, target):
    url = image_server.url(path)
    result = score(_request(B64, url), FakeModel())[1]   # trusted: an untrusted one may not reach loopback at all
    assert result["probs"] is None
    assert result["error"] == (f"row 1: cannot fetch URL {url}: HTTP 302 Found - Redirection to url {target!r} "
                               "is not allowed")


def test_a_missing_url_is_a_row_error_with_the_http_status(image_server):
    url = image_server.url("/nothing-here.png")
    result = score(_request(B64, url), FakeModel())[1]
    assert result["error"] == f"row 1: cannot fetch URL {url}: HTTP 404 Not Found"


def test_a_url_on_a_closed_port_is_a_row_error(closed_port):
    url = f"http://127.0.0.1:{closed_port}/cat.png"
    model = FakeModel()
    results = score(_request(B64, url), model)
    assert results[0].get("error") is None and len(model.seen) == 1
    assert results[1]["probs"] is None
    assert results[1]["error"].startswith(f"row 1: cannot fetch URL {url}: URLs need network access (")
    assert "refused" in results[1]["error"].lower()


# -- the command line -----------------------------------------------------------------------

def test_the_cli_exits_1_when_every_row_failed(tmp_path, capsys):
    req, out = tmp_path / "req.json", tmp_path / "out.json"
    req.write_text(json.dumps(_request("%%% not base64 %%%", str(tmp_path / "missing.png"))))
    assert main(["score", str(req), "-o", str(out)]) == 1
    captured = capsys.readouterr()
    assert "clipscope: error: every row failed (2 of 2 row(s)); first: row 0: " in captured.err
    assert [r["probs"] for r in json.loads(out.read_text())] == [None, None]


def test_the_cli_untrusted_flag_refuses_local_files(tmp_path, capsys):
    image, req = tmp_path / "there.png", tmp_path / "req.json"
    IMAGE.save(image)
    req.write_text(json.dumps(_request(str(image))))
    assert main(["score", str(req)]) == 0
    capsys.readouterr()
    assert main(["score", str(req), "--untrusted"]) == 1
    captured = capsys.readouterr()
    assert "every row failed (1 of 1 row(s))" in captured.err and "untrusted request" in captured.err
    assert json.loads(captured.out)[0]["probs"] is None


def test_the_cli_reports_a_missing_request_file_in_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert main(["score", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"clipscope: error: request file not found: {missing}\n"


def test_the_score_help_documents_the_exit_status_and_every_option(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit) as info:
        main(["score", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "Exit status: 0 when at least one row was scored" in text and "1 when every row failed" in text
    for described in ("path to the request JSON file", "write the response JSON here", "images per forward pass",
                      "refuse local file paths", "seconds allowed for fetching one image URL",
                      "largest image fetched from a URL, in bytes", "model name:", "open_clip pretrained tag",
                      "cuda, mps, cpu or auto"):
        assert described in text


# -- properties of the parser ---------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)
cells = st.sampled_from([B64, "IMG", "", "cat, dog", "/no/such.png"]) | json_values
near_valid = st.fixed_dictionaries({"input_data": st.fixed_dictionaries({}, optional={
    "columns": st.lists(st.sampled_from(["image", "text", "caption"]), max_size=3) | json_values,
    "index": st.lists(st.integers(), max_size=4) | json_values,
    "data": st.lists(st.lists(cells, max_size=3) | json_values, max_size=4) | json_values,
    "extra": json_values,
})})


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(json_values, near_valid))
def test_any_json_value_parses_or_raises_a_request_error(value):
    for source in (value, json.dumps(value)):
        try:
            parsed = parse_request(source)
        except RequestError:
            continue
        assert parsed.labels and len(parsed.images) == len(value["input_data"]["data"])


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_text_parses_or_raises_a_request_error(text):
    try:
        parse_request(text)
    except RequestError:
        pass


label_text = st.text(alphabet=string.ascii_letters + string.digits + " -'", min_size=1, max_size=12) \
    .map(str.strip).filter(bool)


@settings(max_examples=40, deadline=None)
@given(labels=st.lists(label_text, min_size=1, max_size=5, unique=True),
       good=st.lists(st.booleans(), min_size=1, max_size=6),
       spacing=st.sampled_from([",", ", ", " , ", ",  "]))
def test_valid_requests_round_trip(labels, good, spacing):
    cells = [B64 if ok else "%%% not base64 %%%" for ok in good]
    request = _request(*cells, labels=spacing.join(labels))
    results = score(json.dumps(request), FakeModel(), allow_local_files=False)
    assert len(results) == len(good)
    for i, (ok, result) in enumerate(zip(good, results)):
        assert result["labels"] == labels
        if ok:
            assert "error" not in result and len(result["probs"]) == len(labels)
            assert sum(result["probs"]) == pytest.approx(1)
        else:
            assert result["probs"] is None and result["error"].startswith(f"row {i}: ")


@pytest.mark.parametrize("url", ["http://[::1", "http://exa mple.com/a.png", "http://:80/", "https://\u2603:99999/x"])
def test_a_malformed_url_is_a_row_error_and_the_other_rows_are_scored(url):
    results = score(_request(B64, url), FakeModel())
    assert results[0].get("error") is None
    assert results[1]["probs"] is None and results[1]["error"].startswith(f"row 1: cannot fetch URL {url}")


def test_untrusted_requests_refuse_urls_of_hosts_that_are_not_public(image_server):
    url = image_server.url("/cat.png")
    assert score(_request(B64, url), FakeModel())[1].get("error") is None   # trusted: the loopback host is fine
    result = score(_request(B64, url), FakeModel(), allow_local_files=False)[1]
    assert result["probs"] is None
    assert "is not a public address (127.0.0.1)" in result["error"]


@pytest.mark.parametrize("address, public", [
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("::1", False), ("fe80::1%eth0", False),
    ("::ffff:127.0.0.1", False), ("224.0.0.1", False), ("0.0.0.0", False),
    ("8.8.8.8", True), ("2001:4860:4860::8888", True), ("::ffff:8.8.8.8", True)])
def test_public_addresses_are_told_from_internal_ones(address, public):
    assert is_public_address(address) is public
