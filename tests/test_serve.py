"""The real Serve app (from serve_app/serve_config.yaml) on loopback, reached by the real gRPC client."""

from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import pytest

from routing.decision import RouteDecision, RouteRequest
from routing.routers import UnknownTaskError, make_router
from serve_app import launch
from serve_app.client import SwitchboardClient
from serve_app.contract import GenerationJob
from serve_app.generator import Generator, RequestAbandonedError
from serve_app.router import route_grouped
from training.adapter import TrainSpec, train_adapters
from training.catalog_build import build_catalog
from training.demo_corpus import demo_records
from training.router_training import train_lexical
from training.selector import train_selector

KEYS = ("fin/sentiment", "legal/plaintiff", "med/dose")


def _pick(split: str, keys=KEYS) -> list:
    return [r for r in demo_records(split) if r.key in keys]


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_base, free_port):
    """The running app: its gRPC client, catalog, test records, Serve config and work directory."""
    work = tmp_path_factory.mktemp("serve")
    adapters = work / "adapters"
    train_adapters(tiny_base, _pick("train"), adapters, train=TrainSpec(max_steps=20), progress=False)
    catalog = build_catalog(_pick("val"), work / "catalog", adapters=adapters, base_model=("tiny-test", tiny_base))
    # With a trained selector in the catalog the app deploys the Selector too; `auto` stays centroid.
    catalog, _ = train_selector(catalog, _pick("train"), work / "catalog-selector", tiny_base, per_task=40,
                                train=TrainSpec(max_steps=150), progress=False)
    port = free_port()
    config = launch.load_config(args={"catalog": str(catalog.root), "max_new_tokens": 8}, grpc_port=port,
                                http_port=free_port())
    launch.start(config)
    try:
        with SwitchboardClient(f"127.0.0.1:{port}") as client:
            yield SimpleNamespace(client=client, catalog=catalog, test=_pick("test"), config=config, work=work)
    finally:
        launch.stop()


@pytest.fixture
def served(app):
    return app.client, app.catalog, app.test


def test_health_and_list_tasks(served):
    client, catalog, _ = served
    health = client.health()
    assert health.status == "SERVING" and health.catalog_version == catalog.version
    assert {"centroid", "fixed", "selector"} <= set(health.routers)
    listed = client.list_tasks()
    assert [t.key for t in listed.tasks] == sorted(KEYS) and listed.base_model == catalog.base_model["id"]
    assert all(t.has_adapter and t.lora_rank == 8 and t.lora_variant == "lora" for t in listed.tasks)


def test_route_top_k_weights(served):
    client, catalog, test = served
    reply = client.route(test[0].input, top_k=3, temperature=0.5)
    tasks = reply.decision.tasks
    assert len(tasks) == 3 and abs(sum(t.weight for t in tasks) - 1) < 1e-5
    assert reply.decision.router == "centroid" and reply.decision.catalog_version == catalog.version


def test_generate_routed_fixed_and_base_only(served):
    client, _, test = served
    record = test[0]
    routed = client.generate(record.input, max_new_tokens=4)
    assert routed.decision.tasks[0].task in KEYS and 1 <= routed.new_tokens <= 4
    fixed = client.generate(record.input, task="med/dose", max_new_tokens=4)
    assert [(t.task, t.weight) for t in fixed.decision.tasks] == [("med/dose", 1.0)] and fixed.decision.router == "fixed"
    base = client.generate(record.input, task=record.key, base_only=True, max_new_tokens=4)
    assert base.finish_reason in {"eos", "length", "stop"}


def test_selector_deployment_routes_over_grpc(served):
    """`router="selector"` reaches the Selector deployment: a valid top-K over the catalog, mostly right."""
    client, catalog, test = served
    replies = [client.route(r.input, router="selector", top_k=2) for r in test]
    assert {d.decision.router for d in replies} == {"selector"}
    assert all(len(d.decision.tasks) == 2 and abs(sum(t.weight for t in d.decision.tasks) - 1) < 1e-5
               and {t.task for t in d.decision.tasks} <= set(KEYS) for d in replies)
    assert sum(d.decision.tasks[0].task == r.key for d, r in zip(replies, test)) >= 0.8 * len(test)
    answer = client.generate(test[0].input, router="selector", max_new_tokens=4)
    assert answer.decision.router == "selector" and answer.decision.catalog_version == catalog.version


def test_the_app_refuses_a_default_router_its_catalog_does_not_carry(app):
    from serve_app.app import build_app

    for name in ("classifier", "fixed", "oracle"):
        with pytest.raises(ValueError, match=f"default_router '{name}'"):
            build_app({"catalog": str(app.catalog.root), "default_router": name})
    with pytest.raises(ValueError, match="default_top_k 3 > max_loras 2"):
        build_app({"catalog": str(app.catalog.root), "default_top_k": 3, "max_loras": 2})


def test_the_router_batches_and_an_error_stays_with_its_request(served):
    client, catalog, test = served
    fixed = make_router("fixed", catalog)
    out = route_grouped([fixed] * 3, [RouteRequest("x", task=k) for k in (KEYS[0], "fin/nope", KEYS[1])])
    assert [out[0].top, out[2].top] == list(KEYS[:2]) and isinstance(out[1], UnknownTaskError)

    def send(task: str):
        try:
            return client.route(test[0].input, task=task).decision.tasks[0].task
        except grpc.RpcError as e:
            return e.code()

    tasks = [*KEYS, "fin/nope", *KEYS]
    with ThreadPoolExecutor(len(tasks)) as pool:
        assert list(pool.map(send, tasks)) == [*KEYS, grpc.StatusCode.NOT_FOUND, *KEYS]


def test_concurrent_mixed_requests_batch_and_agree_with_single_requests(served):
    client, _, test = served
    jobs = [(r.input, key) for r in test[:4] for key in KEYS]
    alone = [client.generate(text, task=key, max_new_tokens=6).text for text, key in jobs[:3]]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda j: client.generate(j[0], task=j[1], max_new_tokens=6).text, jobs))
    assert together[:3] == alone


@pytest.mark.parametrize("kwargs, code, message", [
    (dict(text=" "), grpc.StatusCode.INVALID_ARGUMENT, "text is empty"),
    (dict(top_k=9), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    (dict(max_new_tokens=100000), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    (dict(task="fin/nope"), grpc.StatusCode.NOT_FOUND, "unknown task 'fin/nope'"),
    (dict(router="oracle"), grpc.StatusCode.INVALID_ARGUMENT, "unknown router 'oracle'"),
    (dict(router="fixed"), grpc.StatusCode.INVALID_ARGUMENT, "needs route.task"),
    (dict(router="centroid", task="med/dose"), grpc.StatusCode.INVALID_ARGUMENT, "route.task is for the fixed router"),
    (dict(top_k=3, temperature=1e-45), grpc.StatusCode.INVALID_ARGUMENT, "temperature must be in"),
    (dict(text="The patient weighs 7 kg. " * 200), grpc.StatusCode.INVALID_ARGUMENT, "the base model's context is"),
])
def test_bad_requests_get_status_codes_not_tracebacks(served, kwargs, code, message):
    client, _, _ = served
    text = kwargs.pop("text", "The patient weighs 7 kg.")
    with pytest.raises(grpc.RpcError) as err:
        client.generate(text, **kwargs)
    assert err.value.code() == code
    assert message in err.value.details() and "Traceback" not in err.value.details()


def test_a_bad_request_fails_alone_not_its_batch(served):
    """A prompt longer than the base model's context, sent among good requests: only it is refused."""
    client, _, test = served

    def send(text: str):
        try:
            return client.generate(text, max_new_tokens=4).new_tokens
        except grpc.RpcError as e:
            return e.code()

    texts = [r.input for r in test[:6]]
    texts.insert(3, " ".join(texts) * 20)
    with ThreadPoolExecutor(len(texts)) as pool:
        results = list(pool.map(send, texts))
    assert results[3] == grpc.StatusCode.INVALID_ARGUMENT
    assert all(isinstance(n, int) and n >= 1 for i, n in enumerate(results) if i != 3), results


def test_a_client_that_gives_up_leaves_its_batch_and_the_replica_serving(app):
    """A request whose gRPC deadline passes in flight, among others: it alone ends DEADLINE_EXCEEDED, and
    the replica answers the rest and what comes next as if it had not been there."""
    client, port = app.client, app.config["grpc_options"]["port"]
    texts = [r.input for r in app.test[:4]]
    with SwitchboardClient(f"127.0.0.1:{port}", timeout_s=0.05) as hasty:
        def send(i: int):
            try:
                return (hasty if i == 0 else client).generate(texts[i], max_new_tokens=8).text
            except grpc.RpcError as e:
                return e.code()

        with ThreadPoolExecutor(len(texts)) as pool:
            results = list(pool.map(send, range(len(texts))))
    assert results[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert results[1:] == [client.generate(t, max_new_tokens=8).text for t in texts[1:]]


def test_generator_answers_each_call_as_it_returns_and_errors_stay_with_their_row(app):
    """Three requests in one batch, on a Generator deployed beside the app with one adapter slot: their two
    adapters need two `generate` calls, and each call's rows answer as it returns, the short prompts' call
    first. In it, a decision with a non-finite weight (a router cannot make one, so it is built here) fails
    the call; its rows are retried one by one and only that one gets the error."""
    from ray import serve

    args = {"catalog": str(app.catalog.root), "max_loras": 1, "max_batch_size": 3, "batch_wait_timeout_s": 0.5}
    version = app.catalog.version
    long = GenerationJob(" ".join(r.input for r in app.test[:3]), RouteDecision(((KEYS[0], 1.0),), "fixed", version),
                         8)
    short = GenerationJob(app.test[0].input, RouteDecision(((KEYS[1], 1.0),), "fixed", version), 4)
    bad = GenerationJob(short.text, RouteDecision(((KEYS[1], float("nan")),), "fixed", version), 4)
    in_process = Generator.func_or_class(args)
    assert [sorted(answered) for answered in in_process._answers([long, short, bad])] == [[1, 2], [0]]
    # The long prompt's client gives up while the first call runs: its call is skipped, not generated.
    answers = in_process._answers([long, short, bad])
    assert sorted(next(answers)) == [1, 2] and in_process.running == {long.request_id, short.request_id,
                                                                       bad.request_id}
    in_process.abandoned.add(long.request_id)
    (skipped,) = list(answers)
    assert list(skipped) == [0] and isinstance(skipped[0], RequestAbandonedError)
    assert in_process.info()["abandoned_rows"] == 1 and not in_process.running and not in_process.abandoned

    generator = serve.run(Generator.bind(args), name="one-slot", route_prefix=None)

    def answer(job: GenerationJob):
        try:
            return generator.generate.remote(job).result()
        except ValueError as e:
            return e

    try:
        with ThreadPoolExecutor(3) as pool:  # a full batch: it starts when the third request arrives
            got_long, got_short, got_bad = pool.map(answer, (long, short, bad))
        alone = [answer(job).text for job in (long, short)]
    finally:
        serve.delete("one-slot")
    assert isinstance(got_bad, ValueError) and "not finite" in str(got_bad)
    assert [got_long.text, got_short.text] == alone


def test_catalog_switch_in_place_keeps_replicas_and_in_flight_requests(app, tiny_base):
    """A new catalog version (one task dropped, one added) replaces the served one through Serve's
    `user_config`: same Generator process, base model not reloaded, requests in flight all answered."""
    from ray import serve

    from serve_app.contract import APP_NAME

    keys = ("fin/sentiment", "legal/plaintiff", "fin/ticker")  # med/dose dropped, fin/ticker added
    adapters = app.work / "adapters"
    train_adapters(tiny_base, _pick("train", keys), adapters, train=TrainSpec(max_steps=20), progress=False)
    v2 = build_catalog(_pick("val", keys), app.work / "catalog-v2", adapters=adapters,
                       base_model=("tiny-test", tiny_base))
    generator = serve.get_deployment_handle("Generator", APP_NAME)
    before = generator.info.remote().result()
    text = app.test[0].input
    expected = app.client.generate(text, task="fin/sentiment", max_new_tokens=6).text
    with ThreadPoolExecutor(8) as pool:
        in_flight = [pool.submit(app.client.generate, text, task="fin/sentiment", max_new_tokens=6) for _ in range(8)]
        config = launch.switch_catalog(app.config, v2.root)
        assert [f.result().text for f in in_flight] == [expected] * 8
    try:
        after = generator.info.remote().result()
        assert after["version"] == v2.version and after["pid"] == before["pid"]
        assert "med/dose" not in after["resident"]
        assert app.client.health().catalog_version == v2.version
        assert sorted(t.key for t in app.client.list_tasks().tasks) == sorted(keys)
        reply = app.client.generate(text, task="fin/ticker", max_new_tokens=4)
        assert reply.decision.catalog_version == v2.version and reply.decision.tasks[0].task == "fin/ticker"
        with pytest.raises(grpc.RpcError) as err:
            app.client.generate(text, task="med/dose")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # v2 has no selector: the live Selector keeps v1's labels, so the Router stops offering it.
        assert "selector" not in app.client.health().routers
        with pytest.raises(grpc.RpcError) as err:
            app.client.route(text, router="selector")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown router 'selector'" in err.value.details()
        with pytest.raises(ValueError, match="another base model"):
            launch.switch_catalog(config, build_catalog(_pick("val"), app.work / "routing-only").root)
    finally:
        launch.switch_catalog(app.config, app.catalog.root)
    assert generator.info.remote().result()["pid"] == before["pid"]
    assert app.client.route(text, router="selector").decision.catalog_version == app.catalog.version


def test_a_trained_router_is_served_after_a_switch_and_auto_picks_it(app):
    """A catalog version that adds a trained router (the lexical one: seconds to fit) is switched in; the
    live Router serves it by name, `auto` resolves to it, and switching back restores the centroid router."""
    lexical = train_lexical(app.catalog, _pick("val"), app.work / "catalog-lexical", progress=False)
    launch.switch_catalog(app.config, lexical.root)
    try:
        assert "lexical" in app.client.health().routers
        replies = [app.client.route(r.input) for r in app.test]
        assert {d.decision.router for d in replies} == {"lexical"}
        assert sum(d.decision.tasks[0].task == r.key for d, r in zip(replies, app.test)) >= 0.9 * len(app.test)
        assert app.client.route(app.test[0].input, router="lexical", top_k=2).decision.router == "lexical"
    finally:
        launch.switch_catalog(app.config, app.catalog.root)
    assert app.client.route(app.test[0].input).decision.router == "centroid"


@pytest.mark.slow
def test_smollm2_adapter_served_over_grpc(tmp_path, free_port):
    """The real pretrained base (SmolLM2-135M-Instruct from its GGUF) behind the same app."""
    from training.base_model import resolve_base_model

    base = resolve_base_model("smollm2", progress=False)
    key = "med/dose"
    train_adapters(base, [r for r in demo_records("train") if r.key == key][:16], tmp_path / "adapters",
                   train=TrainSpec(max_steps=2, batch_size=4, save_steps=2), progress=False)
    catalog = build_catalog([r for r in demo_records("val") if r.key == key], tmp_path / "catalog",
                            adapters=tmp_path / "adapters", base_model=("smollm2", base))
    port = free_port()
    launch.start(launch.load_config(args={"catalog": str(catalog.root), "max_new_tokens": 4}, grpc_port=port,
                                    http_port=free_port()))
    try:
        with SwitchboardClient(f"127.0.0.1:{port}") as client:
            assert client.health().base_model == catalog.base_model["id"]
            reply = client.generate("The patient weighs 7 kg; the dose is 3 mg/kg.", max_new_tokens=4)
            assert reply.decision.tasks[0].task == key and 1 <= reply.new_tokens <= 4
    finally:
        launch.stop()
