"""The router's calls to the tiers: the transport they are pinned to, and how a call's
failures reach the pipeline (a lost replica is retried once, a tier's defect is a 500)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc.aio import AioRpcError, Metadata
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve.exceptions import BackPressureError

from serve_app.routing.tier_calls import RayTierCall, RayTiers, ReplicaLost, TierFault


class Handle:
    def options(self, **kwargs: object) -> Handle:
        self.kwargs = kwargs
        return self


def test_tier_calls_are_on_grpc_whatever_the_ray_env_of_the_process_that_built_the_app():
    """Serve fixes a handle's transport where the handle is made; `serve deploy` makes
    them on the cluster (gRPC under `RAY_SERVE_THROUGHPUT_OPTIMIZED`), a test or the
    benchmark in its driver (actor calls): pinned, every deployment runs the same one."""
    premium = Handle()
    RayTiers({"premium": premium})  # type: ignore[dict-item]
    assert premium.kwargs == {"stream": True, "_by_reference": False}


class Raises:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def __anext__(self) -> Any:
        raise self.exc


def task_error() -> RayTaskError:
    try:
        raise ValueError("the tier's code")
    except ValueError as exc:
        return RayTaskError("generate", "traceback", exc)


def rpc_error(code: grpc.StatusCode) -> AioRpcError:
    return AioRpcError(code, Metadata(), Metadata(), details="stream reset")


@pytest.mark.parametrize(
    "exc",
    [
        ActorDiedError(),  # actor calls: the replica's process died
        ActorUnavailableError("unreachable", None),  # gRPC: UNAVAILABLE, however it went
        rpc_error(grpc.StatusCode.INTERNAL),  # gRPC: the stream broke mid-way
        rpc_error(grpc.StatusCode.CANCELLED),  # gRPC: the replica shut its server down
    ],
)
def test_a_broken_replica_or_stream_is_a_lost_replica(exc):
    with pytest.raises(ReplicaLost):
        asyncio.run(RayTierCall(Raises(exc)).__anext__())


@pytest.mark.parametrize(
    "exc",
    [
        task_error(),  # actor calls wrap the tier's exception
        RuntimeError("the tier's code"),  # gRPC hands back the exception itself
    ],
)
def test_an_exception_of_the_tiers_code_is_a_fault(exc):
    with pytest.raises(TierFault):
        asyncio.run(RayTierCall(Raises(exc)).__anext__())


@pytest.mark.parametrize(
    "exc", [StopAsyncIteration(), BackPressureError(num_queued_requests=9, max_queued_requests=8)]
)
def test_the_end_and_serves_own_refusals_pass_through(exc):
    with pytest.raises(type(exc)):
        asyncio.run(RayTierCall(Raises(exc)).__anext__())
