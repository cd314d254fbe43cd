"""Calling a tier: the one place that knows tiers are Ray Serve deployments.

A call is a stream of the tier's messages (`deployments/streaming.py`: the first is `Served`,
then engine outputs). Ray's failures are turned into the two the pipeline acts on: the
replica was lost before answering (worth one retry), or the tier's code raised (a defect).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from grpc.aio import AioRpcError
from ray.exceptions import RayActorError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from deployments.protocol import Endpoint


class ReplicaLost(Exception):
    """The replica died before answering; Serve routes a retry to a live one."""


class TierFault(Exception):
    """The tier's own code raised: a defect, not an outage."""


@dataclass(frozen=True)
class TierRequest:
    tier: str
    endpoint: Endpoint
    body: dict[str, Any]
    request_id: str
    trace: dict[str, str]  # the caller's trace context
    affinity: str  # the conversation, for the tier's replica choice


class TierCall(Protocol):
    """One call's messages. `__anext__` raises `StopAsyncIteration` at the end."""

    async def __anext__(self) -> Any: ...

    def cancel(self) -> None: ...


class Tiers(Protocol):
    def call(self, req: TierRequest) -> TierCall: ...


class RayTierCall:
    def __init__(self, gen: Any) -> None:
        self._gen = gen

    async def __anext__(self) -> Any:
        try:
            return await self._gen.__anext__()
        except StopAsyncIteration:
            raise
        except (RayActorError, AioRpcError) as exc:  # the replica, or the stream to it, broke
            raise ReplicaLost(repr(exc)) from exc
        except RayServeException:  # Serve's own refusals (back-pressure, no deployment)
            raise
        except Exception as exc:  # over gRPC the tier's exception itself, not a RayTaskError
            raise TierFault(repr(exc)) from exc

    def cancel(self) -> None:
        self._gen.cancel()


class RayTiers:
    """The tiers' Ray Serve handles, streaming over Serve's gRPC transport between
    replicas in every deployment: a message costs the router and the tier replica less
    than an actor call's object-ref stream (benchmarks/README.md). Pinned here, not left
    to `RAY_SERVE_THROUGHPUT_OPTIMIZED`, because Serve fixes a handle's transport where
    the handle is made: an app built by a driver without the cluster's Ray environment
    (`serve.run` from a script, the tests, the benchmark) would stream over actor calls."""

    def __init__(self, handles: dict[str, DeploymentHandle]) -> None:
        self._handles = {
            name: h.options(stream=True, _by_reference=False) for name, h in handles.items()
        }

    def call(self, req: TierRequest) -> TierCall:
        gen = self._handles[req.tier].generate.remote(
            req.endpoint, req.body, req.request_id, req.trace, affinity=req.affinity
        )
        return RayTierCall(gen)
