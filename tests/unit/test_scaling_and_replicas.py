"""Replica choice within a tier, autoscaling arithmetic and load aggregation, with plain
inputs (the Ray Serve classes that call them are exercised by the integration tests)."""

from __future__ import annotations

from collections import Counter

from deployments.scheduling.autoscaling import Demand, desired_replicas
from deployments.scheduling.loadboard import ReplicaLoad, aggregate
from deployments.scheduling.replica_router import ReplicaView, rank_replicas

IDS = ["r-a", "r-b", "r-c"]


def test_same_conversation_goes_to_the_same_replica():
    vs = [ReplicaView(r, capacity=4) for r in IDS]
    homes = {rank_replicas(vs, "s:conversation-1")[0][0] for _ in range(10)}
    assert len(homes) == 1
    # many conversations spread over all replicas
    spread = Counter(rank_replicas(vs, f"s:{i}")[0][0] for i in range(300))
    assert set(spread) == set(IDS) and min(spread.values()) > 50


def test_affinity_survives_other_replicas_leaving():
    vs = [ReplicaView(r, capacity=4) for r in IDS]
    for key in ("s:x", "s:y", "p:abc"):
        home = rank_replicas(vs, key)[0][0]
        remaining = [v for v in vs if v.replica_id != next(i for i in IDS if i != home)]
        assert rank_replicas(remaining, key)[0][0] == home


def test_overloaded_home_gives_way_to_least_loaded():
    vs = [ReplicaView(r, capacity=4) for r in IDS]
    home = rank_replicas(vs, "s:y")[0][0]
    busy = [
        ReplicaView(v.replica_id, running=4, waiting=3, capacity=4)
        if v.replica_id == home
        else ReplicaView(v.replica_id, running=1 if v.replica_id == IDS[1] else 2, capacity=4)
        for v in vs
    ]
    ranks = rank_replicas(busy, "s:y")
    assert ranks[0][0] != home and ranks[-1] == [home]


def test_without_key_least_engine_load_first_and_in_flight_counts():
    vs = [
        ReplicaView("r-a", running=3, capacity=4),
        ReplicaView("r-b", running=0, capacity=4, in_flight=4),  # engine lags Ray's count
        ReplicaView("r-c", running=1, capacity=4),
    ]
    assert rank_replicas(vs, None) == [["r-c"], ["r-a"], ["r-b"]]


def test_unhealthy_replicas_last_resort_only():
    vs = [ReplicaView("r-a", healthy=False), ReplicaView("r-b", running=9, capacity=4)]
    assert rank_replicas(vs, None) == [["r-b"]]
    assert rank_replicas([ReplicaView("r-a", healthy=False)], None) == [["r-a"]]


def test_desired_replicas_follow_engine_demand():
    assert desired_replicas(Demand(0, 0, 0), 1, 4)[0] == 0  # idle: may go to zero
    assert desired_replicas(Demand(4, 0, 4), 1, 4)[0] == 1
    n, why = desired_replicas(Demand(4, 6, 10), 1, 4)
    assert n == 3 and "waiting 6" in why and "1 -> 3" in why
    # requests Ray holds that no engine has seen yet (a replica starting) still count
    assert desired_replicas(Demand(0, 0, 2), 0, 4)[0] == 1


def test_requests_waiting_at_the_routers_count_as_demand():
    """The fair queue holds a tier's overflow at the routers, not in the engines: the
    tier still grows for it."""
    n, why = desired_replicas(Demand(4, 0, 4, queued=6), 1, 4)
    assert n == 3 and "at the routers 6" in why


def test_the_board_hands_each_replica_its_share_of_the_routers_queues():
    from deployments.scheduling.loadboard import LoadBoard, RouterReport

    board = LoadBoard.__ray_actor_class__()
    board.report("standard", ReplicaLoad(replica="a", capacity=4))
    board.snapshot("router-1", RouterReport(queued={"standard": 5, "premium": 1}))
    board.snapshot("router-2", RouterReport(queued={"standard": 3}))
    assert board.report("standard", ReplicaLoad(replica="b", capacity=4)) == 4.0  # 8 / 2
    snap = board.snapshot()
    assert snap["standard"].queued == 8 and "premium" not in snap  # nobody serves premium


def test_the_board_shows_the_lowest_routers_fairness_index():
    from deployments.scheduling.loadboard import LoadBoard, RouterReport

    board = LoadBoard.__ray_actor_class__()
    board.report("standard", ReplicaLoad(replica="a", capacity=4))
    board.report("premium", ReplicaLoad(replica="b", capacity=4))
    board.snapshot("router-1", RouterReport(fairness={"standard": 0.9}))
    snap = board.snapshot("router-2", RouterReport(fairness={"standard": 0.7}))
    assert snap["standard"].fairness == 0.7  # where some keys fare worst
    assert snap["premium"].fairness is None  # nowhere do several keys wait
    assert snap["standard"].model_dump()["fairness"] == 0.7  # for display


def test_every_router_hears_which_keys_are_active_at_the_others():
    from deployments.scheduling.loadboard import LoadBoard, RouterReport

    board = LoadBoard.__ray_actor_class__()
    board.report("premium", ReplicaLoad(replica="a", capacity=4))
    board.snapshot("router-1", RouterReport(active_keys={"premium": ["swarm"]}))
    seen = board.snapshot("router-2", RouterReport(active_keys={"premium": ["victim", "swarm"]}))
    assert seen["premium"].active_keys == ["swarm", "victim"]
    assert "active_keys" not in seen["premium"].model_dump()  # key ids are not for display


def test_the_board_merges_each_keys_active_sessions_from_the_routers():
    from deployments.scheduling.loadboard import LoadBoard, RouterReport

    board = LoadBoard.__ray_actor_class__()
    board.report("premium", ReplicaLoad(replica="r1", capacity=4))
    board.snapshot("router-1", RouterReport(active_sessions={"premium": {"k": ["chat", "swarm"]}}))
    seen = board.snapshot(
        "router-2", RouterReport(active_sessions={"premium": {"k": ["swarm", "sub-1"]}})
    )
    assert seen["premium"].active_sessions == {"k": ["chat", "sub-1", "swarm"]}
    assert "active_sessions" not in seen["premium"].model_dump()


def test_aggregate_sums_healthy_replicas():
    members = [
        ReplicaLoad(replica="a", running=2, waiting=1, capacity=4, kv_cache_usage=0.2),
        ReplicaLoad(replica="b", running=4, waiting=0, capacity=4, kv_cache_usage=0.7),
        ReplicaLoad(replica="c", running=0, capacity=4, healthy=False, restarts=2),
    ]
    tier = aggregate(members)
    assert (tier.running, tier.waiting, tier.capacity, tier.replicas) == (6, 1, 8, 2)
    assert tier.kv_cache_usage == 0.7 and tier.healthy and tier.restarts == 2
    assert not aggregate([members[2]]).healthy
    assert aggregate([]).replicas == 0


def test_board_leaves_out_tiers_nobody_reports_for():
    from deployments.scheduling.loadboard import LoadBoard

    board = LoadBoard.__ray_actor_class__()  # the class itself: plain state, no Ray
    board.report("budget", ReplicaLoad(replica="a", capacity=4))
    assert board.snapshot()["budget"].replicas == 1
    board.forget("budget", "a")
    assert "budget" not in board.snapshot()  # scaled to zero: absent, not unhealthy


def test_the_premium_tiers_load_is_read_from_vllms_own_metrics_of_its_model_only():
    from prometheus_client import REGISTRY, Counter, Gauge, Histogram

    from deployments.engines.vllm.engine import vllm_load_from_registry

    labels = ["model_name"]
    made = [
        Gauge("vllm:num_requests_running", "running", labels),
        Gauge("vllm:num_requests_waiting", "waiting", labels),
        Gauge("vllm:kv_cache_usage_perc", "kv", labels),
        Counter("vllm:generation_tokens", "generated", labels),
        Histogram("vllm:time_to_first_token_seconds", "not read", labels),
    ]
    try:
        running, waiting, kv, generated, ttft = made
        running.labels("kimi").set(3)
        running.labels("another-model").set(50)
        waiting.labels("kimi").set(2)
        kv.labels("kimi").set(0.25)
        generated.labels("kimi").inc(1234)
        ttft.labels("kimi").observe(0.1)
        load = vllm_load_from_registry("kimi", capacity=8)
    finally:
        for metric in made:
            REGISTRY.unregister(metric)
    assert (load.running, load.waiting, load.kv_cache_usage) == (3, 2, 0.25)
    assert (load.capacity, load.generated_tokens_total) == (8, 1234)
