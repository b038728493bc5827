"""The collector's HTTP handler on a real aiohttp server, with an in-memory committer in place of Kafka.

Kafka itself is exercised in tests/integration/test_collector*.py; here: statuses, headers, bodies,
and a property test that no request (any body, any headers) makes the handler crash or answer 500.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import zlib

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from flywheel.collector.auth import WriteKeys, source_label
from flywheel.collector.batch import KINDS
from flywheel.collector.committer import KafkaUnavailable
from flywheel.collector.server import Collector, collector_app
from flywheel.model.envelope import Limits
from flywheel.web.admin import admin_app
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

KEY = "wk-http"
AUTH = "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()


class MemoryCommitter:
    """Accepts (or, when `down`, refuses) what the handler submits."""

    def __init__(self):
        self.requests: list[tuple[list, list]] = []
        self.down = False
        self.closed = False

    async def submit(self, records, headers) -> None:
        if self.down:
            raise KafkaUnavailable("KafkaConnectionError: no broker")
        self.requests.append((list(records), headers))

    async def close(self) -> None:
        self.closed = True


class Harness:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.committer = MemoryCommitter()
        collector = Collector(keys=WriteKeys([KEY]), limits=Limits(), committer=self.committer, retry_after=7,
                              experiments={"checkout_button": {"control": 0.5, "green": 0.5}})

        async def start(app) -> TestClient:
            client = TestClient(TestServer(app))
            await client.start_server()
            return client

        async def kafka() -> str | None:  # the readiness check: down with the committer
            return "kafka: no answer from broker:9092" if self.committer.down else None

        self.client = self.loop.run_until_complete(start(collector_app(collector, kafka=kafka)))
        self.admin = self.loop.run_until_complete(start(admin_app(role="collector", checks=[kafka])))

    def post(self, path: str, data: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
        async def go():
            response = await self.client.post(
                path, data=data, headers=headers or {}, skip_auto_headers={"Content-Type"}
            )
            return response.status, dict(response.headers), await response.read()

        status, response_headers, body = self.loop.run_until_complete(go())
        return status, response_headers, orjson.loads(body) if body else {}

    def close(self):
        self.loop.run_until_complete(self.client.close())
        self.loop.run_until_complete(self.admin.close())
        self.loop.close()


@pytest.fixture(scope="module")
def http():
    harness = Harness()
    yield harness
    harness.close()


@pytest.fixture(autouse=True)
def _reset(http):
    http.committer.requests.clear()
    http.committer.down = False


def batch(n: int = 2) -> bytes:
    return orjson.dumps({"batch": [{"type": "track", "event": "E", "anonymousId": f"a{i}"} for i in range(n)],
                         "sentAt": "2026-11-21T12:00:00Z"})


def test_an_accepted_batch_is_200_success_after_the_committer_took_it(http):
    status, headers, body = http.post("/v1/batch", batch(3), {"Authorization": AUTH})
    assert (status, body) == (200, {"success": True})
    assert headers["Access-Control-Allow-Origin"] == "*"
    ((records, kafka_headers),) = http.committer.requests
    assert len(records) == 3
    assert dict(kafka_headers)["flywheel-source"] == source_label(KEY).encode()
    assert int(dict(kafka_headers)["flywheel-received-at"]) > 1_700_000_000_000
    assert orjson.loads(records[0].value)["context"]["ip"] == "127.0.0.1"


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_bodies_are_accepted(http, encoding):
    data = gzip.compress(batch()) if encoding == "gzip" else zlib.compress(batch())
    status, _, _ = http.post("/v1/batch", data, {"Authorization": AUTH, "Content-Encoding": encoding})
    assert status == 200 and len(http.committer.requests[0][0]) == 2


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "batch"])
def test_single_event_paths(http, kind):
    status, _, _ = http.post(f"/v1/{kind}", orjson.dumps({"userId": "u", "writeKey": KEY}))
    assert status == 200
    assert orjson.loads(http.committer.requests[0][0][0].value)["type"] == kind


@pytest.mark.parametrize(("data", "headers", "status", "code"), [
    (batch(), {}, 401, "unauthorized"),
    (batch(), {"Authorization": "Basic " + base64.b64encode(b"wrong:").decode()}, 401, "unauthorized"),
    (b"{", {"Authorization": AUTH}, 400, "malformed_json"),
    (b"x" * 600_000, {"Authorization": AUTH}, 400, "request_too_large"),
    (gzip.compress(b" " * 600_000), {"Authorization": AUTH, "Content-Encoding": "gzip"}, 400,
     "request_too_large"),
    (b"nope", {"Authorization": AUTH, "Content-Encoding": "gzip"}, 400, "bad_encoding"),
    (batch(), {"Authorization": AUTH, "Content-Encoding": "br"}, 415, "unsupported_encoding"),
    (orjson.dumps({"batch": [{"type": "track", "p": "x" * 40_000}]}), {"Authorization": AUTH}, 400,
     "event_too_large"),
])
def test_rejections_write_nothing_and_say_why(http, data, headers, status, code):
    got, _, body = http.post("/v1/batch", data, headers)
    assert (got, body["code"], body["success"]) == (status, code, False) and body["message"]
    assert http.committer.requests == []


def test_the_connection_survives_a_broken_gzip_body(http):
    assert http.post("/v1/batch", b"nope", {"Authorization": AUTH, "Content-Encoding": "gzip"})[0] == 400
    assert http.post("/v1/batch", batch(), {"Authorization": AUTH})[0] == 200


def test_kafka_unavailable_is_503_with_retry_after(http):
    http.committer.down = True
    status, headers, body = http.post("/v1/batch", batch(), {"Authorization": AUTH})
    assert (status, body["code"]) == (503, "kafka_unavailable") and headers["Retry-After"] == "7"


def test_live_and_ready(http):
    async def go(path):
        response = await http.client.get(path)
        return response.status, await response.json()

    assert http.loop.run_until_complete(go("/health/live")) == (200, {"status": "ok", "role": "collector"})
    assert http.loop.run_until_complete(go("/health/ready")) == (200, {"ready": True, "role": "collector",
                                                                       "reasons": []})
    http.committer.down = True  # Kafka takes no events: out of the load balancer, saying why
    status, body = http.loop.run_until_complete(go("/health/ready"))
    assert status == 503 and body["reasons"] == ["kafka: no answer from broker:9092"]
    assert http.loop.run_until_complete(go("/health"))[0] == 200  # alive all the same


def test_cors_preflight(http):
    async def go():
        response = await http.client.options("/v1/batch")
        return response.status, response.headers

    status, headers = http.loop.run_until_complete(go())
    assert status == 204 and "POST" in headers["Access-Control-Allow-Methods"]


def test_metrics_count_requests_and_rejects(http):
    http.post("/v1/track", b"{", {"Authorization": AUTH})

    async def go():
        return await (await http.admin.get("/metrics")).text(), (await http.client.get("/metrics")).status

    text, public = http.loop.run_until_complete(go())
    assert public == 404  # /metrics is on the admin listener only
    assert 'flywheel_collector_requests_total{path="track",status="400"}' in text
    assert 'flywheel_collector_rejects_total{reason="malformed_json"}' in text


# --- property: any body, any headers → a decided answer, never a 500 -------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=25,
)
events = st.dictionaries(
    st.sampled_from(["type", "event", "anonymousId", "userId", "previousId", "context", "sentAt", "messageId",
                     "properties", "integrations", "writeKey", "timestamp"]),
    json_values, max_size=8,
)
payloads = st.one_of(
    st.binary(max_size=200),
    json_values.map(orjson.dumps),
    st.builds(lambda items, extra: orjson.dumps({**extra, "batch": items}),
              st.lists(events | json_values, max_size=6), st.dictionaries(st.sampled_from(
                  ["context", "integrations", "sentAt", "writeKey"]), json_values, max_size=3)),
    events.map(orjson.dumps),
)
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(KINDS),
    payload=payloads,
    compress=st.sampled_from([None, "gzip", "deflate", "gzip-but-plain", "br"]),
    auth=st.one_of(st.just(AUTH), st.just(None), header_text.map(lambda t: "Basic " + t), header_text),
    content_type=st.sampled_from([None, "application/json", "text/plain", "multipart/form-data"]),
    down=st.booleans(),
)
def test_the_handler_never_answers_500(http, kind, payload, compress, auth, content_type, down):
    http.committer.down = down
    headers = {}
    if auth is not None:
        headers["Authorization"] = auth
    if content_type is not None:
        headers["Content-Type"] = content_type
    data = payload
    if compress == "gzip":
        data, headers["Content-Encoding"] = gzip.compress(payload), "gzip"
    elif compress == "deflate":
        data, headers["Content-Encoding"] = zlib.compress(payload), "deflate"
    elif compress == "gzip-but-plain":
        headers["Content-Encoding"] = "gzip"
    elif compress == "br":
        headers["Content-Encoding"] = "br"
    status, _, body = http.post(f"/v1/{kind}", data, headers)
    assert status in (200, 400, 401, 415, 503), (status, body)
    assert body["success"] is (status == 200)
    if status != 200:
        assert body["code"] and body["message"]


def test_assign_answers_a_users_variation_and_emits_nothing(http):
    """POST /v1/assign: the variation flywheel.experiments.assign gives (GrowthBook's hashing), with the write
    key; unknown experiments, missing ids and bad keys are refused with what to do."""
    from flywheel.experiments import assign

    body = orjson.dumps({"experiment": "checkout_button", "userId": "u-42"})
    status, headers, answer = http.post("/v1/assign", body, {"Authorization": AUTH})
    want = assign("checkout_button", "u-42", {"control": 0.5, "green": 0.5})
    assert (status, answer) == (200, {"experiment": "checkout_button", "userId": "u-42", "variation": want,
                                      "hashVersion": 2})
    assert http.committer.requests == []  # the caller logs the exposure
    anonymous = http.post("/v1/assign", orjson.dumps({"experiment": "checkout_button", "anonymousId": "a-1",
                                                      "writeKey": KEY}), {})
    assert anonymous[0] == 200 and anonymous[2]["anonymousId"] == "a-1"
    assert http.post("/v1/assign", body, {})[0] == 401
    missing = http.post("/v1/assign", orjson.dumps({"experiment": "nope", "userId": "u"}), {"Authorization": AUTH})
    assert missing[0] == 404 and "checkout_button" in missing[2]["error"]
    assert http.post("/v1/assign", orjson.dumps({"experiment": "checkout_button"}), {"Authorization": AUTH})[0] == 400
    assert http.post("/v1/assign", b"{", {"Authorization": AUTH})[0] == 400
