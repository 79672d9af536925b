"""`switchboard …`: parse arguments, call one library function, print its JSON as the last stdout line.

Progress and human-readable reports go to stderr; bad input exits with status 2 and a message that
names the file, line and field (never a traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

from training.accelerator import use_cpu_deepspeed_without_cuda

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Bad input (ValueError and its kin: RecordError, CatalogError, pydantic's ValidationError) and paths
# that cannot be read or written where the user pointed (these OSErrors name the path). Other OSErrors
# (a full disk, a lost connection) are not the user's input and keep their traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError,
                                                NotADirectoryError, PermissionError)


def emit(result: dict) -> None:
    """The machine-readable result: always the last line on stdout."""
    print(json.dumps(result, ensure_ascii=False, default=str), flush=True)


def _new_file(flag: str, path: str, suffix: str | None = None) -> None:
    """Refuse an output file path that is a directory, sits under a file, or has the wrong suffix."""
    p = Path(path)
    if suffix and p.suffix.lower() != suffix:
        raise ValueError(f"{flag} {path}: expected a {suffix} file name")
    if p.is_dir():
        raise ValueError(f"{flag} {path}: is a directory; give a file name")
    if any(parent.exists() and not parent.is_dir() for parent in p.parents):
        raise ValueError(f"{flag} {path}: a parent of it is a file, not a directory")


def _positive(value: str) -> int:
    """argparse type: an integer >= 1."""
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _port(value: str) -> int:
    """argparse type: a TCP port."""
    n = int(value)
    if not 1 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port in 1..65535, got {n}")
    return n


def _seed(value: str) -> int:
    """argparse type: a seed every library here accepts (FAISS takes a C int)."""
    n = int(value)
    if not -(2**31) <= n < 2**31:
        raise argparse.ArgumentTypeError(f"must be a 32-bit integer, got {n}")
    return n


def _base_model(spec: str) -> tuple[str, Path]:
    from training.base_model import resolve_base_model

    return spec, resolve_base_model(spec)


def cmd_demo(a: argparse.Namespace) -> dict:
    from .demo import run_demo

    return run_demo(base_model=a.base_model, workdir=Path(a.workdir), grpc_port=a.grpc_port)


def cmd_train_adapter(a: argparse.Namespace) -> dict:
    if a.config and a.multitask:
        raise ValueError("train adapter: --multitask takes --tasks and --out, not --config")
    if a.config:
        from training.distributed import train_from_config
        from training.run_config import load_run_config

        return train_from_config(load_run_config(a.config))
    if not (a.tasks and a.out):
        raise ValueError("train adapter: give --config FILE, or --tasks and --out")
    from training.adapter import LoraSpec, TrainSpec, train_adapters, train_multitask
    from training.records import load_records

    records = load_records(a.tasks, a.files)
    lora = LoraSpec(variant=a.variant, r=a.r, alpha=a.alpha)
    name, base = _base_model(a.base_model)
    train = TrainSpec(device=a.device, dtype=a.dtype)
    if a.multitask:
        keys = sorted({r.key for r in records if not a.task or r.key in a.task})
        out = train_multitask(base, [r for r in records if r.key in keys], Path(a.out), lora=lora, train=train,
                              text_mode=a.text)
        return {"base_model": name, "multitask": str(out), "tasks": keys}
    done = train_adapters(base, records, Path(a.out), lora=lora, train=train, tasks=a.task or None, text_mode=a.text)
    return {"base_model": name, "adapters": {k: str(p) for k, p in done.items()}}


def cmd_sweep(a: argparse.Namespace) -> dict:
    from training.distributed import ray_session
    from training.run_config import load_sweep_config
    from training.sweep import run_sweep

    from .launch import cluster_dashboard_url, dashboard_notice

    if a.submit:
        from training.submit import submit_sweep

        address = a.address or os.environ.get("RAY_ADDRESS")
        if not address:
            raise ValueError("--submit needs the cluster's dashboard address: --address http://HOST:8265 "
                             "(or $RAY_ADDRESS)")
        load_sweep_config(a.config)   # a bad config is refused here, not after the job starts
        print(dashboard_notice(address if "://" in address else f"http://{address}"), file=sys.stderr)
        return submit_sweep(a.config, address, follow=a.wait)
    config = load_sweep_config(a.config)
    with ray_session(dashboard=config.dashboard):   # the sweep's own session: it sees Ray already started
        url = cluster_dashboard_url()
        if url:
            print(dashboard_notice(url), file=sys.stderr)
        return run_sweep(config)


def cmd_catalog_build(a: argparse.Namespace) -> dict:
    from training.catalog_build import build_catalog
    from training.records import load_records

    records = load_records(a.tasks, a.files)
    base = _base_model(a.base_model) if a.adapters else None
    encoder = None
    if a.encoder:
        from routing.encoder import Encoder

        encoder = Encoder(str(Path(a.encoder).resolve()))
    if a.pseudo_tasks:
        from training.pseudo_catalog import build_pseudo_task_catalog

        if not a.adapters:
            raise ValueError("--pseudo-tasks needs --adapters: a pool of candidate adapters to pair the clusters with")
        catalog, report = build_pseudo_task_catalog(records, a.out, a.pseudo_tasks, a.adapters, base,
                                                    text_mode=a.text, encoder=encoder,
                                                    calibrate_tau=not a.no_calibrate)
        return {**_catalog_summary(catalog), **report}
    catalog = build_catalog(records, a.out, adapters=a.adapters, base_model=base, text_mode=a.text, per_task=a.per_task,
                            encoder=encoder, metrics=a.metric or [], calibrate_tau=not a.no_calibrate,
                            multitask=a.multitask)
    return _catalog_summary(catalog)


def _catalog_summary(catalog) -> dict:
    return {"catalog": str(catalog.root), "version": catalog.version, "base_model": catalog.base_model,
            "encoder": catalog.encoder, "routers": sorted(catalog.routers), "parent": catalog.parent,
            "calibration": catalog.calibration, "multitask": catalog.multitask,
            "tasks": {k: {"adapter": t.adapter, "lora": t.lora, "metric": t.metric} for k, t in catalog.tasks.items()}}


def cmd_catalog_show(a: argparse.Namespace) -> dict:
    from routing.catalog import Catalog

    return _catalog_summary(Catalog.load(a.catalog))


def cmd_eval_routing(a: argparse.Namespace) -> dict:
    from tqdm import tqdm

    from routing.catalog import Catalog
    from routing.encoder import Encoder
    from routing.evaluation import evaluate_routing, plot_confusion
    from routing.routers import make_router
    from training.records import load_records

    if a.plot:
        _new_file("--plot", a.plot, ".png")
    regime = "ood" if a.ood else a.regime
    catalog = Catalog.load(a.catalog)
    records = load_records(a.data, a.files)
    unknown = sorted({r.key for r in records} - set(catalog.tasks))
    if unknown:
        raise ValueError(f"{a.data}: tasks {unknown} are not in catalog {catalog.version}")
    mode = a.text or catalog.encoder["text_mode"]
    encoder = Encoder(catalog.encoder["name"], catalog.encoder["prefix"])
    texts, keys = [r.text(mode) for r in records], [r.key for r in records]
    if regime != "non-ood":
        from training.ood_evaluation import evaluate_regime

        train = load_records(a.train, a.files) if a.train else []
        return evaluate_regime(catalog, a.router, texts, keys, regime, embed=encoder.encode, train_records=train,
                               folds=a.folds, text_mode=mode, top_k=a.top_k)
    router = make_router(a.router, catalog)
    with tqdm(total=len(records), desc=f"routing ({router.name})", file=sys.stderr) as bar:
        result = evaluate_routing(router, texts, keys, top_k=a.top_k, embed=encoder.encode, progress=bar.update)
    result["router"] = router.name   # what `auto` resolved to
    if a.plot:
        result["plot"] = str(plot_confusion(result, a.plot))
    return result


def cmd_eval_generation(a: argparse.Namespace) -> dict:
    import tempfile

    from routing.catalog import Catalog
    from training import generation_eval as ge
    from training.records import load_records

    if a.plot:
        _new_file("--plot", a.plot, ".png")
    catalog = Catalog.load(a.catalog)
    modes = ge.parse_modes(a.modes)
    ge.check_modes(catalog, modes, endpoint=bool(a.endpoint), ood=a.ood)
    records = load_records(a.data, a.files)
    ge.check_records(catalog, records, a.data)
    records = ge.limit_per_task(records, a.limit_per_task)
    with tempfile.TemporaryDirectory(prefix="sb-eval-") as tmp:
        if a.endpoint:
            from .client import SwitchboardClient

            with SwitchboardClient(a.endpoint) as client:
                result = ge.evaluate_generation(catalog, records, modes, _endpoint_answerer(client, catalog,
                                                                                           a.long_answer_tokens))
        else:
            import torch

            from routing.devices import resolve_placement

            where = resolve_placement(a.device, a.dtype, gpu_assigned=torch.cuda.is_available(), who="eval generation")
            answerer = ge.InProcessAnswerer(catalog, Path(a.work or tmp), ood=a.ood,
                                            long_answer_tokens=a.long_answer_tokens,
                                            max_prompt_tokens=a.max_prompt_tokens, placement=where)
            result = ge.evaluate_generation(catalog, records, modes, answerer, ood=a.ood)
    print(ge.format_table(result), file=sys.stderr)
    if a.plot:
        result["plot"] = str(ge.plot_table(result, a.plot))
    return result


def _endpoint_answerer(client, catalog, long_answer_tokens: int):
    """`eval generation`'s answers from a running app over gRPC, CONCURRENCY requests in flight so its
    engine batches them; the app routes and renders the routed task's template itself."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from training.generation_eval import FUSED_TOP_K, answer_budget

    options = {"base": dict(router="fixed", base_only=True), "oracle": dict(router="fixed"), "routed": dict(top_k=1),
               "fused": dict(top_k=FUSED_TOP_K), "selector": dict(router="selector", top_k=1)}

    def answer(mode: str, records: list) -> list[str]:
        def one(r) -> str:
            budget, stop = answer_budget(catalog.tasks[r.key].metric, long_answer_tokens)
            extra = {"task": r.key} if options[mode].get("router") == "fixed" else {}
            return client.generate(r.text(catalog.encoder["text_mode"]), max_new_tokens=budget, stop=list(stop),
                                   **options[mode], **extra).text

        with ThreadPoolExecutor(16) as pool:
            return list(tqdm(pool.map(one, records), total=len(records), desc=mode, file=sys.stderr))

    return answer


def _interrupt(signum: int, frame) -> None:
    """SIGTERM (what Kubernetes and `docker stop` send) ends `serve` like Ctrl-C: by draining."""
    raise KeyboardInterrupt


def cmd_serve(a: argparse.Namespace) -> dict:
    import signal
    import time

    from routing.base_models import locate_base_model
    from routing.catalog import Catalog

    from . import launch
    from .config import AppArgs

    # Refuse what would fail inside the replicas here, before Ray starts: the catalog, the app's args,
    # the base model the catalog's adapters were trained on.
    catalog = Catalog.load(a.catalog)
    args = {"catalog": str(Path(a.catalog).resolve())}
    if a.base_model:
        args["base_model"] = str(_base_model(a.base_model)[1])
    config = launch.load_config(a.config or launch.DEFAULT_CONFIG, args, grpc_port=a.grpc_port, http_port=a.http_port)
    app_args = AppArgs(**config["applications"][0]["args"])
    if catalog.base_model is not None:
        locate_base_model(catalog.base_model["id"], app_args.base_model)
    signal.signal(signal.SIGTERM, _interrupt)
    running = False
    try:
        url = launch.start(config, address=a.address, dashboard_port=a.dashboard_port)
        running = True
        signal.signal(signal.SIGTERM, _interrupt)   # ray.init installs its own handler; ours drains
        if url:
            print(launch.dashboard_notice(url), file=sys.stderr)
        port = config["grpc_options"].get("port", 9000)   # Serve's default
        print(f"serving catalog {a.catalog} on gRPC port {port}; Ctrl-C or SIGTERM drains and stops", file=sys.stderr)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second SIGTERM must not cut the drain short
        if not running:   # stopped while starting: nothing was served yet
            launch.stop()
            return {"stopped": True, "drained": False}
        return {"stopped": True, **launch.drain(config, timeout_s=a.drain_timeout)}


def cmd_canary(a: argparse.Namespace) -> dict:
    from .canary import commands
    from .canary.state import RolloutStore

    if a.endpoint:
        return _canary_over_admin(a)
    store = RolloutStore(a.state or commands.default_state_path())
    if a.verb == "start":
        return commands.start(store, a.catalog, a.policy, a.stable)
    if a.verb == "status":
        return commands.status(store)
    return commands.command(store, a.verb)


def _canary_over_admin(a: argparse.Namespace) -> dict:
    """The same verb on a running app, through its Admin gRPC service (the token from $SWITCHBOARD_ADMIN_TOKEN)."""
    import grpc

    from .admin import TOKEN_ENV, AdminClient

    token = os.environ.get(TOKEN_ENV)
    if not token:
        raise ValueError(f"--endpoint needs the app's admin token in ${TOKEN_ENV}")
    if a.verb == "start" and (a.stable or a.state):
        raise ValueError("--stable and --state are the state file's: with --endpoint the app knows what it serves")
    if a.verb != "start" and a.state:
        raise ValueError("--state and --endpoint: one or the other")
    with AdminClient(a.endpoint, token) as admin:
        try:
            if a.verb == "start":
                return admin.start(str(Path(a.catalog).resolve()) if Path(a.catalog).exists() else a.catalog,
                                   Path(a.policy).read_text(encoding="utf-8"))
            return admin.status() if a.verb == "status" else admin.command(a.verb)
        except grpc.RpcError as e:
            raise ValueError(f"{a.endpoint}: {e.code().name}: {e.details()}") from None


def cmd_data_select(a: argparse.Namespace) -> dict:
    from training.records import load_records, write_jsonl
    from training.selection import select_representatives

    _new_file("--out", a.out)
    base = _base_model(a.base_model)[1] if a.embed == "base-embeddings" else None
    selected, report = select_representatives(load_records(a.tasks, a.files), a.per_task, how=a.embed,
                                              metric=a.metric, text_mode=a.text, seed=a.seed, base_model_path=base)
    write_jsonl(selected, a.out)
    return {"out": a.out, "n": len(selected), "per_task": report}


def cmd_train_router(a: argparse.Namespace) -> dict:
    from routing.catalog import Catalog
    from training.records import load_records

    catalog, records = Catalog.load(a.catalog), load_records(a.tasks, a.files)
    if a.kind in ("classifier", "lexical"):
        from training import router_training

        train = router_training.train_classifier if a.kind == "classifier" else router_training.train_lexical
        new, report = train(catalog, records, a.out, text_mode=a.text), {}
    else:
        from training.selector import train_selector

        new, report = train_selector(catalog, records, a.out, _base_model(a.base_model)[1], per_task=a.per_task,
                                     embed=a.embed, metric=a.metric, prompt=a.prompt, text_mode=a.text)
    return {**_catalog_summary(new), "selection": report}


def cmd_selector_update(a: argparse.Namespace) -> dict:
    from routing.catalog import Catalog
    from training.records import load_records
    from training.selector import UPDATE_FILE, update_selector

    catalog = Catalog.load(a.catalog)
    new_records = load_records(a.tasks, a.files) if a.tasks else []
    base = _base_model(a.base_model)[1] if a.base_model else None   # None: the selector's own, from the cache
    validation = load_records(a.val, a.files) if a.val else []
    new = update_selector(catalog, a.op, a.out, base, ratio=a.ratio, new_records=new_records, delete=a.delete or [],
                          adapters=a.adapters, routing_only=a.routing_only, validation=validation,
                          per_task=a.per_task)
    update = json.loads((new.router_path("selector") / UPDATE_FILE).read_text())
    return {**_catalog_summary(new), "update": update}


def cmd_pair(a: argparse.Namespace) -> dict:
    from routing.catalog import Catalog
    from routing.pairing import HalvingConfig
    from training.pairing import pair_catalog
    from training.records import load_records

    config = HalvingConfig(base_samples=a.m, keep=a.eta, growth=a.gamma, warmup=a.warmup, rounds=a.rounds,
                           budget=a.budget, seed=a.seed)
    return pair_catalog(Catalog.load(a.catalog), a.pool, load_records(a.data, a.files), a.out, config=config,
                        strict=a.strict)[1]


def build_parser() -> argparse.ArgumentParser:
    from routing.decision import MAX_TOP_K

    p = argparse.ArgumentParser(prog="switchboard", description="One endpoint for a base LLM and many LoRA adapters.")
    sub = p.add_subparsers(dest="command", required=True)
    text = dict(choices=["input", "instruction+input"], help="what a query's text is made of")
    base = dict(default="tiny", help="tiny | tiny-test | smollm2 | a Hugging Face model directory")
    files = dict(metavar="GLOB", help="in a <domain>/<task>/ tree, read only these files (e.g. 'train*.jsonl'); "
                                      "by default all *.jsonl, refused when test*.jsonl sit beside others")

    def command(name: str, fn: Callable, help: str, parent=sub) -> argparse.ArgumentParser:
        c = parent.add_parser(name, help=help, description=help)
        c.set_defaults(fn=fn)
        return c

    c = command("demo", cmd_demo, "corpus, base model, adapters, catalog, Serve app, gRPC evaluation, report")
    c.add_argument("--base-model", **base)
    c.add_argument("--workdir", default="runs/demo")
    c.add_argument("--grpc-port", type=_port, default=9000)

    train = sub.add_parser("train", help="train adapters or routers").add_subparsers(dest="what", required=True)
    c = command("adapter", cmd_train_adapter, "train one LoRA adapter per task into OUT/<domain>/<task>", train)
    c.add_argument("--config", help="a run config, YAML or JSON (training/run_config.py: variant, workers, "
                                     "deepspeed, ...); replaces the flags below")
    c.add_argument("--tasks", help="records: JSONL, JSON, AS config or <domain>/<task>/ tree")
    c.add_argument("--files", **files)
    c.add_argument("--task", action="append", help="only this task key (repeatable); default: every task")
    c.add_argument("--out")
    c.add_argument("--base-model", **base)
    c.add_argument("--text", default="input", **text)
    c.add_argument("--variant", default="lora", choices=["lora", "rslora", "dora", "pissa"])
    c.add_argument("--r", type=int, default=8)
    c.add_argument("--alpha", type=int, default=16)
    c.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: the GPU when there is one, else the CPU")
    c.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bf16 mixed precision on GPU, fp32 on CPU")
    c.add_argument("--multitask", action="store_true",
                   help="one adapter on all the tasks' records together into OUT (the papers' multi-task baseline; "
                        "`catalog build --multitask OUT` carries it)")

    c = command("router", cmd_train_router, "train a router into a new catalog version", train)
    c.add_argument("--kind", required=True, choices=["selector", "classifier", "lexical"],
                   help="classifier: the fine-tuned encoder and the lexical model (what `ensemble` needs); "
                        "lexical: the n-gram model alone (seconds); selector: the AS selector LoRA")
    c.add_argument("--catalog", required=True)
    c.add_argument("--tasks", required=True, help="training records of the catalog's tasks")
    c.add_argument("--files", **files)
    c.add_argument("--out", required=True, help="the new catalog directory")
    c.add_argument("--base-model", **base)
    c.add_argument("--text", default="input", **text)
    c.add_argument("--per-task", type=_positive, default=100, help="selector: K-means representatives per task")
    c.add_argument("--embed", default="encoder", choices=["encoder", "base-embeddings"],
                   help="selector: what the K-means selection clusters (base-embeddings: the base LM's embedding "
                        "layer, the AS paper's way); recorded, and reused by `selector update`")
    c.add_argument("--metric", default="cos", choices=["l2", "ip", "cos"],
                   help="selector: the K-means distance (recorded, and reused by `selector update`)")
    c.add_argument("--prompt", default="ours", choices=["ours", "paper"],
                   help="selector: its prompt (paper: AS App. A, with the instruction and the domain and task lists)")

    c = command("sweep", cmd_sweep, "Ray Tune sweep over LoRA variants; best trial per task -> new catalog version")
    c.add_argument("--config", required=True, help="a sweep config, YAML or JSON (examples/sweep-smoke.yaml)")
    c.add_argument("--submit", action="store_true", help="run it as a Ray Job on the cluster at --address (the "
                                                         "config path as the cluster sees it)")
    c.add_argument("--address", help="with --submit: the cluster's dashboard, e.g. http://127.0.0.1:8265 "
                                     "(default: $RAY_ADDRESS)")
    c.add_argument("--wait", action="store_true", help="with --submit: wait for the job to end; print its log")

    data = sub.add_parser("data", help="prepare training data").add_subparsers(dest="what", required=True)
    c = command("select", cmd_data_select, "K-means representative samples per task (AS data construction)", data)
    c.add_argument("--tasks", required=True)
    c.add_argument("--files", **files)
    c.add_argument("--per-task", type=_positive, required=True)
    c.add_argument("--embed", default="encoder", choices=["encoder", "base-embeddings"])
    c.add_argument("--metric", default="cos", choices=["l2", "ip", "cos"])
    c.add_argument("--base-model", **base)
    c.add_argument("--text", default="input", **text)
    c.add_argument("--seed", type=_seed, default=0)
    c.add_argument("--out", required=True)

    sel = sub.add_parser("selector", help="update a trained selector").add_subparsers(dest="what", required=True)
    c = command("update", cmd_selector_update, "add / balance / delete tasks, retaining a ratio of old data", sel)
    c.add_argument("--catalog", required=True)
    c.add_argument("--op", required=True, choices=["add", "balance", "delete"])
    c.add_argument("--ratio", type=float, required=True, help="fraction of the old selection data retained")
    c.add_argument("--tasks", help="records of the tasks to add / balance")
    c.add_argument("--files", **files)
    c.add_argument("--delete", action="append", help="task key to delete (repeatable)")
    c.add_argument("--adapters", help="add: directory with the new tasks' adapters, <domain>/<task>/ each")
    c.add_argument("--routing-only", action="store_true",
                   help="add: the new tasks without adapters (routable labels, not servable)")
    c.add_argument("--val", help="balance: validation records; tasks the selector routes well there are reduced, "
                                 "the others augmented")
    c.add_argument("--out", required=True)
    c.add_argument("--base-model", help="the selector's base model (default: the one it trained on, from the cache)")
    c.add_argument("--per-task", type=_positive,
                   help="representatives per new task (default: what the selector was trained with)")

    c = command("pair", cmd_pair, "Successive Halving: each task's best adapter from a pool -> new catalog version")
    c.add_argument("--catalog", required=True)
    c.add_argument("--pool", required=True, help="directory of candidate adapters")
    c.add_argument("--data", required=True, help="validation records of the catalog's tasks")
    c.add_argument("--files", **files)
    c.add_argument("--out", required=True)
    c.add_argument("--m", type=_positive, default=4, help="base samples per candidate in the first rounds")
    c.add_argument("--eta", type=float, default=0.5, help="keep ratio η in (0, 1) per round")
    c.add_argument("--gamma", type=float, default=2.0, help="sample growth γ > 1 per round after warm-up")
    c.add_argument("--warmup", type=int, default=1, help="warm-up rounds k at the base sample size")
    c.add_argument("--rounds", type=_positive, help="at most R rounds (default: until one candidate is left)")
    c.add_argument("--budget", type=_positive, help="at most this many candidate x sample evaluations per task")
    c.add_argument("--seed", type=_seed, default=0)
    c.add_argument("--strict", action="store_true",
                   help="fail (exit 2, no catalog) when a task's candidates tie at a cut, instead of warning")

    cat = sub.add_parser("catalog", help="build or inspect catalogs").add_subparsers(dest="what", required=True)
    c = command("build", cmd_catalog_build, "build a catalog (routing-only without --adapters)", cat)
    c.add_argument("--tasks", required=True)
    c.add_argument("--files", **files)
    c.add_argument("--out", required=True)
    c.add_argument("--adapters", help="directory of adapters, <domain>/<task>/ each; with --pseudo-tasks, a pool "
                                      "of candidate adapters (any names)")
    c.add_argument("--pseudo-tasks", type=_positive, metavar="K",
                   help="ignore the records' task labels: K-means them into K pseudo-tasks, pair each with its best "
                        "adapter from the --adapters pool by Successive Halving (LoRAuter §4.4)")
    c.add_argument("--base-model", **base)
    c.add_argument("--text", default="input", **text)
    c.add_argument("--per-task", type=_positive, help="samples per task for its centroid (default: all)")
    c.add_argument("--encoder", metavar="DIR", help="a sentence-transformers directory (default: the packaged "
                                                     "all-MiniLM-L6-v2); recorded with a fingerprint checked at load")
    c.add_argument("--metric", action="append", metavar="NAME|TASK=NAME",
                   help="the tasks' metric (exact, first_line, accuracy, rouge_l, bleu), for all tasks or one "
                        "(repeatable); default: inferred from each task's references")
    c.add_argument("--multitask", metavar="DIR", help="a multi-task adapter (`train adapter --multitask`) the "
                                                       "catalog carries for `eval generation --modes multitask`")
    c.add_argument("--no-calibrate", action="store_true",
                   help="LoRAuter's exact rule: τ on raw cosines (default: the centroid router's temperature is "
                        "fitted to this catalog on its index samples, leave-one-out, and recorded)")
    c = command("show", cmd_catalog_show, "validate a catalog and print its manifest", cat)
    c.add_argument("catalog")

    c = command("serve", cmd_serve, "run the Serve app (gRPC) on a catalog until Ctrl-C")
    c.add_argument("--catalog", required=True)
    c.add_argument("--config", default=None, help="Serve config YAML (default: serve_app/serve_config.yaml)")
    c.add_argument("--base-model", help="base model directory (default: found in the cache by the catalog's id)")
    c.add_argument("--grpc-port", type=_port)
    c.add_argument("--http-port", type=_port)
    c.add_argument("--address", help="join this Ray cluster (e.g. 127.0.0.1:6379 or auto; default: $RAY_ADDRESS, "
                                     "else start one here, with the dashboard)")
    c.add_argument("--dashboard-port", type=_port, default=8265, help="of the cluster started here (default 8265)")
    c.add_argument("--drain-timeout", type=float, default=60,
                   help="on SIGTERM / Ctrl-C: seconds to let in-flight requests finish before shutting down")

    can = sub.add_parser("canary", help="roll out a candidate catalog step by step, judged on live traffic")
    verbs = can.add_subparsers(dest="verb", required=True)
    state = dict(help="the rollout's state file (default: $SWITCHBOARD_HOME/canary/switchboard.json, the app's)")
    endpoint = dict(help="HOST:PORT of a running app's gRPC port: act through its Admin service instead of the "
                         "state file (the token in $SWITCHBOARD_ADMIN_TOKEN)")
    c = command("start", cmd_canary, "start a rollout of --catalog under --policy (serve_app/canary/policy.py)", verbs)
    c.add_argument("--catalog", required=True, help="the candidate catalog (verified; same base model and encoder)")
    c.add_argument("--policy", required=True, help="canary policy YAML")
    c.add_argument("--stable", help="the catalog the app serves (default: what the last rollout left serving)")
    c.add_argument("--state", **state)
    c.add_argument("--endpoint", **endpoint)
    for verb, what in (("status", "where the rollout is, and the numbers of its last decision"),
                       ("promote", "move to the next step now"), ("rollback", "send all traffic back to stable"),
                       ("abort", "stop the rollout; stable serves all traffic")):
        c = command(verb, cmd_canary, what, verbs)
        c.add_argument("--state", **state)
        c.add_argument("--endpoint", **endpoint)

    ev = sub.add_parser("eval", help="evaluate routing and answers").add_subparsers(dest="what", required=True)
    c = command("routing", cmd_eval_routing, "routing accuracy of a router on labelled records", ev)
    c.add_argument("--catalog", required=True)
    c.add_argument("--data", required=True)
    c.add_argument("--files", **files)
    c.add_argument("--router", default="auto",
                   help="auto (default): the best the catalog carries, of ensemble, classifier, lexical, centroid; "
                        "or any of those, or selector")
    c.add_argument("--top-k", type=int, default=3, choices=range(1, MAX_TOP_K + 1), metavar=f"1..{MAX_TOP_K}")
    c.add_argument("--text", **text)
    c.add_argument("--regime", default="non-ood", choices=["non-ood", "semi-ood", "ood"],
                   help="LoRAuter's regimes: ood removes each query's task (its validation samples and adapter); a "
                        "trained router is retrained without it, per fold of tasks (needs --train)")
    c.add_argument("--ood", action="store_true", help="short for --regime ood")
    c.add_argument("--train", metavar="DATA", help="ood with a trained router: its training records")
    c.add_argument("--folds", type=_positive, default=3, help="ood with a trained router: task folds retrained")
    c.add_argument("--plot", metavar="FILE.png", help="also write the confusion matrix (true task x top-1 task)")

    c = command("generation", cmd_eval_generation, "answers under each way of combining adapters, scored by each "
                                                   "task's catalog metric (training/generation_eval.py)", ev)
    c.add_argument("--catalog", required=True)
    c.add_argument("--data", required=True, help="test records of the catalog's tasks, with outputs")
    c.add_argument("--files", **files)
    c.add_argument("--modes", default="base,oracle,routed,fused",
                   help="comma-separated, or all: base, oracle, routed, fused, uniform, merged, ties, multitask, selector")
    c.add_argument("--ood", action="store_true", help="leave each query's own adapter out of the pool (LoRAuter's "
                                                      "unseen-task regime)")
    c.add_argument("--limit-per-task", type=_positive, metavar="N", help="only the first N records of each task")
    c.add_argument("--endpoint", metavar="HOST:PORT", help="answer through a running app over gRPC (modes base, "
                                                           "oracle, routed, fused, selector) instead of in-process")
    c.add_argument("--long-answer-tokens", type=_positive, default=128,
                   help="answer budget of tasks scored by rouge_l or bleu (short-answer metrics get 16, to a newline)")
    c.add_argument("--max-prompt-tokens", type=_positive, help="keep only a prompt's last N tokens, as training cuts "
                                                              "long prompts (default: whole prompts)")
    c.add_argument("--work", metavar="DIR", help="where merged adapters are kept for reuse (default: a temp dir)")
    c.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="in-process answers: auto = the GPU when there is one (bf16), else the CPU (fp32)")
    c.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    c.add_argument("--plot", metavar="FILE.png", help="also write the task x mode table as a heatmap")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    use_cpu_deepspeed_without_cuda()
    try:
        emit(args.fn(args))
    except USER_ERRORS as e:
        print(f"switchboard: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
