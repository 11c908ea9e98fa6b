"""healthz, readyz, the OpenAPI document, its docs page and /metrics."""
from __future__ import annotations

import json

import pytest

from scripts.topology import free_port

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _readyz_database_connection_closed():
    """/readyz's database probe keeps its connection: closed after each test, so the test database can
    be dropped at the run's end."""
    yield
    from controlplane.views import _database_probe

    _database_probe.close()


def test_healthz(client):
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_ready_when_everything_answers(client, credentials):
    response = client.get("/readyz")
    assert response.status_code == 200, response.content
    assert response.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok", "staging": "ok",
                                                              "identity": "ok"}}


def test_readyz_keeps_its_database_connection_and_replaces_a_closed_one(client, credentials):
    """Each check connected to PostgreSQL anew (a server process started and ended every check of every
    node). The probe keeps its connection; one the server closed meanwhile is replaced within the check."""
    from django.db import connection

    from controlplane.views import _database_probe

    assert client.get("/readyz").json()["checks"]["database"] == "ok"
    first = _database_probe.backend_pid
    assert client.get("/readyz").json()["checks"]["database"] == "ok"
    assert _database_probe.backend_pid == first
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s, 5000)", [first])  # returns once it has ended
        assert cursor.fetchone()[0]
    assert client.get("/readyz").json()["checks"]["database"] == "ok"
    assert _database_probe.backend_pid not in (None, first)


def test_readyz_asks_the_queue_probe_and_opens_no_connection_of_its_own(client, credentials, monkeypatch):
    """The broker's state is what the process's queue probe last heard on the connection it keeps. Each
    check used to open a connection of its own (a TCP and AMQP handshake every check): with the app's
    broker URL pointing nowhere, that check said `unavailable` while the broker was fine."""
    from controlplane.admission import queue_probe
    from controlplane.celery import app

    assert queue_probe().first.wait(10)
    monkeypatch.setattr(app.conf, "broker_url", f"amqp://guest:guest@127.0.0.1:{free_port()}//")
    response = client.get("/readyz")
    assert response.status_code == 200, response.content
    assert response.json()["checks"]["broker"] == "ok"


def test_readyz_503_names_the_broker_when_it_is_unreachable(client, credentials, monkeypatch):
    from kombu import Connection

    from controlplane import admission

    # A probe whose broker is a port nothing listens on: the same answer as a stopped broker, without
    # stopping the shared one.
    nowhere = admission.QueueProbe(("resize",), lambda: Connection(
        f"amqp://guest:guest@127.0.0.1:{free_port()}//", connect_timeout=1), interval=0.1, stale_after=0.5)
    monkeypatch.setattr(admission, "queue_probe", lambda: nowhere)
    try:
        response = client.get("/readyz")
    finally:
        nowhere.stop()
    assert response.status_code == 503
    body = response.json()
    assert body["code"] == "not_ready" and body["checks"]["broker"].startswith("unavailable")
    assert body["checks"]["database"] == "ok"


def test_openapi_document_lists_the_endpoints(client):
    response = client.get("/v1/openapi.json")
    assert response.status_code == 200
    document = json.loads(response.content)
    assert document["openapi"].startswith("3.")
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    paths = document["paths"]
    assert {"/v1/resize", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/result"} <= set(paths)
    parameters = {p["name"]: p["schema"] for p in paths["/v1/resize"]["post"]["parameters"]}
    assert {"width", "height", "fit", "format", "quality"} <= set(parameters)
    # The ranges and defaults are in the schema, not only in descriptions.
    assert parameters["width"] == {"type": "integer", "minimum": 1, "maximum": 8192}
    assert parameters["quality"]["minimum"] == 1 and parameters["quality"]["maximum"] == 100
    assert parameters["fit"]["default"] == "inside" and parameters["enlarge"]["default"] is False
    # Every error answer is a problem document, described as one.
    problem = {"$ref": "#/components/schemas/Problem"}
    for path, method, statuses in (("/v1/resize", "post", ("400", "401", "403", "410", "422", "429", "503")),
                                   ("/v1/jobs/{job_id}", "get", ("401", "403", "404")),
                                   ("/v1/jobs/{job_id}/result", "get", ("404", "409", "410"))):
        for status in statuses:
            content = paths[path][method]["responses"][status]["content"]
            assert content == {"application/problem+json": {"schema": problem}}, (path, status)
    assert {"type", "title", "status", "detail", "code"} <= set(document["components"]["schemas"]["Problem"]["properties"])
    assert document["components"]["securitySchemes"]["staffBasic"]["scheme"] == "basic"


def test_openapi_document_names_the_answers_headers_and_every_status(client):
    """The document listed no response header (a generated client knew of no Location on a 202, nor of
    Retry-After on a 429 or 503), /v1/usage's answer had no schema and its 401, 403, 429 and 503 were not
    listed, and POST /v1/resize listed a 409 it never answers and not its 501."""
    paths = json.loads(client.get("/v1/openapi.json").content)["paths"]
    resize = paths["/v1/resize"]["post"]["responses"]
    assert {"Location", "Retry-After"} <= set(resize["202"]["headers"])
    assert {"Location", "Content-Disposition"} <= set(resize["200"]["headers"])
    for path, method in (("/v1/resize", "post"), ("/v1/usage", "get"), ("/v1/jobs/{job_id}", "get"),
                         ("/v1/jobs/{job_id}/result", "get")):
        responses = paths[path][method]["responses"]
        for status in ("429", "503"):
            assert "Retry-After" in responses[status]["headers"], (path, status)
    assert "501" in resize and "409" not in resize
    usage = paths["/v1/usage"]["get"]["responses"]
    assert {"400", "401", "403", "429", "503"} <= set(usage)
    assert usage["401"]["content"] == {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    assert usage["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Usage"}
    for path in ("/v1/jobs/{job_id}", "/v1/jobs/{job_id}/result"):  # a query parameter given: 400
        assert "400" in paths[path]["get"]["responses"]
    parameters = {p["name"]: p["schema"] for p in paths["/v1/resize"]["post"]["parameters"]}
    assert parameters["Idempotency-Key"] == {"type": "string", "minLength": 1, "maxLength": 255}


def test_docs_page(client):
    """Swagger UI comes from this server, pinned (it came from a CDN, `@latest`, needing the internet)."""
    import re

    response = client.get("/v1/docs")
    assert response.status_code == 200 and b"swagger" in response.content.lower()
    page = response.content.decode()
    assert "cdn.jsdelivr.net" not in page and "@latest" not in page
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page)
    assert any(a.endswith("swagger-ui-bundle.js") for a in assets), assets
    for asset in assets:
        fetched = client.get(asset)
        assert fetched.status_code == 200, asset


def test_metrics(client):
    client.get("/healthz")
    client.post("/v1/resize?width=10", b"x", content_type="image/jpeg")  # 401: no key
    response = client.get("/metrics")
    assert response.status_code == 200
    assert b"django_http_requests_total_by_method_total" in response.content
    # django-prometheus counts every view but the resize path, which resizer_resize_* measure.
    lines = response.content.decode().splitlines()
    by_view = [line for line in lines if line.startswith("django_http_requests_total_by_view_transport_method_total")]
    assert any('view="healthz"' in line for line in by_view), by_view
    assert not any('view="resize"' in line for line in by_view), by_view
    assert any(line.startswith("resizer_resize_requests_total") and 'code="unauthorized"' in line for line in lines)


def test_the_admin_gets_its_css_and_javascript_with_debug_off(client, settings):
    """Nothing served /static/ with DEBUG off: the admin came without its CSS and JavaScript."""
    assert not settings.DEBUG
    for path in ("/static/admin/css/base.css", "/static/admin/js/core.js"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert b"".join(response.streaming_content if response.streaming else [response.content])


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
def test_the_service_endpoints_answer_other_methods_with_a_405_problem(path):
    """They are plain Django views: a POST met Django's CSRF check first, a 403 HTML page."""
    from django.test import Client

    client = Client(enforce_csrf_checks=True)  # as a real client is checked
    for method in ("post", "put", "delete"):
        response = getattr(client, method)(path)
        assert response.status_code == 405, (method, response.status_code)
        assert response["Content-Type"] == "application/problem+json"
        assert response.json()["code"] == "method_not_allowed" and response["Allow"] == "GET, HEAD"
    assert client.head("/healthz").status_code == 200


def test_a_request_id_with_a_trailing_newline_is_replaced_not_echoed(client):
    """`^...$` matched "abc\\n" (`$` before a final newline): echoed, that is a header with a newline in
    it (found by the security review; gunicorn strips it on the wire, a WSGI server that does not would
    have a 500 or a split header)."""
    response = client.get("/healthz", HTTP_X_REQUEST_ID="abc\n")
    assert response.status_code == 200
    assert response["X-Request-Id"] != "abc\n" and len(response["X-Request-Id"]) == 32
    assert client.get("/healthz", HTTP_X_REQUEST_ID="abc").headers["X-Request-Id"] == "abc"
