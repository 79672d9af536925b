"""The Serve application's arguments: validated once, here, and handed to every deployment.

They come from the `args:` block of the Serve config YAML (`serve_app/serve_config.yaml`), the same
file `serve run`, `serve deploy`, `switchboard serve` and the KubeRay RayService use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from routing.catalog import Catalog
from routing.decision import DEFAULT_TEMPERATURE, DEFAULT_TOP_K, MAX_TOP_K, TEMPERATURE_RANGE
from routing.devices import DeviceName, DtypeName

MAX_NEW_TOKENS_LIMIT = 512
MAX_SAMPLING_TEMPERATURE = 100.0


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    catalog: str = Field(description="Catalog directory (absolute path: replicas do not share the caller's cwd).")
    base_model: str | None = Field(None, description="Base model directory; default: the catalog's base model "
                                                     "found in the Switchboard cache ($SWITCHBOARD_HOME/base).")
    default_router: str = Field("auto", description="Router used when a request names none; auto: the best "
                                                    "the catalog carries (ensemble, classifier, lexical, centroid).")
    default_top_k: int = Field(DEFAULT_TOP_K, ge=1, le=MAX_TOP_K, description="Adapters fused when a request names no top_k.")
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=TEMPERATURE_RANGE[0], le=TEMPERATURE_RANGE[1],
                               description="Routing softmax temperature τ by default.")
    max_new_tokens: int = Field(32, ge=1, le=MAX_NEW_TOKENS_LIMIT, description="Answer length by default.")
    batching: Literal["continuous", "static"] = Field(
        "continuous", description="continuous: requests join the running batch at every decoding step; static: a "
                                  "batch runs until its last answer before the next is admitted (a baseline).")
    max_num_seqs: int = Field(32, ge=1, description="Requests decoding together in one Generator step.")
    kv_cache_tokens: int = Field(16384, ge=16, description="KV cache of a Generator replica, in tokens, allocated "
                                 "at start-up; a request reserves its prompt plus max_new_tokens while it runs.")
    prefill_chunk_tokens: int = Field(256, ge=1, description="Prompt tokens prefilled per step: a long prompt is "
                                      "prefilled over several steps while the running requests keep decoding.")
    max_queued_requests: int = Field(256, ge=1, description="Requests waiting in a Generator replica before new "
                                     "ones are refused with RESOURCE_EXHAUSTED (HTTP 429).")
    max_loras: int = Field(16, ge=1, description="Adapters resident in a Generator replica (LRU beyond that).")
    max_lora_rank: int | None = Field(None, ge=1, description="Largest adapter rank a Generator replica takes; "
                                      "default: the catalog's largest. Raise it to switch to catalogs with larger ranks.")
    torch_threads: int = Field(1, ge=1, description="Per replica; replicas share the node's cores.")
    device: DeviceName = Field("auto", description="Where model-holding replicas run: auto = the GPU Ray assigned "
                               "(num_gpus), else the CPU; cuda without CUDA is a start-up error.")
    dtype: DtypeName = Field("auto", description="Model precision: auto = bfloat16 on GPU (float16 where bf16 is "
                             "unsupported), float32 on CPU.")
    canary_state: str | None = Field(None, description="The canary rollout's state file, shared by every replica "
                                     "and the `switchboard canary` verbs; default $SWITCHBOARD_HOME/canary/"
                                     "switchboard.json (on KubeRay: a path on a volume every pod mounts).")
    admin_token: str | None = Field(None, min_length=16, description="What Admin gRPC callers must send as "
                                    "`authorization: Bearer <token>`; unset: $SWITCHBOARD_ADMIN_TOKEN of the replica's "
                                    "process (e.g. from a Kubernetes Secret), else the Admin service refuses every call.")

    @field_validator("catalog")
    @classmethod
    def _catalog_exists(cls, v: str) -> str:
        if not (Path(v) / "catalog.json").is_file():
            raise ValueError(f"{v} is not a catalog directory (no catalog.json)")
        return str(Path(v).resolve())

    @model_validator(mode="after")
    def _defaults_fit(self) -> "AppArgs":
        if self.default_top_k > self.max_loras:
            raise ValueError(f"default_top_k {self.default_top_k} > max_loras {self.max_loras}: a default request "
                             f"would fuse more adapters than a Generator replica holds")
        return self


class LiveConfig(BaseModel):
    """A deployment's Serve `user_config`: what changes on running replicas without restarting them."""

    model_config = ConfigDict(extra="forbid")

    catalog: str = Field(description="Catalog directory to switch to (same base model and encoder).")


def catalog_switch(user_config: dict, current: Catalog) -> Catalog | None:
    """The catalog a replica should switch to on `reconfigure(user_config)`, or None when it already serves it.

    Only catalogs with the replica's base model and encoder can be switched to in place: the base
    model's weights are the Generator's, and the centroids must live in the Embedder's space. A
    different one needs a new deployment (change `args.catalog` instead), so it is refused here.
    """
    try:
        live = LiveConfig(**user_config)
    except ValidationError as e:
        raise ValueError(f"user_config: {e.errors(include_url=False)[0]['msg']} ({sorted(user_config)})") from None
    new = Catalog.load(live.catalog)
    if new.version == current.version:
        return None
    base_id = lambda c: (c.base_model or {}).get("id")  # noqa: E731
    for what, same in (("base model", base_id(new) == base_id(current)), ("encoder", new.encoder == current.encoder)):
        if not same:
            raise ValueError(f"catalog {new.version} has another {what} than the served catalog {current.version}: "
                             f"redeploy with args.catalog instead of switching in place")
    return new
