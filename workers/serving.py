"""Reverie's online serving on Ray Serve: a thin HTTP gateway and sticky, batching model replicas.

    client ──HTTP──▶ ReverieGateway (FastAPI ingress: parse + validate, 4xx on bad input)
                        │ handle.options(multiplexed_model_id=user_id)
                        ▼
                     ReverieModel replicas (each: ServingEngine = model + LRU of user states)

Sticky users: the gateway tags every call with the user id as Serve's multiplexed model id, so
Serve's router sends a user to the replica that already holds that user's FastState. Concurrent
calls on a replica are gathered by `@serve.batch` and answered by one `generate_batch`. All real
work (state LRU, store, hot-swap, deltas, experience log) is in `workers.serving_engine` and
request validation in `workers.serving_api`, both usable without Ray.

Run: `serve run infra/serve.yaml`, `serve deploy infra/serve.yaml`, or `reverie serve`.
"""


import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import context as serve_context
from ray.serve.handle import DeploymentHandle

from workers.serving_api import (
    GenerateRequest,
    RequestError,
    ServingLimits,
    parse_generate_request,
    parse_reset_request,
    validate_user_id,
)
from workers.serving_engine import ServingConfig, ServingEngine

log = logging.getLogger(__name__)

# Serve's multiplexing table only routes (it caches user ids, not states), so it is sized well above
# any state LRU: the memory bound is ServingConfig.users_per_replica, enforced by the engine, and a
# user beyond it stays routed here and is reloaded from the fast-state store on return.
ROUTED_USERS_PER_REPLICA = 65_536
# How long a batch waits to fill. While a batch computes, the engine thread holds the GIL most of
# the time and the replica's event loop takes in arriving requests slowly; the wait is when it
# catches up. Measured (bench/serve_load.py, 16 users, tiny, 2 CPUs): 10 ms gave batches of ~1.5
# requests and 7.5 req/s, 50 ms ~5 and 20 req/s, 100 ms ~9 and 29 req/s. A lone user pays it once per turn.
BATCH_WAIT_TIMEOUT_S = 0.05


@contextlib.contextmanager
def _without_multiplexed_id() -> Iterator[None]:
    """Hide this request's multiplexed model id from `@serve.batch` while it queues.

    Serve (2.55) splits every batch by multiplexed model id and runs the pieces side by side, so
    with one id per user no two users would ever share a `generate_batch`. The id has already done
    its job (routing the user to this replica) when the request gets here. Serve exposes no public
    switch for this, hence its context variable; tests/test_serving.py checks that batches form.
    """
    context = serve_context._get_serve_request_context()
    token = serve_context._serve_request_context.set(dataclasses.replace(context, multiplexed_model_id=""))
    try:
        yield
    finally:
        serve_context._serve_request_context.reset(token)


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.5},
                  health_check_period_s=2, graceful_shutdown_timeout_s=5)
class ReverieModel:
    """One replica: owns a ServingEngine; one method per engine operation."""

    def __init__(self, config: ServingConfig, max_batch_size: int = 16,
                 batch_wait_timeout_s: float = BATCH_WAIT_TIMEOUT_S) -> None:
        context = serve.get_replica_context()
        replica_id = getattr(getattr(context, "replica_id", None), "unique_id", None) or "replica"
        self.engine = ServingEngine(config, replica_id=replica_id)
        self._generate_batch.set_max_batch_size(max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.multiplexed(max_num_models_per_replica=ROUTED_USERS_PER_REPLICA)
    async def _pin_user(self, user_id: str) -> str:
        """Registers the user with Serve's router (stickiness); the state itself lives in the engine."""
        return user_id

    async def generate(self, request: GenerateRequest) -> dict[str, Any]:
        await self._pin_user(serve.get_multiplexed_model_id())
        with _without_multiplexed_id():
            result = await self._generate_batch(request)
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S)
    async def _generate_batch(self, requests: list[GenerateRequest]) -> list[dict[str, Any] | Exception]:
        return await asyncio.to_thread(self.engine.serve_batch, requests)

    async def reset(self, user_id: str) -> dict[str, Any]:
        await self._pin_user(serve.get_multiplexed_model_id())
        return await asyncio.to_thread(self.engine.reset, user_id)

    async def user_info(self, user_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.engine.user_info, user_id)

    async def health(self) -> dict[str, Any]:
        return self.engine.health()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


api = FastAPI(title="Reverie", description="Byte-level LM with per-user fast memory")


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class ReverieGateway:
    """HTTP routes: validate, route to the user's replica, map failures to status codes."""

    def __init__(self, model: DeploymentHandle, limits: ServingLimits) -> None:
        self.model = model
        self.limits = limits

    def _for_user(self, user_id: str) -> DeploymentHandle:
        return self.model.options(multiplexed_model_id=user_id)

    async def _call(self, response):
        try:
            return await response
        except RequestError as error:
            return _error(error.message, error.status)
        except Exception as error:  # a replica died or the store failed: retryable, the client's input was fine
            log.warning("model call failed: %s", error)
            return _error(f"the model replica could not serve this request ({type(error).__name__}); retry", 503)

    @api.post("/v1/generate")
    async def generate(self, request: Request):
        try:
            parsed = parse_generate_request(await request.body(), self.limits)
        except RequestError as error:
            return _error(error.message, error.status)
        return await self._call(self._for_user(parsed.user_id).generate.remote(parsed))

    @api.post("/v1/reset")
    async def reset(self, request: Request):
        try:
            user_id = parse_reset_request(await request.body(), self.limits)
        except RequestError as error:
            return _error(error.message, error.status)
        return await self._call(self._for_user(user_id).reset.remote(user_id))

    @api.get("/v1/users/{user_id:path}")
    async def user(self, user_id: str):
        try:
            validate_user_id(user_id, self.limits)
        except RequestError as error:
            return _error(error.message, error.status)
        return await self._call(self._for_user(user_id).user_info.remote(user_id))

    @api.get("/healthz")
    async def healthz(self):
        return await self._call(self.model.health.remote())


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Serve application builder (`import_path: workers.serving:build_app` in infra/serve.yaml).

    args: ServingConfig fields, plus num_replicas, num_gpus (per replica; pair it with device: cuda),
    max_batch_size and batch_wait_timeout_s.
    """
    args = dict(args or {})
    num_replicas = int(args.pop("num_replicas", 1))
    num_gpus = float(args.pop("num_gpus", 0))
    max_batch_size = int(args.pop("max_batch_size", 16))
    batch_wait_timeout_s = float(args.pop("batch_wait_timeout_s", BATCH_WAIT_TIMEOUT_S))
    config = ServingConfig.from_dict(args)
    if num_gpus and not config.device.startswith("cuda"):
        raise ValueError(f"num_gpus={num_gpus} reserves GPUs that device={config.device!r} would not use; set device: cuda")
    model = ReverieModel.options(num_replicas=num_replicas, ray_actor_options={"num_cpus": 0.5, "num_gpus": num_gpus})
    model = model.bind(config, max_batch_size, batch_wait_timeout_s)
    return ReverieGateway.bind(model, config.limits)


def serve_forever(app_args: dict[str, Any], host: str, port: int, ray_address: str | None, num_cpus: int,
                  on_ready=print) -> None:
    """Start or join Ray, deploy the app on host:port, and block until interrupted (`reverie serve`)."""
    import time

    import ray

    if ray_address:
        ray.init(address=ray_address)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(app_args), name="reverie", route_prefix="/")
    on_ready(f"reverie serving on http://{host}:{port}; Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
