"""The management API (/v1/admin) and Django admin: staff or admin-scoped keys only; every write
audited and visible to the data plane."""
from __future__ import annotations

import base64
import json

import pytest
from django.contrib.auth.models import User

from identity.models import ApiKey, AuditEvent, Customer, Plan
from identity import services
from identity.services import api_key_create, customer_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff(client):
    User.objects.create_user("ops", password="pw", is_staff=True, is_superuser=True)
    token = base64.b64encode(b"ops:pw").decode()
    client.defaults["HTTP_AUTHORIZATION"] = f"Basic {token}"
    return client


def test_customer_and_key_lifecycle_as_staff(staff, credentials):
    Plan.objects.create(name="pro", rate_per_second=100, burst=200, monthly_quota=1_000_000)
    created = staff.post("/v1/admin/customers", {"name": "Acme", "plan": "pro"}, content_type="application/json")
    assert created.status_code == 201, created.content
    customer = created.json()
    assert customer["plan"] == "pro" and customer["status"] == "active"
    issued = staff.post(f"/v1/admin/customers/{customer['id']}/keys", {"name": "web", "scopes": ["resize"]},
                        content_type="application/json")
    assert issued.status_code == 201
    body = issued.json()
    assert body["key"].startswith(f"rsz_{body['prefix']}_") and body["scopes"] == ["resize"]
    listed = staff.get(f"/v1/admin/customers/{customer['id']}/keys").json()["keys"]
    assert [k["id"] for k in listed] == [body["id"]] and "key" not in listed[0]
    credentials.sync(full=False)
    assert credentials.authenticate(body["key"]).scopes == {"resize"}

    suspended = staff.patch(f"/v1/admin/customers/{customer['id']}", {"status": "suspended"},
                            content_type="application/json")
    assert suspended.json()["status"] == "suspended"
    revoked = staff.delete(f"/v1/admin/keys/{body['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    audit = staff.get(f"/v1/admin/customers/{customer['id']}/audit").json()["events"]
    assert [e["action"] for e in audit] == ["key.revoke", "customer.suspend", "key.issue", "customer.create"]
    assert {e["actor"] for e in audit} == {"staff:ops"}
    assert staff.delete(f"/v1/admin/customers/{customer['id']}").status_code == 204
    assert not Customer.objects.filter(pk=customer["id"]).exists()
    deleted = AuditEvent.objects.get(action="customer.delete", actor="staff:ops")
    # The customer's events lost their link with it: the last one says who it was and what keys it had.
    assert deleted.details == {"customer_id": customer["id"], "name": "Acme",
                               "keys": [{"key_id": body["id"], "prefix": body["prefix"], "revoked": True}]}


def test_admin_scoped_key_works_and_ordinary_keys_do_not(client, credentials):
    owner = customer_create(name="ops-bot")
    _, admin_key = api_key_create(customer=owner, scopes=["admin"])
    _, plain_key = api_key_create(customer=owner)
    credentials.sync(full=True)
    ok = client.get("/v1/admin/customers", HTTP_AUTHORIZATION=f"Bearer {admin_key}")
    assert ok.status_code == 200 and any(c["name"] == "ops-bot" for c in ok.json()["customers"])
    refused = client.get("/v1/admin/customers", HTTP_AUTHORIZATION=f"Bearer {plain_key}")
    assert refused.status_code == 403 and refused.json()["code"] == "insufficient_scope"
    created = client.post("/v1/admin/customers", {"name": "made-by-bot"}, content_type="application/json",
                          HTTP_AUTHORIZATION=f"Bearer {admin_key}")
    assert AuditEvent.objects.get(action="customer.create", customer_id=created.json()["id"]).actor.startswith("key:")


def test_non_staff_user_and_anonymous_are_refused(client, credentials):
    User.objects.create_user("someone", password="pw")
    token = base64.b64encode(b"someone:pw").decode()
    assert client.get("/v1/admin/customers", HTTP_AUTHORIZATION=f"Basic {token}").json()["code"] == "forbidden"
    assert client.get("/v1/admin/customers").status_code == 401


@pytest.mark.parametrize("path,body,code", [
    ("/v1/admin/customers", {}, "invalid_parameter"),
    ("/v1/admin/customers", {"name": "x", "plan": "no-such-plan"}, "unknown_plan"),
    ("/v1/admin/customers", {"name": "x", "status": "deleted"}, "invalid_parameter"),
    ("/v1/admin/customers", {"name": "x", "stauts": "suspended"}, "unknown_parameter"),  # was ignored: 201
    ("/v1/admin/customers", ["x"], "malformed_request"),  # was "non_field_errors: ..."
    ("/v1/admin/customers", "[" * 1000 + "]" * 1000, "malformed_request"),  # RecursionError: a 500
])
def test_bad_management_input_is_400(staff, credentials, path, body, code):
    response = staff.post(path, body if isinstance(body, str) else json.dumps(body), content_type="application/json")
    assert response.status_code == 400 and response.json()["code"] == code
    assert not Customer.objects.filter(name="x").exists()


def test_lists_say_where_the_next_page_starts_and_refuse_unknown_filters(staff, credentials, monkeypatch):
    """The customer list stopped at 1,000 and the audit trail at 200 without a word, and `?status=...`
    was ignored (every customer came back)."""
    from identity import views

    monkeypatch.setattr(views, "CUSTOMERS_PAGE", 2)
    monkeypatch.setattr(views, "AUDIT_PAGE", 2)
    made = {customer_create(name=f"page-{i}").name for i in range(5)}
    seen, url = [], "/v1/admin/customers"
    while url:
        page = staff.get(url).json()
        seen += [c["name"] for c in page["customers"]]
        url = page["next"]
    assert made <= set(seen) and len(seen) == len(set(seen))
    customer = Customer.objects.get(name="page-0")
    for _ in range(2):
        services.customer_suspend(customer=customer, actor="test")
        services.customer_activate(customer=customer, actor="test")
    events, url = [], f"/v1/admin/customers/{customer.id}/audit"
    while url:
        page = staff.get(url).json()
        events += page["events"]
        url = page["next"]
    assert len(events) == 5 and len({e["id"] for e in events}) == 5  # create + 4 changes, newest first
    assert [e["action"] for e in events][-1] == "customer.create"
    refused = staff.get("/v1/admin/customers?status=suspended").json()
    assert refused["code"] == "unknown_parameter" and refused["parameter"] == "status"
    assert staff.get("/v1/admin/customers?after=nope").json()["code"] == "invalid_parameter"
    for before in ("99999999999999999999999", "²", "-1"):  # "²".isdigit(), and int() refused it: a 500
        assert staff.get(f"/v1/admin/customers/{customer.id}/audit?before={before}").status_code == 400


def test_management_errors_say_what_is_wrong_in_a_sentence(staff, credentials):
    """A bad scope read "scopes: 0" (the item's position, not the problem); a superuser's PUT, a method
    no endpoint takes, was 403 "this staff account lacks the permission" instead of 405."""
    customer = customer_create(name="c")
    bad_scope = staff.post(f"/v1/admin/customers/{customer.id}/keys", {"scopes": ["admin", "bogus"]},
                           content_type="application/json").json()
    assert bad_scope["code"] == "invalid_parameter" and bad_scope["parameter"] == "scopes"
    assert bad_scope["detail"].startswith("scopes: item 1:") and "bogus" in bad_scope["detail"], bad_scope
    put = staff.put(f"/v1/admin/customers/{customer.id}", {"name": "d"}, content_type="application/json")
    assert put.status_code == 405 and put.json()["code"] == "method_not_allowed"


def test_unknown_customer_and_key_are_404(staff, credentials):
    assert staff.get("/v1/admin/customers/not-a-uuid").json()["code"] == "customer_not_found"
    assert staff.delete("/v1/admin/keys/00000000-0000-0000-0000-000000000000").json()["code"] == "key_not_found"
    bad_scope = staff.post(f"/v1/admin/customers/{customer_create(name='c').id}/keys", {"scopes": ["root"]},
                           content_type="application/json")
    assert bad_scope.status_code == 400


def test_django_admin_actions_go_through_the_services(client):
    admin_user = User.objects.create_superuser("root", password="pw")
    client.force_login(admin_user)
    customer = customer_create(name="in-admin")
    api_key, _ = api_key_create(customer=customer)
    response = client.post("/admin/identity/customer/", {"action": "issue_key", "_selected_action": [customer.pk]})
    # The secret is in this answer only: not in a flash message (a signed, unencrypted cookie, or the
    # session table), and not for caches.
    assert response.status_code == 200 and "no-store" in response["Cache-Control"]
    assert "rsz_" in response.content.decode() and "not shown again" in response.content.decode()
    assert "rsz_" not in "".join(morsel.value for morsel in response.cookies.values())
    assert ApiKey.objects.filter(customer=customer, name="admin-issued").count() == 1
    client.post("/admin/identity/customer/", {"action": "suspend", "_selected_action": [customer.pk]})
    client.post("/admin/identity/apikey/", {"action": "revoke", "_selected_action": [api_key.pk]})
    customer.refresh_from_db()
    assert customer.status == "suspended"
    assert ApiKey.objects.get(pk=api_key.pk).revoked_at is not None
    actions = set(AuditEvent.objects.filter(customer=customer, actor="staff:root").values_list("action", flat=True))
    assert actions == {"key.issue", "customer.suspend", "key.revoke"}
    assert client.get(f"/admin/identity/customer/{customer.pk}/change/").status_code == 200


def test_a_customer_with_billing_records_cannot_be_deleted(staff, credentials):
    from datetime import date

    from metering.models import BillingPeriod

    customer = customer_create(name="billed")
    BillingPeriod.objects.create(customer=customer, start=date(2026, 10, 1), end=date(2026, 11, 1))
    response = staff.delete(f"/v1/admin/customers/{customer.id}")
    assert response.status_code == 409 and response.json()["code"] == "customer_has_billing"
    assert Customer.objects.filter(pk=customer.pk).exists()


def test_a_customer_that_used_its_keys_recently_is_not_deleted(staff, client):
    """Deleted right after a paid resize, before the worker's spool shipped its usage record: the record
    landed for a customer that no longer existed, and billing never billed it (found by review)."""
    from datetime import timedelta

    from django.utils import timezone

    customer = customer_create(name="just-served")
    api_key, _ = api_key_create(customer=customer)
    ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=timezone.now() - timedelta(seconds=5))
    response = staff.delete(f"/v1/admin/customers/{customer.id}")
    assert response.status_code == 409 and response.json()["code"] == "customer_recently_active"
    assert "suspend it now" in response.json()["detail"]
    client.force_login(User.objects.create_superuser("root", password="pw"))
    page = client.post(f"/admin/identity/customer/{customer.pk}/delete/", {"post": "yes"})
    assert "used its API keys in the last 60 minutes" in page.content.decode()
    assert Customer.objects.filter(pk=customer.pk).exists()
    ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=timezone.now() - timedelta(hours=2))
    assert staff.delete(f"/v1/admin/customers/{customer.id}").status_code == 204


@pytest.mark.django_db(transaction=True)
def test_a_delete_sent_right_after_a_request_waits_for_its_key_use_to_reach_the_database(client, credentials):
    """A key's last use reaches the database by each API process's flush, about once a second: a delete
    sent at once after a request saw no use and went through (found by the docs review). The delete
    now waits two flush intervals before it judges."""
    import threading

    from django.db import connection

    customer = customer_create(name="at-once")
    _, key = api_key_create(customer=customer)
    _, admin_key = api_key_create(customer=customer_create(name="operator"), scopes=["admin"])
    credentials.sync(full=True)
    credentials.authenticate(key)  # a request: the use is in this process's memory only
    assert ApiKey.objects.get(customer=customer).last_used_at is None

    def flush() -> None:  # this process's next sync round
        credentials.sync(full=False)
        connection.close()

    flusher = threading.Timer(0.5, flush)
    flusher.start()
    # An admin key, not Basic auth: its password's hashing alone took longer than the flush's wait.
    response = client.delete(f"/v1/admin/customers/{customer.id}", HTTP_AUTHORIZATION=f"Bearer {admin_key}")
    flusher.join()
    assert response.status_code == 409 and response.json()["code"] == "customer_recently_active"
    assert Customer.objects.filter(pk=customer.pk).exists()


def test_customer_page_shows_recent_requests_with_their_parameters(client):
    from datetime import datetime, timezone

    from metering.models import UsageRecord

    client.force_login(User.objects.create_superuser("root", password="pw"))
    customer = customer_create(name="busy")
    UsageRecord.objects.create(id="6f1d7c0e-0000-4000-8000-000000000001", customer_id=customer.id,
                               event_time=datetime.now(timezone.utc), outcome="succeeded", input_format="jpeg",
                               input_width=1280, input_height=960, input_bytes=262144, output_format="webp",
                               output_width=256, output_height=192, output_bytes=9000,
                               params={"width": 256, "fit": "cover"})
    page = client.get(f"/admin/identity/customer/{customer.pk}/change/").content.decode()
    assert "6f1d7c0e-0000-4000-8000-000000000001" in page and "cover" in page and "webp 256x192" in page


def test_a_plan_edited_in_admin_reaches_the_data_plane_by_the_feed_and_is_audited(client, credentials):
    """A plan's limits are part of its customers' credentials: an edit must reach every API process
    by the change feed (an incremental sync), not at the next full resync minutes later."""
    client.force_login(User.objects.create_superuser("root", password="pw"))
    plan = Plan.objects.create(name="basic", rate_per_second=10, burst=20)
    customer = customer_create(name="on-basic", plan=plan)
    _, key = api_key_create(customer=customer)
    credentials.sync(full=True)
    assert credentials.authenticate(key).rate_per_second == 10
    response = client.post(f"/admin/identity/plan/{plan.pk}/change/",
                           {"name": "basic", "rate_per_second": "2", "burst": "5", "monthly_quota": "1000"})
    assert response.status_code == 302, response.content[:500]
    credentials.sync(full=False)
    principal = credentials.authenticate(key)
    assert (principal.rate_per_second, principal.burst, principal.monthly_quota) == (2, 5, 1000)
    event = AuditEvent.objects.get(action="plan.update", actor="staff:root")
    assert event.details == {"plan": "basic", "rate_per_second": 2.0, "burst": 5, "monthly_quota": 1000}


def test_saving_a_customer_in_admin_keeps_a_plan_changed_meanwhile(client, staff, credentials):
    """An operator opens a customer's page and renames it; meanwhile automation moves the customer to
    another plan through the API. The save must rename it only, not put the old plan back."""
    import re

    client.force_login(User.objects.create_superuser("root", password="pw"))
    basic = Plan.objects.create(name="basic", rate_per_second=10, burst=20)
    pro = Plan.objects.create(name="pro", rate_per_second=100, burst=200)
    customer = customer_create(name="acme", plan=basic)
    page = client.get(f"/admin/identity/customer/{customer.pk}/change/").content.decode()
    form = dict(re.findall(r'<input type="(?:hidden|text)" name="([^"]+)" value="([^"]*)"', page))
    form.update({name: value for name, value in re.findall(
        r'<select name="([^"]+)"[^>]*>.*?<option value="([^"]*)" selected', page, re.S)})
    assert staff.patch(f"/v1/admin/customers/{customer.pk}", {"plan": "pro"},
                       content_type="application/json").status_code == 200
    form["name"] = "acme-renamed"
    response = client.post(f"/admin/identity/customer/{customer.pk}/change/", form)
    assert response.status_code == 302, response.content[:1000]
    customer.refresh_from_db()
    assert (customer.name, customer.plan_id) == ("acme-renamed", pro.pk)


def test_deleting_a_plan_in_admin_is_audited(client):
    client.force_login(User.objects.create_superuser("root", password="pw"))
    plan = Plan.objects.create(name="retired", rate_per_second=1, burst=1)
    response = client.post(f"/admin/identity/plan/{plan.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302 and not Plan.objects.filter(pk=plan.pk).exists()
    event = AuditEvent.objects.get(action="plan.delete")
    assert event.actor == "staff:root" and event.details["plan"] == "retired"


def _basic(username: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:pw".encode()).decode()


def test_a_staff_user_may_do_only_what_its_permissions_allow(client, credentials):
    """The staff flag alone passed every /v1/admin call, minting admin keys included."""
    from django.contrib.auth.models import Permission

    customer = customer_create(name="c")
    clerk = User.objects.create_user("clerk", password="pw", is_staff=True)
    auth = {"HTTP_AUTHORIZATION": _basic("clerk")}
    assert client.get("/v1/admin/customers", **auth).json()["code"] == "forbidden"
    clerk.user_permissions.add(Permission.objects.get(codename="view_customer"))
    assert client.get("/v1/admin/customers", **auth).status_code == 200
    assert client.head("/v1/admin/customers", **auth).status_code == 200
    for response in (client.post("/v1/admin/customers", {"name": "x"}, content_type="application/json", **auth),
                     client.post(f"/v1/admin/customers/{customer.id}/keys", {"name": "k"},
                                 content_type="application/json", **auth),
                     client.delete(f"/v1/admin/customers/{customer.id}", **auth)):
        assert response.status_code == 403 and response.json()["code"] == "forbidden"
    clerk.user_permissions.add(Permission.objects.get(codename="add_apikey"))
    issued = client.post(f"/v1/admin/customers/{customer.id}/keys", {"name": "k"}, content_type="application/json",
                         **auth)
    assert issued.status_code == 201
    # An admin key is a superuser's (or an admin key's) to issue.
    escalated = client.post(f"/v1/admin/customers/{customer.id}/keys", {"name": "k", "scopes": ["admin"]},
                            content_type="application/json", **auth)
    assert escalated.status_code == 403 and not ApiKey.objects.filter(scopes__contains=["admin"]).exists()
    clerk.is_active = False
    clerk.save()
    assert client.get("/v1/admin/customers", **auth).status_code in (401, 403)


def test_django_admin_actions_need_their_permissions(client):
    """A view-only staff user could issue keys, suspend customers and revoke keys by posting the action."""
    from django.contrib.auth.models import Permission

    customer = customer_create(name="c")
    api_key, _ = api_key_create(customer=customer)
    viewer = User.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(*Permission.objects.filter(codename__in=["view_customer", "view_apikey"]))
    client.force_login(viewer)
    client.post("/admin/identity/customer/", {"action": "issue_key", "_selected_action": [customer.pk]})
    client.post("/admin/identity/customer/", {"action": "suspend", "_selected_action": [customer.pk]})
    client.post("/admin/identity/apikey/", {"action": "revoke", "_selected_action": [api_key.pk]})
    customer.refresh_from_db()
    assert customer.status == "active" and ApiKey.objects.filter(customer=customer).count() == 1
    assert ApiKey.objects.get(pk=api_key.pk).revoked_at is None


def test_saving_a_key_page_in_admin_cannot_undo_a_revoke(client):
    """The key page kept change permission: Save wrote the row as read, revoked_at included."""
    from identity.services import api_key_revoke

    client.force_login(User.objects.create_superuser("root", password="pw"))
    api_key, _ = api_key_create(customer=customer_create(name="c"))
    page = client.get(f"/admin/identity/apikey/{api_key.pk}/change/")
    assert page.status_code == 200 and b'name="_save"' not in page.content
    api_key_revoke(api_key=ApiKey.objects.get(pk=api_key.pk), actor="t")
    assert client.post(f"/admin/identity/apikey/{api_key.pk}/change/", {"_save": "Save"}).status_code == 403
    assert ApiKey.objects.get(pk=api_key.pk).revoked_at is not None


def test_a_customer_with_keys_can_be_deleted_in_admin(client):
    """Keys cannot be deleted one by one (revoke instead), which made Django refuse the customer's
    delete page with 403 for everyone, superusers included."""
    client.force_login(User.objects.create_superuser("root", password="pw"))
    customer = customer_create(name="leaving")
    api_key_create(customer=customer)
    response = client.post(f"/admin/identity/customer/{customer.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not Customer.objects.filter(pk=customer.pk).exists()
    assert AuditEvent.objects.filter(action="customer.delete", actor="staff:root").exists()


def test_failed_basic_logins_are_capped(client, credentials, monkeypatch):
    """Every Basic check costs a PBKDF2 of a million rounds: unlimited wrong passwords were a guessing
    oracle and a way to burn the API's CPU."""
    from identity.authentication import LoginFailures, StaffBasicAuthentication

    monkeypatch.setattr(StaffBasicAuthentication, "FAILURES_PER_MINUTE", 3)
    monkeypatch.setattr(StaffBasicAuthentication, "_failures", LoginFailures())
    monkeypatch.setattr(StaffBasicAuthentication, "_verified", {})
    User.objects.create_superuser("root", password="pw")
    User.objects.create_superuser("ops", password="pw")
    # A script logged in before the flood keeps working (its password verified: no hashing again).
    assert client.get("/v1/admin/customers", HTTP_AUTHORIZATION=_basic("ops")).status_code == 200
    # The flood: wrong passwords for the script's own name as well as another's.
    guesses = [{"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(f"{name}:guess".encode()).decode()}
               for name in ("ops", "root", "root")]
    assert [client.get("/v1/admin/customers", **wrong).status_code for wrong in guesses] == [401, 401, 401]
    throttled = client.get("/v1/admin/customers", **guesses[1])
    assert throttled.status_code == 429 and throttled.json()["code"] == "login_throttled"
    assert 1 <= int(throttled["Retry-After"]) <= 61
    assert client.get("/v1/admin/customers", HTTP_AUTHORIZATION=_basic("ops")).status_code == 200
    # A password changed since it was verified takes effect at once (the client proved itself before:
    # its old password is checked, not kept waiting, and fails).
    ops = User.objects.get(username="ops")
    ops.set_password("new")
    ops.save()
    assert client.get("/v1/admin/customers", HTTP_AUTHORIZATION=_basic("ops")).status_code == 401
    # A password not verified before waits (it is checked no sooner); an admin key is unaffected.
    assert client.get("/v1/admin/customers", HTTP_AUTHORIZATION=_basic("root")).status_code == 429
    _, admin_key = api_key_create(customer=customer_create(name="bot"), scopes=["admin"])
    credentials.sync(full=True)
    assert client.get("/v1/admin/customers", HTTP_AUTHORIZATION=f"Bearer {admin_key}").status_code == 200


def test_admin_pages_cannot_be_framed(client):
    assert client.get("/admin/login/")["X-Frame-Options"] == "DENY"


@pytest.mark.django_db(transaction=True)
def test_a_deleted_customers_feed_row_is_written_after_the_cascade_waited():
    """customer_delete wrote its feed row before the cascade: a delete that waited on a key's row lock
    (a stalled flush) committed a row stamped before the wait, and past the readers' look-back
    (AUTH_FEED_LOOKBACK_SECONDS) the deleted customer's keys kept working until the next full resync.
    Another connection holds the key's row for 0.5 s; the row must be stamped after it let go."""
    import threading

    from django.db import connection, transaction

    from identity.models import Change
    from identity.services import customer_delete

    customer = customer_create(name="slow")
    api_key, _ = api_key_create(customer=customer)
    customer_id = customer.id
    locked, released_at = threading.Event(), []

    def hold_the_key() -> None:
        try:
            with transaction.atomic():
                list(ApiKey.objects.select_for_update().filter(pk=api_key.pk))
                locked.set()
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_sleep(0.5), clock_timestamp()")
                    released_at.append(cursor.fetchone()[1])
        finally:
            connection.close()

    holder = threading.Thread(target=hold_the_key)
    holder.start()
    assert locked.wait(10)
    customer_delete(customer=customer, actor="t")
    holder.join(10)
    row = Change.objects.filter(customer_id=customer_id).latest("id")
    assert row.created_at >= released_at[0]


def test_failed_admin_form_logins_are_capped_with_basic_ones(client, monkeypatch):
    """The admin's login form checked every password it was sent (the same PBKDF2 as Basic, and a
    session it opens reaches the management API too), without any cap: found by review, 25 wrong
    passwords in a row all checked. Its failures count against the same per-process cap as Basic's."""
    from identity.authentication import LoginFailures, StaffBasicAuthentication

    monkeypatch.setattr(StaffBasicAuthentication, "FAILURES_PER_MINUTE", 3)
    monkeypatch.setattr(StaffBasicAuthentication, "_failures", LoginFailures())
    monkeypatch.setattr(StaffBasicAuthentication, "_verified", {})
    User.objects.create_user("ops", password="right-password", is_staff=True)
    answers = [client.post("/admin/login/?next=/admin/", {"username": "ops", "password": f"guess-{i}"}).status_code
               for i in range(3)]
    assert answers == [200, 200, 200]  # the form again, with its error
    throttled = client.post("/admin/login/?next=/admin/", {"username": "ops", "password": "right-password"})
    assert throttled.status_code == 429 and throttled.json()["code"] == "login_throttled"
    assert 1 <= int(throttled["Retry-After"]) <= 61
    # A browser (it asks for HTML) gets a page, not the problem document's JSON: the same code.
    page = client.post("/admin/login/?next=/admin/", {"username": "ops", "password": "right-password"},
                       HTTP_ACCEPT="text/html,application/xhtml+xml,*/*;q=0.8")
    assert page.status_code == 429 and page["Content-Type"].startswith("text/html") and page["Retry-After"]
    assert page["Vary"] == throttled["Vary"] == "Accept"
    assert b"login_throttled" in page.content and b"Too many failed logins" in page.content
    # One budget: Basic logins wait too.
    basic = client.get("/v1/admin/customers", HTTP_AUTHORIZATION="Basic " + base64.b64encode(b"ops:x").decode())
    assert basic.status_code == 429
    monkeypatch.setattr(StaffBasicAuthentication, "_failures", LoginFailures())
    assert client.post("/admin/login/?next=/admin/",
                       {"username": "ops", "password": "right-password"}).status_code == 302


def _fresh_login_caps(monkeypatch, everyone: int, per_user: int = 5, verified_seconds: int = 60):
    from identity.authentication import LoginFailures, StaffBasicAuthentication

    monkeypatch.setattr(StaffBasicAuthentication, "FAILURES_PER_MINUTE", everyone)
    monkeypatch.setattr(StaffBasicAuthentication, "FAILURES_PER_USER_PER_MINUTE", per_user)
    monkeypatch.setattr(StaffBasicAuthentication, "VERIFIED_SECONDS", verified_seconds)
    monkeypatch.setattr(StaffBasicAuthentication, "_failures", LoginFailures())
    monkeypatch.setattr(StaffBasicAuthentication, "_verified", {})


def _basic_with(username: str, password: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}


def test_one_names_failed_logins_leave_the_other_names_theirs(client, monkeypatch):
    """Failures were counted for all users together: guessing one name's password used up everyone's
    budget. One name now has a cap of its own, below the process's."""
    _fresh_login_caps(monkeypatch, everyone=6, per_user=2)
    User.objects.create_superuser("root", password="pw")
    User.objects.create_superuser("ops", password="pw")
    assert [client.get("/v1/admin/customers", **_basic_with("root", "guess")).status_code for _ in range(2)] == [401, 401]
    throttled = client.get("/v1/admin/customers", **_basic_with("root", "pw"))  # refused, right or not
    assert throttled.status_code == 429 and throttled.json()["code"] == "login_throttled"
    assert client.get("/v1/admin/customers", **_basic_with("ops", "pw")).status_code == 200
    assert client.get("/v1/admin/customers", **_basic_with("ops", "guess")).status_code == 401


def test_a_basic_client_verified_before_is_not_locked_out_by_a_flood(client, monkeypatch):
    """Past the cap every unverified login waited, an operator's script included once its verification
    (VERIFIED_SECONDS) ran out: a flood of wrong passwords locked every Basic client out. A name and
    password this process verified before are checked again without waiting."""
    _fresh_login_caps(monkeypatch, everyone=3, verified_seconds=0)  # every request checks its password
    User.objects.create_superuser("ops", password="pw")
    assert client.get("/v1/admin/customers", **_basic_with("ops", "pw")).status_code == 200
    assert [client.get("/v1/admin/customers", **_basic_with(name, "guess")).status_code
            for name in ("root", "ops", "mallory")] == [401, 401, 401]
    assert client.get("/v1/admin/customers", **_basic_with("eve", "guess")).status_code == 429
    assert client.get("/v1/admin/customers", **_basic_with("ops", "pw")).status_code == 200
    # Only the password verified before: another for the same name waits like anyone's.
    assert client.get("/v1/admin/customers", **_basic_with("ops", "other")).status_code == 429


def test_an_admin_browser_that_logged_in_before_is_not_locked_out_by_a_flood(monkeypatch):
    """The admin form's failures were one budget for everyone: a flood of wrong passwords locked every
    operator out of the admin. A successful login leaves a signed device cookie; that user's logins from
    that browser are counted on their own and not refused for the flood."""
    from django.conf import settings
    from django.test import Client

    from identity.authentication import ADMIN_DEVICE_COOKIE

    _fresh_login_caps(monkeypatch, everyone=3, per_user=3)
    User.objects.create_user("ops", password="right-password", is_staff=True)
    User.objects.create_user("root", password="root-password", is_staff=True)
    login = "/admin/login/?next=/admin/"
    browser, attacker = Client(), Client()
    assert browser.post(login, {"username": "ops", "password": "right-password"}).status_code == 302
    assert ADMIN_DEVICE_COOKIE in browser.cookies
    del browser.cookies[settings.SESSION_COOKIE_NAME]  # logged out, the device cookie kept
    assert [attacker.post(login, {"username": "ops", "password": f"guess-{i}"}).status_code
            for i in range(3)] == [200, 200, 200]
    assert attacker.post(login, {"username": "ops", "password": "right-password"}).status_code == 429
    assert browser.post(login, {"username": "ops", "password": "right-password"}).status_code == 302
    # The cookie proves only its own user, and only signed by this deployment.
    assert browser.post(login, {"username": "root", "password": "root-password"}).status_code == 429
    forged = Client()
    forged.cookies[ADMIN_DEVICE_COOKIE] = browser.cookies[ADMIN_DEVICE_COOKIE].value[:-2] + "xx"
    assert forged.post(login, {"username": "ops", "password": "right-password"}).status_code == 429
    # A device has a cap of its own: a stolen cookie is not a way around guessing.
    del browser.cookies[settings.SESSION_COOKIE_NAME]
    assert [browser.post(login, {"username": "ops", "password": f"guess-{i}"}).status_code
            for i in range(3)] == [200, 200, 200]
    assert browser.post(login, {"username": "ops", "password": "right-password"}).status_code == 429


def test_a_user_names_spellings_share_its_cap(client, monkeypatch):
    """The form logs ` ops` and a fullwidth `ｏｐｓ` in as `ops` (NFKC, spaces stripped): counted under
    their own names, each spelling had its own 5 guesses a minute at ops's password (the diff review)."""
    _fresh_login_caps(monkeypatch, everyone=20, per_user=2)
    User.objects.create_user("ops", password="right-password", is_staff=True)
    login = "/admin/login/?next=/admin/"
    assert [client.post(login, {"username": name, "password": "guess"}).status_code
            for name in (" ops", "\uff4f\uff50\uff53")] == [200, 200]
    for name in ("ops", "ops ", "OPS"):
        assert client.post(login, {"username": name, "password": "right-password"}).status_code == 429


@pytest.mark.django_db(transaction=True)
def test_simultaneous_password_checks_cannot_all_pass_the_cap(monkeypatch):
    """A check was counted only once its hash was done (a third of a second): 8 wrong passwords sent at
    once all passed a cap of 3 before the first was counted (the diff review). An attempt now counts
    from its start."""
    import threading

    from django.db import connection
    from rest_framework.exceptions import AuthenticationFailed

    from controlplane.errors import ApiError
    from identity.authentication import StaffBasicAuthentication

    _fresh_login_caps(monkeypatch, everyone=20, per_user=3)
    start, outcomes = threading.Barrier(8), []

    def guess() -> None:
        try:
            start.wait(10)
            StaffBasicAuthentication().authenticate_credentials("ops", "guess")
        except AuthenticationFailed:
            outcomes.append(401)
        except ApiError as e:
            outcomes.append(e.status_code)
        finally:
            connection.close()

    threads = [threading.Thread(target=guess) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == [401] * 3 + [429] * 5


def test_a_password_reset_ends_the_device_cookies(monkeypatch):
    """A device cookie let its holder guess apart from the caps; after a reset (a compromise) it must
    not (the diff review): the cookie carries a mark of the password it was issued under."""
    from django.conf import settings
    from django.test import Client

    _fresh_login_caps(monkeypatch, everyone=2, per_user=2)
    ops = User.objects.create_user("ops", password="right-password", is_staff=True)
    login = "/admin/login/?next=/admin/"
    browser, attacker = Client(), Client()
    assert browser.post(login, {"username": "ops", "password": "right-password"}).status_code == 302
    del browser.cookies[settings.SESSION_COOKIE_NAME]
    ops.set_password("a-new-password")
    ops.save()
    assert [attacker.post(login, {"username": "root", "password": f"guess-{i}"}).status_code
            for i in range(2)] == [200, 200]
    assert browser.post(login, {"username": "ops", "password": "a-new-password"}).status_code == 429


def test_staff_logins_are_counted_for_the_guessing_alert(monkeypatch):
    """StaffLoginGuessing (docker/prometheus/rules) reads resizer_staff_logins_total: every password check and every refusal
    before one is counted, by where it came from and how it ended."""
    from django.test import Client

    from controlplane.metrics import STAFF_LOGINS

    def count(via: str, outcome: str) -> float:
        return STAFF_LOGINS.labels(via, outcome)._value.get()

    _fresh_login_caps(monkeypatch, everyone=2, per_user=2)
    User.objects.create_user("ops", password="right-password", is_staff=True)
    before = {(v, o): count(v, o) for v in ("form", "basic") for o in ("succeeded", "failed", "throttled")}
    browser = Client()
    login = "/admin/login/?next=/admin/"
    assert browser.post(login, {"username": "ops", "password": "right-password"}).status_code == 302
    assert [Client().post(login, {"username": "root", "password": "guess"}).status_code for _ in range(3)] == [200, 200, 429]
    assert Client().get("/v1/admin/customers", **_basic_with("ops", "guess")).status_code == 429
    assert {k: count(*k) - v for k, v in before.items()} == {
        ("form", "succeeded"): 1, ("form", "failed"): 2, ("form", "throttled"): 1,
        ("basic", "succeeded"): 0, ("basic", "failed"): 0, ("basic", "throttled"): 1}


def test_staff_passwords_are_checked():
    """createsuperuser took "password" for the account that runs the admin and the management API,
    whose login the load balancer serves publicly (found by the security review)."""
    from django.contrib.auth.password_validation import validate_password
    from django.core.exceptions import ValidationError

    for weak in ("password", "12345678901234", "short-Pw1", "ops-operations"):
        with pytest.raises(ValidationError):
            validate_password(weak, User(username="ops-operations"))
    validate_password("correct horse battery staple", User(username="ops"))


@pytest.mark.parametrize("headers, refused", [
    ({"HTTP_ORIGIN": "https://evil.example"}, True),
    ({"HTTP_SEC_FETCH_SITE": "cross-site", "HTTP_ORIGIN": "https://evil.example"}, True),
    ({"HTTP_ORIGIN": "null"}, True),
    ({"HTTP_SEC_FETCH_SITE": "same-origin", "HTTP_ORIGIN": "http://testserver"}, False),
    ({"HTTP_ORIGIN": "http://testserver"}, False),
    ({}, False),  # a script
])
def test_a_write_with_basic_credentials_from_another_sites_page_is_refused(staff, headers, refused):
    """A browser holding an operator's Basic credentials sends them with any site's request: a
    cross-site form's empty text/plain POST (no preflight) issued a key (the security review)."""
    customer = customer_create(name="c")
    answer = staff.post(f"/v1/admin/customers/{customer.id}/keys", "", content_type="text/plain", **headers)
    if refused:
        assert answer.status_code == 403 and answer.json()["code"] == "forbidden", answer.content
        assert not ApiKey.objects.filter(customer=customer).exists()
    else:
        assert answer.status_code == 201, answer.content
    assert staff.get("/v1/admin/customers", **headers).status_code == 200  # reads stay open


@pytest.mark.parametrize("headers, refused", [
    ({"HTTP_SEC_FETCH_SITE": "same-site", "HTTP_ORIGIN": "https://ops.example.com"}, False),  # by the wildcard
    ({"HTTP_SEC_FETCH_SITE": "cross-site", "HTTP_ORIGIN": "https://tools.partner.example"}, False),  # listed
    ({"HTTP_ORIGIN": "https://a.b.example.com"}, False),
    ({"HTTP_ORIGIN": "http://ops.example.com"}, True),  # the wildcard names https only
    ({"HTTP_ORIGIN": "https://example.com.evil.example"}, True),
    ({"HTTP_ORIGIN": "https://evilexample.com"}, True),
    ({"HTTP_SEC_FETCH_SITE": "same-site", "HTTP_ORIGIN": "https://other.partner.example"}, True),
    ({"HTTP_SEC_FETCH_SITE": "cross-site"}, True),  # a browser's, with no Origin
    ({"HTTP_SEC_FETCH_SITE": "none", "HTTP_ORIGIN": "https://evil.example"}, False),  # typed or bookmarked
])
def test_a_write_with_basic_credentials_from_a_trusted_origin_is_taken(staff, settings, headers, refused):
    """CSRF_TRUSTED_ORIGINS is trusted as Django's CSRF check trusts it, wildcards included: a
    `https://*.example.com` matched nothing here, and `Sec-Fetch-Site: same-site` was refused before
    the Origin was read, so an operators' tool on a listed origin could not write."""
    settings.CSRF_TRUSTED_ORIGINS = ["https://*.example.com", "https://tools.partner.example"]
    customer = customer_create(name="c")
    answer = staff.post(f"/v1/admin/customers/{customer.id}/keys", "", content_type="text/plain", **headers)
    if refused:
        assert answer.status_code == 403 and answer.json()["code"] == "forbidden", answer.content
    else:
        assert answer.status_code == 201, answer.content
