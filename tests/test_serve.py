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
from serve_app.generator import Generator
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


def serve_info() -> dict:
    from ray import serve

    from serve_app.contract import APP_NAME

    return serve.get_deployment_handle("Generator", APP_NAME).info.remote().result()


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
    reply = client.route(test[0].input, top_k=3, routing_temperature=0.5)
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
    (dict(top_k=3, routing_temperature=1e-45), grpc.StatusCode.INVALID_ARGUMENT, "temperature must be in"),
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


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_a_stream_closed_by_its_client_frees_its_slot(app, http_base, transport):
    """The client closes a stream after its first chunk, ten times: each time the Generator retires the
    sequence at its next step (counted in `aborted`), and nothing stays running or queued. (Sampled
    near-uniformly with a fixed seed from a short prompt, so the answer, cut at the context, does not end by
    itself first: about 0.5 s against 20 ms for the cancel.) Over gRPC this needs
    `wire.cancel_downstream`: without it Serve's proxy loses about one cancel in twenty."""
    import time

    from openai import OpenAI

    oa = OpenAI(base_url=http_base, api_key="unused", max_retries=0)
    text, options = "Dose?", dict(stop=["never-seen"], seed=0)

    def open_and_close() -> None:
        if transport == "grpc":
            stream = app.client.generate_stream(text, task=KEYS[0], max_new_tokens=400, sampling_temperature=50.0,
                                                **options)
            next(stream)
            stream.cancel()
        else:
            stream = oa.completions.create(model=KEYS[0], prompt=text, max_tokens=400, temperature=50.0,
                                           stream=True, **options)
            next(iter(stream))
            stream.close()

    for _ in range(10):
        before = serve_info()["aborted"]
        open_and_close()
        deadline = time.monotonic() + 30
        while (info := serve_info())["aborted"] == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert info["aborted"] == before + 1
    while (info := serve_info())["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert info["running"] == info["waiting"] == 0 and info["kv_blocks_free"] == info["kv_blocks"]


def test_a_one_slot_generator_makes_requests_wait_for_adapters_and_errors_stay_alone(app):
    """On a Generator deployed beside the app with one adapter slot, requests on two adapters run one
    adapter at a time (they wait, they do not fail) and answer as they would alone; a decision with a
    non-finite weight (a router cannot make one, so it is built here) is refused alone."""
    from ray import serve

    args = {"catalog": str(app.catalog.root), "max_loras": 1}
    version = app.catalog.version
    long = GenerationJob(" ".join(r.input for r in app.test[:3]), RouteDecision(((KEYS[0], 1.0),), "fixed", version),
                         8)
    short = GenerationJob(app.test[0].input, RouteDecision(((KEYS[1], 1.0),), "fixed", version), 4)
    bad = GenerationJob(short.text, RouteDecision(((KEYS[1], float("nan")),), "fixed", version), 4)
    generator = serve.run(Generator.bind(args), name="one-slot", route_prefix=None)

    def answer(job: GenerationJob):
        try:
            return generator.generate.remote(job).result()
        except ValueError as e:
            return e

    try:
        with ThreadPoolExecutor(3) as pool:
            got_long, got_short, got_bad = pool.map(answer, (long, short, bad))
        alone = [answer(job).text for job in (long, short)]
        info = generator.info.remote().result()
    finally:
        serve.delete("one-slot")
    assert isinstance(got_bad, ValueError) and "finite" in str(got_bad)
    assert [got_long.text, got_short.text] == alone
    assert info["running"] == info["waiting"] == 0 and info["kv_blocks_free"] == info["kv_blocks"]


def test_streaming_over_grpc_equals_the_unary_answer(served):
    client, catalog, test = served
    text = test[1].input
    whole = client.generate(text, task=KEYS[0], max_new_tokens=8)
    chunks = list(client.generate_stream(text, task=KEYS[0], max_new_tokens=8))
    assert "".join(c.text for c in chunks) == whole.text and len(chunks) >= 2
    last = chunks[-1]
    assert last.finish_reason == whole.finish_reason and last.new_tokens == whole.new_tokens
    assert last.decision.catalog_version == catalog.version and last.decision.tasks[0].task == KEYS[0]
    assert last.prompt_tokens == whole.prompt_tokens > 0 and 0 < last.ttft_ms <= last.total_ms
    assert not any(c.finish_reason for c in chunks[:-1])
    if len(whole.text) > 3:   # a stop string taken from the answer: never streamed, not even in part
        stop = whole.text[1:3]
        cut = list(client.generate_stream(text, task=KEYS[0], max_new_tokens=8, stop=[stop]))
        assert "".join(c.text for c in cut) == whole.text[:whole.text.find(stop)]
        assert cut[-1].finish_reason == "stop"


def test_seeded_sampling_over_grpc_is_reproducible(served):
    client, _, test = served
    kw = dict(task=KEYS[1], max_new_tokens=8, sampling_temperature=1.5, top_p=0.95, seed=11)
    assert client.generate(test[2].input, **kw).text == client.generate(test[2].input, **kw).text


@pytest.mark.parametrize("kwargs, code, message", [
    (dict(text=" "), grpc.StatusCode.INVALID_ARGUMENT, "text is empty"),
    (dict(task="fin/nope"), grpc.StatusCode.NOT_FOUND, "unknown task 'fin/nope'"),
    (dict(sampling_temperature=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    (dict(top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
    (dict(text="The patient weighs 7 kg. " * 200), grpc.StatusCode.INVALID_ARGUMENT, "the base model's context is"),
])
def test_stream_errors_keep_their_status_codes(served, kwargs, code, message):
    client, _, _ = served
    text = kwargs.pop("text", "The patient weighs 7 kg.")
    with pytest.raises(grpc.RpcError) as err:
        list(client.generate_stream(text, **kwargs))
    assert err.value.code() == code
    assert message in err.value.details() and "Traceback" not in err.value.details()


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


def test_the_selector_deployment_routes_each_request_on_its_catalogs_selector(app, tiny_base):
    """A canary candidate with an updated selector is judged on its own selector: the Selector replica
    loads a named catalog's selector beside the served one, and each request's decision names its catalog."""
    from ray import serve

    from routing.decision import RouteRequest
    from serve_app.contract import APP_NAME

    updated, _ = train_selector(app.catalog, _pick("train"), app.work / "catalog-selector-2", tiny_base, per_task=10,
                                train=TrainSpec(max_steps=10, seed=1), progress=False)
    assert updated.version != app.catalog.version
    selector = serve.get_deployment_handle("Selector", APP_NAME)
    request = RouteRequest(app.test[0].input, top_k=2)
    on = lambda root: selector.route.remote(request, root).result().catalog_version  # noqa: E731
    assert on(str(updated.root)) == updated.version
    assert on(None) == on(str(app.catalog.root)) == app.catalog.version


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


# ---- OpenAI-compatible HTTP -------------------------------------------------------------------------

@pytest.fixture
def http_base(app) -> str:
    return f"http://127.0.0.1:{app.config['http_options']['port']}/v1"


def test_openai_models_and_completions_match_grpc(app, http_base):
    from openai import OpenAI

    oa = OpenAI(base_url=http_base, api_key="unused", max_retries=0)
    models = oa.models.list()
    assert [m.id for m in models.data] == ["auto", *sorted(KEYS)]
    assert {m.model_extra["parent"] for m in models.data} == {app.catalog.base_model["id"]}
    text = app.test[3].input
    grpc_reply = app.client.generate(text, max_new_tokens=6)
    raw = oa.completions.with_raw_response.create(model="auto", prompt=text, max_tokens=6)
    done = raw.parse()
    assert done.choices[0].text == grpc_reply.text
    assert done.usage.completion_tokens == grpc_reply.new_tokens and done.usage.prompt_tokens == grpc_reply.prompt_tokens
    routed = grpc_reply.decision.tasks[0].task
    assert done.model_extra["switchboard"]["decision"]["tasks"][0]["task"] == routed
    assert raw.headers["x-switchboard-route"].startswith(f"{routed}=")
    assert raw.headers["x-switchboard-catalog-version"] == app.catalog.version
    chunks = list(oa.completions.create(model=routed, prompt=text, max_tokens=6, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == grpc_reply.text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and chunks[-1].usage.total_tokens > 0


def test_openai_chat_streams_and_fuses(app, http_base):
    from openai import OpenAI

    oa = OpenAI(base_url=http_base, api_key="unused", max_retries=0)
    text = app.test[5].input
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]
    whole = oa.chat.completions.create(model=KEYS[2], messages=messages, max_tokens=6)
    # the tiny base has no chat template: the user's message goes through the task's template
    assert whole.choices[0].message.content == app.client.generate(text, task=KEYS[2], max_new_tokens=6).text
    pieces = list(oa.chat.completions.create(model=KEYS[2], messages=messages, max_tokens=6, stream=True))
    assert pieces[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == whole.choices[0].message.content
    fused = oa.chat.completions.create(model="auto", messages=messages, max_tokens=4,
                                       extra_body={"top_k": 3, "routing_temperature": 1.0})
    tasks = fused.model_extra["switchboard"]["decision"]["tasks"]
    assert len(tasks) == 3 and abs(sum(t["weight"] for t in tasks) - 1) < 1e-5


@pytest.mark.parametrize("body, status, param, fragment", [
    (b'{"model": "auto", "prompt": "x"', 400, None, "not valid JSON"),
    (b'[1, 2]', 400, None, "JSON object"),
    (b'{"model": "fin/nope", "prompt": "hello there"}', 404, "model", "does not exist"),
    (b'{"model": "auto", "prompt": "hello", "max_tokens": 0}', 400, "max_tokens", "greater than or equal to 1"),
    (b'{"model": "auto", "prompt": "hello", "n": 2}', 400, "n", "1"),
    (b'{"model": "auto", "prompt": "hello", "temperature": -1}', 400, "temperature", "greater than or equal"),
    (b'{"model": "auto", "prompt": "   "}', 400, None, "text is empty"),
    (b'{"model": "auto"}', 400, "prompt", "Field required"),
    (b'{"model": "med/dose", "prompt": "hello", "top_k": 2}', 400, "top_k", "use model 'auto'"),
])
def test_openai_errors_are_error_objects(http_base, body, status, param, fragment):
    import httpx

    reply = httpx.post(f"{http_base}/completions", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == status
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert fragment in error["message"] and "Traceback" not in reply.text


def test_unknown_http_paths_are_error_objects(http_base):
    import httpx

    reply = httpx.get(f"{http_base}/engines")
    assert reply.status_code == 404 and "error" in reply.json()


def test_a_full_queue_is_refused_with_resource_exhausted(app):
    """One running sequence and one waiting at most: of five requests at once, some are refused with the
    retryable overload error (RESOURCE_EXHAUSTED / HTTP 429), the others answered."""
    from ray import serve

    from serve_app.contract import OverloadedError

    args = {"catalog": str(app.catalog.root), "max_num_seqs": 1, "max_queued_requests": 1}
    job = GenerationJob(app.test[0].input, RouteDecision(((KEYS[0], 1.0),), "fixed", app.catalog.version), 16)
    generator = serve.run(Generator.bind(args), name="tight", route_prefix=None)

    def answer(i: int):
        try:
            return generator.generate.remote(GenerationJob(job.text, job.decision, 16, stop=("never",))).result()
        except OverloadedError as e:
            return e

    try:
        with ThreadPoolExecutor(5) as pool:
            got = list(pool.map(answer, range(5)))
    finally:
        serve.delete("tight")
    refused = [g for g in got if isinstance(g, OverloadedError)]
    assert refused and len(refused) < 5 and "retry later" in str(refused[0])


def test_eval_generation_over_grpc_answers_as_the_engine_does_in_process(app, capsys, tmp_path):
    """`eval generation --endpoint` against the running app: base and oracle render the query's own
    task template on either path, so their answers (and scores) are the in-process engine's; the
    selector mode is served by the app's Selector deployment and runs in-process from the catalog."""
    import json

    from serve_app.cli import main
    from training.records import write_jsonl

    data = write_jsonl(app.test[::10], tmp_path / "test.jsonl")
    results = {}
    for where, extra in (("grpc", ["--endpoint", f"127.0.0.1:{app.config['grpc_options']['port']}"]),
                         ("in-process", [])):
        code = main(["eval", "generation", "--catalog", str(app.catalog.root), "--data", str(data),
                     "--modes", "base,oracle,routed,fused,selector", *extra])
        out, err = capsys.readouterr()
        assert code == 0, err
        results[where] = json.loads(out.strip().splitlines()[-1])
    for mode in ("base", "oracle"):
        assert {k: r[mode] for k, r in results["grpc"]["per_task"].items()} == \
               {k: r[mode] for k, r in results["in-process"]["per_task"].items()}
    for mode in ("base", "oracle"):
        assert {k: s[mode] for k, s in results["grpc"]["samples"].items()} == \
               {k: s[mode] for k, s in results["in-process"]["samples"].items()}
