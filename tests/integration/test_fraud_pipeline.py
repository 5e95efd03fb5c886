"""The fraud scorer on the real broker, PostgreSQL and Redis: worker child processes (as
`fintide worker` runs them, see test_fraud_support.py) and the API on uvicorn.

* Labelled simulator traffic replayed through Kafka gets, payment for payment, the score
  and decision the same kernels give offline (so the routes through the payee, user,
  device and IP partitions, the tables and the batching change nothing), and every
  injected pattern is caught live; a worker owning every partition sends nothing on
  fraud.by_entity.
* A payment another worker sent on (its keys already updated marked -1) gets only its
  remaining keys updated, and is decided.
* A rule over device and IP features catches one device and IP shared by several accounts.
* Rule edits through the API take effect on the running worker, without a restart.
* A redelivered request is answered again but counted once.
* Alerts reach the WebSocket; review decisions reach the saga's topic.
* The feature rows (payer, payee, user, device, IP) are served by the owning worker
  through the API, and survive a worker restart (RocksDB) and a move to a fresh worker
  (changelog), byte for byte.

One worker serves the module (a group join costs seconds); the last test restarts it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition
from msgspec.structs import replace
from redis.asyncio import Redis
from websockets.asyncio.client import connect

from indicators.risk_model import N_FEATURES
from ops.embedded import EmbeddedStack
from ops.settings import Settings
from ops.simulate import PATTERNS, generate, publish_online
from services.fraud import stable_hash
from streams.codec import encode
from streams.fraud import (
    BY_ENTITY,
    REQUESTS,
    ScoreBatch,
    alerts_channel,
    entity_batch,
    entity_key,
)
from streams.publisher import EventPublisher
from streams.topics import bootstrap_servers, dlq_name, full_name, partition_for_key
from tests.helpers.auth import LoggedIn, register_and_login
from tests.integration.test_fraud_support import (
    Decisions,
    FraudWorker,
    get_json,
    module_settings,
    publish,
    request,
    serve_api,
    start_worker,
    wait_for,
)

T0 = int(time.time() * 1000) - 3_600_000
STATE_IP = "10.0.9.9"  # used by the state test only


@pytest.fixture(scope="module")
def settings_(stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return module_settings(stack, tmp_path_factory.mktemp("fraud-pipeline"), "fraud_pipe", redis_db=7)


@pytest.fixture(scope="module")
async def worker(settings_: Settings) -> AsyncIterator[FraudWorker]:
    process = await start_worker(settings_)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
async def server(settings_: Settings, worker: FraudWorker) -> AsyncIterator[str]:
    async for address in serve_api(settings_):
        yield address


@pytest.fixture(scope="module")
async def client(server: str, settings_: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://{server}", timeout=20) as c:
        c.app = SimpleNamespace(state=SimpleNamespace(settings=settings_))  # type: ignore[attr-defined]
        yield c


@pytest.fixture(scope="module")
async def admin(client: httpx.AsyncClient) -> LoggedIn:
    return await register_and_login(client, roles=("admin",))


async def rules_version(worker: FraudWorker) -> int:
    status = await get_json(f"{worker.url}/fraud/status")
    return int(status["rules_version"])


# ----------------------------------------------------------------------------- traffic

async def test_live_decisions_equal_offline_and_every_pattern_is_caught(worker: FraudWorker,
                                                                          settings_: Settings) -> None:
    data = generate(1_500, 0.06, 3, days=2.0)
    result = await publish_online(settings_, data, None, 60.0)
    online = result["online"]
    assert online["answered"] == len(data), result
    assert online["same_score_as_offline"] == len(data), result
    assert online["same_decision_as_offline"] == len(data), result
    assert set(result["patterns"]) == set(PATTERNS[1:])
    for name, figures in result["patterns"].items():
        assert figures["flagged_recall"] >= 0.6, (name, figures)
    assert result["normal_flag_rate"] <= 0.02, result
    # One worker owns every partition: it updated every key in place, no payment took a hop.
    assert await _messages(settings_, BY_ENTITY.name) == 0


async def test_bad_requests_are_dead_lettered(worker: FraudWorker, settings_: Settings) -> None:
    """A bad single request, a bad request inside a fraud.score_batch (dead-lettered alone:
    the rest of its batch is scored) and a malformed batch (dead-lettered whole)."""
    bad = request("w-bad", "w-x", 1, ts_ms=T0)
    bad = replace(bad, amount_minor=0)  # the schema allows it; the scorer refuses it
    batched_bad = replace(request("w-bad2", "w-x", 1, ts_ms=T0), amount_minor=-5)
    good = request("w-bad2", "w-x", 1_500, ts_ms=T0 + 1)
    consumer = AIOKafkaConsumer(full_name(settings_, dlq_name(REQUESTS.name)),
                                bootstrap_servers=bootstrap_servers(settings_), auto_offset_reset="earliest",
                                fetch_max_wait_ms=5)
    await consumer.start()
    letters: list[dict[str, Any]] = []
    try:
        async with Decisions(settings_) as decisions, EventPublisher(settings_) as publisher:
            await publish(settings_, [bad])
            await publisher.publish("fraud.requests", None,
                                    ScoreBatch(payer_wallet_id="w-bad2", requests=[batched_bad, good]))
            # Empty: refused when decoded (a batch holds 1..MAX_FRAUD_BATCH events).
            raw = AIOKafkaProducer(bootstrap_servers=bootstrap_servers(settings_))
            await raw.start()
            try:
                empty = json.loads(encode(ScoreBatch(payer_wallet_id="w-bad3", requests=[good])))
                empty["requests"] = []
                await raw.send_and_wait(full_name(settings_, REQUESTS.name), key=b"w-bad3",
                                        value=json.dumps(empty).encode())
            finally:
                await raw.stop()
            decided = (await decisions.collect([good.payment_id]))[good.payment_id]
        assert decided.payer_wallet_id == "w-bad2"
        deadline = time.monotonic() + 60
        while len(letters) < 3 and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                letters += [json.loads(record.value) for record in records]
    finally:
        await consumer.stop()
    by_payment = {p.payment_id: next((x for x in letters if p.payment_id in x["value"]), None)
                  for p in (bad, batched_bad, good)}
    assert by_payment[bad.payment_id] is not None and "amount_minor must be positive" in by_payment[bad.payment_id]["error"]
    assert by_payment[bad.payment_id]["agent"] == "fraud.payer"
    # The batch member is dead-lettered as itself, not with its batch (the good one was scored).
    alone = by_payment[batched_bad.payment_id]
    assert alone is not None and json.loads(alone["value"])["payment_id"] == batched_bad.payment_id
    assert by_payment[good.payment_id] is None
    assert any("w-bad3" in x["value"] and "1..1000" in x["error"] for x in letters), letters


# ----------------------------------------------------------------------------- rules

async def test_rule_edits_take_effect_without_a_restart(worker: FraudWorker, settings_: Settings,
                                                        client: httpx.AsyncClient, admin: LoggedIn) -> None:
    pid = worker.proc.pid
    before = await rules_version(worker)
    rule_id = f"exact-{uuid.uuid4().hex[:6]}"
    created = await client.post("/api/v1/fraud/rules", headers=admin.headers,
                                json={"id": rule_id, "expression": "amount_minor == 777777", "action": "block"})
    assert created.status_code == 201, created.text
    await wait_for(lambda: _version_above(worker, before), 30, "the worker to load the new rule")
    payer = f"w-rule-{uuid.uuid4().hex[:6]}"
    async with Decisions(settings_) as decisions:
        first = request(payer, "w-shop", 777_777, ts_ms=T0)
        await publish(settings_, [first])
        decided = (await decisions.collect([first.payment_id]))[first.payment_id]
        assert decided.decision == "block" and rule_id in decided.rules_fired
        version = await rules_version(worker)
        disabled = await client.put(f"/api/v1/fraud/rules/{rule_id}", headers=admin.headers,
                                    json={"expression": "amount_minor == 777777", "action": "block",
                                          "enabled": False})
        assert disabled.status_code == 200
        await wait_for(lambda: _version_above(worker, version), 30, "the worker to load the edit")
        second = request(payer, "w-shop", 777_777, ts_ms=T0 + 1_000)
        await publish(settings_, [second])
        decided = (await decisions.collect([second.payment_id]))[second.payment_id]
        assert rule_id not in decided.rules_fired
    assert worker.proc.pid == pid and worker.proc.poll() is None


async def test_a_rule_over_device_and_ip_features_catches_a_shared_device(
        worker: FraudWorker, settings_: Settings, client: httpx.AsyncClient, admin: LoggedIn) -> None:
    """Four accounts pay from one new device and IP within a minute: from the third on, the
    device and the IP have each seen three users in the hour, which only the device / IP
    rows know (each payer's own row sees one payment from a new device)."""
    tag = uuid.uuid4().hex[:6]
    before = await rules_version(worker)
    rule_id = f"shared-device-{tag}"
    created = await client.post("/api/v1/fraud/rules", headers=admin.headers,
                                json={"id": rule_id, "action": "review",
                                      "expression": "device_users_1h >= 3 and ip_users_1h >= 3"})
    assert created.status_code == 201, created.text
    await wait_for(lambda: _version_above(worker, before), 30, "the worker to load the rule")
    now = int(time.time() * 1000)
    burst = [request(f"w-victim-{tag}-{i}", f"w-mule-{tag}", 4_000, ts_ms=now + 5_000 * i, device=f"atk-{tag}",
                     ip=f"198.51.100.{i}" if i == 1 else "203.0.113.9") for i in range(4)]
    async with Decisions(settings_) as decisions:
        # One by one: the order the device row sees them in is the order asserted on.
        found = {}
        for r in burst:
            await publish(settings_, [r])
            found.update(await decisions.collect([r.payment_id]))
    fired = [rule_id in found[r.payment_id].rules_fired for r in burst]
    # The IP of the second payment differs, so the IP has seen 3 users only at the fourth.
    assert fired == [False, False, False, True], fired
    assert found[burst[3].payment_id].decision in ("review", "block")
    ip = await get_json(f"{worker.url}/fraud/entities/ip:203.0.113.9")
    assert (ip["kind"], ip["ip_count_1h"], ip["ip_users_1h"], ip["ip_users_24h"]) == ("ip", 3, 3, 3)
    device = (await client.get(f"/api/v1/fraud/entities/device/atk-{tag}/features", headers=admin.headers)).json()
    assert device["features"]["device_users_1h"] == 4 and device["features"]["device_count_1h"] == 4
    unknown = await client.get("/api/v1/fraud/entities/device/never-seen/features", headers=admin.headers)
    assert unknown.status_code == 404
    bad_kind = await client.get("/api/v1/fraud/entities/phone/1/features", headers=admin.headers)
    assert bad_kind.status_code == 422


async def _version_above(worker: FraudWorker, version: int) -> bool:
    return await rules_version(worker) > version


# ----------------------------------------------------------------------------- redelivery

async def test_a_redelivered_request_is_answered_again_but_counted_once(
        worker: FraudWorker, settings_: Settings, client: httpx.AsyncClient, admin: LoggedIn) -> None:
    payer = f"w-dup-{uuid.uuid4().hex[:6]}"
    first = request(payer, "w-shop", 1_200, ts_ms=T0)
    async with Decisions(settings_) as decisions:
        await publish(settings_, [first, first])
        # Both answers may come in different fetches (the copies can land in different
        # batches): keep reading until the second one is in.
        await decisions.count(first.payment_id, 2)
    # The second answer may differ a little: the copy is scored on a scratch copy of the
    # rows as the first left them. Whoever reads decisions keeps the first.
    answers = [(d.score, d.decision, d.rules_fired) for d in decisions.seen if d.payment_id == first.payment_id]
    state = await get_json(f"{worker.url}/fraud/payers/{payer}")
    assert state["payments_seen"] == 1 and state["payer_count_24h"] == 1
    # The recorder got both answers; the payment has one score, the first.
    recorded = await wait_for(lambda: _score(client, admin, first.payment_id), 60, "the recorded score")
    assert (recorded["score"], recorded["decision"], recorded["rules_fired"]) == answers[0]


async def _score(client: httpx.AsyncClient, user: LoggedIn, payment_id: str) -> dict[str, Any] | None:
    response = await client.get(f"/api/v1/fraud/scores/{payment_id}", headers=user.headers)
    return response.json() if response.status_code == 200 else None


# ----------------------------------------------------------------------------- alerts, reviews

async def test_alerts_reach_analysts_and_review_decisions_reach_the_saga(
        worker: FraudWorker, settings_: Settings, client: httpx.AsyncClient, server: str, admin: LoggedIn) -> None:
    rule_id = f"hold-{uuid.uuid4().hex[:6]}"
    before = await rules_version(worker)
    await client.post("/api/v1/fraud/rules", headers=admin.headers,
                      json={"id": rule_id, "expression": "amount_minor == 555555", "action": "review"})
    await wait_for(lambda: _version_above(worker, before), 30, "the review rule")
    held = request(f"w-held-{uuid.uuid4().hex[:6]}", "w-shop", 555_555, ts_ms=T0)
    async with connect(f"ws://{server}/ws/fraud/alerts?token={admin.access_token}", open_timeout=30) as ws:
        await wait_for(lambda: _subscribers(settings_), 30, "the socket's Redis subscription")
        await publish(settings_, [held])
        alert = json.loads(await asyncio.wait_for(ws.recv(), 60))
    assert (alert["payment_id"], alert["decision"], alert["severity"]) == (held.payment_id, "review", "medium")
    assert rule_id in alert["rules_fired"] and len(alert["top_features"]) == 3
    review = await wait_for(lambda: _open_review(client, admin, held.payment_id), 60, "the review")
    score = (await client.get(f"/api/v1/fraud/scores/{held.payment_id}", headers=admin.headers)).json()
    assert score["decision"] == "review" and score["review"]["status"] == "open"
    async with Decisions(settings_) as decisions:
        decided = await client.post(f"/api/v1/fraud/reviews/{review['id']}/decision", headers=admin.headers,
                                    json={"decision": "decline", "note": "card reported stolen"})
        assert decided.status_code == 200 and decided.json()["published"] is True
        final = (await decisions.collect([held.payment_id], source="review"))[held.payment_id]
    assert (final.decision, final.note, final.payer_wallet_id) == ("block", "card reported stolen",
                                                                   held.payer_wallet_id)


async def _subscribers(settings: Settings) -> int:
    redis = Redis.from_url(settings.redis_url)
    try:
        return int((await redis.pubsub_numsub(alerts_channel(settings)))[0][1])
    finally:
        await redis.aclose()


async def _open_review(client: httpx.AsyncClient, user: LoggedIn, payment_id: str) -> dict[str, Any] | None:
    items = (await client.get("/api/v1/fraud/reviews?limit=200", headers=user.headers)).json()["items"]
    return next((r for r in items if r["payment_id"] == payment_id), None)


async def test_a_payment_sent_on_by_another_worker_updates_only_its_remaining_keys(
        worker: FraudWorker, settings_: Settings) -> None:
    """What a worker owning only some partitions sends on: an EntityBatch whose keys it
    already updated are marked -1. This worker owns the rest and decides the payment."""
    n = settings_.topic_partitions
    payee, user, device, ip = "w-sent-on", "user-w-sent-on-payer", "d-sent-on", "10.0.7.7"
    parts = np.array([[partition_for_key(payee, n), partition_for_key(entity_key("user", user), n),
                       -1, partition_for_key(entity_key("ip", ip), n)]], dtype=np.int64)
    here = int(parts[0, 0])
    payment = f"pay-{uuid.uuid4().hex[:12]}"
    ids = {"request_ids": [uuid.uuid4().hex], "payment_ids": [payment], "payer_wallet_ids": ["w-sent-on-payer"],
           "payer_user_ids": [user], "payee_wallet_ids": [payee], "device_ids": [device], "ips": [ip],
           "currencies": ["INR"]}
    hashes = np.array([[stable_hash(payment), stable_hash("w-sent-on-payer"), stable_hash(user)]], dtype=np.int64)
    batch = entity_batch(here, ids, np.array([T0 + 600_000]), np.array([1_234]), np.array([0]), hashes, parts,
                         np.zeros((1, N_FEATURES)))
    async with Decisions(settings_) as decisions, AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers(settings_)) as producer:
        await producer.send_and_wait(full_name(settings_, BY_ENTITY.name), encode(batch), partition=here)
        decided = await decisions.collect([payment])
    assert decided[payment].payee_wallet_id == payee
    payee_row = await get_json(f"{worker.url}/fraud/payees/{payee}")
    assert payee_row is not None and payee_row["payments_received"] == 1
    assert (await get_json(f"{worker.url}/fraud/entities/user:{user}"))["user_count_24h"] == 1
    assert (await get_json(f"{worker.url}/fraud/entities/ip:{ip}"))["ip_count_24h"] == 1
    # The device key was marked as updated by the sender: this worker does not count it again.
    assert await get_json(f"{worker.url}/fraud/entities/device:{device}") is None


# ----------------------------------------------------------------------------- state

async def test_features_are_routed_and_survive_restarts(worker: FraudWorker, settings_: Settings,
                                                        client: httpx.AsyncClient, admin: LoggedIn) -> None:
    """Must stay last: it moves the module's worker."""
    payers = [f"w-state-{i}" for i in range(12)]
    requests_ = [request(p, payers[(i + 1) % len(payers)], 300 + 10 * i + j, ts_ms=T0 + 1_000 * (i * 3 + j),
                         device=f"d-{j}", ip=STATE_IP) for i, p in enumerate(payers) for j in range(3)]
    async with Decisions(settings_) as decisions:
        await publish(settings_, requests_)
        await decisions.collect([r.payment_id for r in requests_])
    rows = await raw_rows(worker.url, payers)
    api = (await client.get(f"/api/v1/fraud/accounts/{payers[0]}/features", headers=admin.headers)).json()
    assert api["as_payer"]["payments_seen"] == 3 and api["as_payer"]["known_devices"] == 3
    assert api["as_payee"]["payments_received"] == 3 and api["as_payee"]["payee_fanin_24h"] == 1
    # Every payer paid once from d-0, and all from the same IP: the shared-device rows.
    device = await get_json(f"{worker.url}/fraud/entities/device:d-0")
    assert (device["device_count_24h"], device["device_users_24h"]) == (len(payers), len(payers))
    ip = await get_json(f"{worker.url}/fraud/entities/ip:{STATE_IP}")
    assert (ip["ip_count_24h"], ip["ip_users_24h"]) == (len(requests_), len(payers))
    user = await get_json(f"{worker.url}/fraud/entities/user:user-{payers[0]}")
    assert (user["user_count_24h"], user["user_wallets_24h"]) == (3, 1)
    missing = await client.get("/api/v1/fraud/accounts/w-never-seen/features", headers=admin.headers)
    assert missing.status_code == 404

    # A second worker (its own RocksDB dir) joins: partitions split, reads are routed.
    second = await start_worker(replace(settings_, worker_id="worker-2"))
    try:
        await wait_for(lambda: _split(worker, second), 120, "partitions split between the workers")
        assert await raw_rows(worker.url, payers) == rows
        assert await raw_rows(second.url, payers) == rows
        # The first worker leaves: the second rebuilds its partitions from the changelogs.
        assert worker.stop() == 0
        await wait_for(lambda: _owns_all(second), 120, "the second worker owning every partition")
        assert await raw_rows(second.url, payers) == rows
        api = (await client.get(f"/api/v1/fraud/accounts/{payers[0]}/features", headers=admin.headers)).json()
        assert api["worker"] == second.url and api["as_payer"]["payments_seen"] == 3
    finally:
        assert second.stop() == 0
    # The first worker restarts on its own data dir (RocksDB) and takes everything back.
    again = await start_worker(settings_)
    try:
        await wait_for(lambda: _owns_all(again), 120, "the restarted worker owning every partition")
        assert await raw_rows(again.url, payers) == rows
        # ... and carries on from the restored rows.
        more = request(payers[0], "w-shop", 999, ts_ms=T0 + 500_000, ip=STATE_IP)
        async with Decisions(settings_) as decisions:
            await publish(settings_, [more])
            await decisions.collect([more.payment_id])
        state = await get_json(f"{again.url}/fraud/payers/{payers[0]}")
        assert state["payments_seen"] == 4
        ip = await get_json(f"{again.url}/fraud/entities/ip:{STATE_IP}")
        assert ip["payments_seen"] == len(requests_) + 1
    finally:
        worker.proc = again.proc  # the fixture's teardown stops it


async def _messages(settings: Settings, name: str) -> int:
    """Messages ever written to topic `name` (the sum of its partitions' end offsets)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers(settings))
    await consumer.start()
    try:
        topic = full_name(settings, name)
        await consumer.topics()
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        return sum((await consumer.end_offsets(tps)).values()) if tps else 0
    finally:
        await consumer.stop()


async def raw_rows(url: str, keys: list[str]) -> dict[str, Any]:
    """Faust's own table view (routed to the owner): the stored value, row bytes and all,
    of each wallet as payer and payee, its user, and the devices and the IP they used."""
    out = {}
    entity_keys = [f"user:user-{key}" for key in keys] + [f"device:d-{j}" for j in range(3)] + [f"ip:{STATE_IP}"]
    for table, table_keys in (("fraud.payer_features", keys), ("fraud.payee_features", keys),
                              ("fraud.entity_features", entity_keys)):
        for key in table_keys:
            value = await get_json(f"{url}/table/{table}/{key}/")
            assert value is not None, (table, key)
            out[f"{table}/{key}"] = value
    return out


async def _active(worker: FraudWorker) -> list[int] | None:
    report = await get_json(f"{worker.url}/ops/")
    if not report:
        return None
    tables = {t["name"]: t for t in report["tables"]}
    return list(tables["fraud.payer_features"]["active_partitions"])


async def _split(a: FraudWorker, b: FraudWorker) -> bool:
    pa, pb = await _active(a), await _active(b)
    return bool(pa and pb and sorted(pa + pb) == list(range(a.settings.topic_partitions)))


async def _owns_all(w: FraudWorker) -> bool:
    return await _active(w) == list(range(w.settings.topic_partitions))

