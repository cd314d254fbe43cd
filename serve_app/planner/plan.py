"""Where each tier's weights and KV cache live on its node, how many replicas a node holds,
and what throughput and cost per token to expect: arithmetic only (no engine starts).

Placement follows the tier's own flags: vLLM splits weights over its tensor-parallel GPUs
and keeps the MLA cache whole on each; llama.cpp keeps routed experts in host RAM where
`override-tensor` sends `exps` to the CPU (or `n-cpu-moe` layers of them) and the rest on
its GPUs. Throughput is a roofline: a decode step reads the weights it touches (routed
experts touched by the batch, all of the rest) and the batch's KV cache, from GPU or host
memory at their bandwidths, or is bound by compute; each assumption is printed with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from serve_app.config import AppConfig, TierEntry
from serve_app.planner.inputs import (
    GB,
    NodeType,
    Sized,
    artifact_size,
    mmproj_size,
    model_shape,
)
from serve_app.planner.model import ModelShape

GIB = 2**30
GPU_RUNTIME_GB = 6.0  # per GPU: activations, CUDA graphs, NCCL buffers, encoder cache
LLAMA_COMPUTE_GB = 3.0  # per GPU: llama.cpp's compute buffers
VLLM_CPU_RUNTIME_GB = 3.5  # vLLM CPU processes besides weights and KV (measured: soak test)
LLAMA_CPU_RUNTIME_GB = 0.1
MFU = 0.4  # share of peak compute a forward pass reaches
DECODE_CONTEXT = 8192  # tokens of context each decoding sequence reads (at most max_context)
ASSUMPTIONS = [
    f"{GPU_RUNTIME_GB:g} GB a GPU for vLLM's activations, CUDA graphs and encoder cache",
    f"{LLAMA_COMPUTE_GB:g} GB a GPU for llama.cpp's compute buffers",
    "non-expert weights at 2 B a parameter on vLLM (BF16), 1 B in GGUF quants; routed"
    " experts take the rest of the artifact",
    f"{MFU:.0%} of peak compute; decode reads {DECODE_CONTEXT} tokens of KV a sequence",
    "a decode step reads each routed expert the batch touches once: E(1-(1-k/E)^B)",
    "cost at full load: the node's price shared by its replicas",
]


class TierPlan(BaseModel):
    tier: str
    engine: str
    node_type: str
    artifact_gb: float
    artifact_source: str
    expert_gb: float
    other_gb: float
    gpus_per_replica: int
    gpu_gb_needed: float  # per GPU
    gpu_gb: float  # per GPU, as the node has it
    host_gb_needed: float  # per replica
    host_gb: float  # the node's
    kv_bytes_per_token: int
    kv_tokens: int  # a replica's KV cache, in tokens
    max_context: int
    sequences: int  # run at once (max-num-seqs, llama.cpp slots)
    replicas_per_node: int
    decode_tps_one: float
    decode_tps_full: float
    prefill_tps: float
    usd_per_mtok_out: float
    price_per_mtok_out: float


class PlanError(ValueError):
    """A config that cannot run on its nodes: each line names the tier and the number."""


@dataclass(frozen=True)
class Placement:
    gpus: int  # per replica
    gpu_need: float  # bytes per GPU
    host_need: float  # bytes per replica
    kv_bytes: int
    kv_tokens: int
    sequences: int
    experts_in_host: float  # share of routed experts in host RAM


def plan_config(
    config: AppConfig, nodes: dict[str, NodeType], chosen: dict[str, str]
) -> list[TierPlan]:
    """Every tier's plan; `PlanError` naming every tier that does not fit."""
    plans, errors = [], []
    for tier in config.tiers:
        name = chosen.get(tier.name) or tier.node_type
        if name is None or name not in nodes:
            errors.append(f"{tier.name}: node type {name!r} unknown; choose from {sorted(nodes)}")
            continue
        try:
            plans.append(plan_tier(tier, name, nodes[name]))
        except PlanError as exc:
            errors.append(str(exc))
    if errors:
        raise PlanError("\n".join(errors))
    return plans


def plan_tier(tier: TierEntry, node_name: str, node: NodeType) -> TierPlan:
    shape, size = model_shape(tier), artifact_size(tier)
    bytes_a_param = 2.0 if tier.engine == "vllm" else 1.0
    other = min(shape.non_expert_params * bytes_a_param, 0.5 * size.bytes)
    expert = size.bytes - other
    on_gpu = node.gpus > 0 and tier.resources.num_gpus > 0
    if tier.engine == "vllm":
        place = vllm_placement(tier, node_name, node, shape, size, on_gpu)
    else:
        place = llama_placement(tier, node, shape, other, expert, on_gpu)
    replicas = fit(tier, node_name, node, place)
    step = decode_step(node, shape, place, other, expert, tier.max_context, on_gpu)
    compute = flops(node, place.gpus, on_gpu)
    full = place.sequences / step(place.sequences)
    return TierPlan(
        tier=tier.name,
        engine=tier.engine,
        node_type=node_name,
        artifact_gb=size.bytes / GB,
        artifact_source=size.source,
        expert_gb=expert / GB,
        other_gb=other / GB,
        gpus_per_replica=place.gpus,
        gpu_gb_needed=place.gpu_need / GB,
        gpu_gb=node.gpu_memory_gb,
        host_gb_needed=place.host_need / GB,
        host_gb=node.host_ram_gb,
        kv_bytes_per_token=place.kv_bytes,
        kv_tokens=place.kv_tokens,
        max_context=tier.max_context,
        sequences=place.sequences,
        replicas_per_node=replicas,
        decode_tps_one=1 / step(1),
        decode_tps_full=full,
        prefill_tps=compute / (2 * shape.active_params),
        usd_per_mtok_out=node.usd_per_hour / replicas / (full * 3600) * 1e6,
        price_per_mtok_out=tier.price.output_per_mtok,
    )


def vllm_placement(
    tier: TierEntry, node_name: str, node: NodeType, shape: ModelShape, size: Sized, on_gpu: bool
) -> Placement:
    args, env = tier.engine_args, tier.env
    mla = env.get("VLLM_MLA_DISABLE") != "1"
    kv_bytes = shape.kv_bytes_per_token(mla=mla)
    seqs = int(args.get("max-num-seqs", 256))
    if not on_gpu:
        space = float(env.get("VLLM_CPU_KVCACHE_SPACE", 4)) * GIB
        host = size.bytes + space + VLLM_CPU_RUNTIME_GB * GB
        return Placement(0, 0.0, host, kv_bytes, int(space // kv_bytes), seqs, 1.0)
    tp = int(args.get("tensor-parallel-size", 1))
    usable = float(args.get("gpu-memory-utilization", 0.9)) * node.gpu_memory_gb * GB
    weights = size.bytes / tp + GPU_RUNTIME_GB * GB
    room = usable - weights
    if room <= 0:
        raise PlanError(
            f"{tier.name} on {node_name}: weights and runtime need {weights / GB:.0f} GB a GPU;"
            f" {usable / GB:.0f} GB usable (short by {-room / GB:.0f} GB)"
        )
    # MLA's cache is whole on every rank; per-head caches split over the ranks
    per_rank = kv_bytes if mla else kv_bytes / tp
    return Placement(tp, weights + room, 16 * GB, kv_bytes, int(room // per_rank), seqs, 0.0)


def llama_placement(
    tier: TierEntry,
    node: NodeType,
    shape: ModelShape,
    other: float,
    expert: float,
    on_gpu: bool,
) -> Placement:
    args = tier.engine_args
    slots = int(args.get("parallel", 4))
    kv_bytes = shape.kv_bytes_per_token(mla=True)
    kv = tier.max_context * slots * kv_bytes  # ctx-size = max_context per slot
    vision = mmproj_size(tier)
    if not on_gpu:
        host = other + expert + kv + vision + LLAMA_CPU_RUNTIME_GB * GB
        return Placement(0, 0.0, host, kv_bytes, tier.max_context * slots, slots, 1.0)
    share = experts_in_host(args, shape)
    gpus = max(1, int(tier.resources.num_gpus))
    gpu_total = other + expert * (1 - share) + kv + vision + gpus * LLAMA_COMPUTE_GB * GB
    host = expert * share + LLAMA_CPU_RUNTIME_GB * GB
    return Placement(gpus, gpu_total / gpus, host, kv_bytes, tier.max_context * slots, slots, share)


def experts_in_host(args: dict, shape: ModelShape) -> float:
    """The share of routed experts llama.cpp's flags keep in host RAM."""
    override = str(args.get("override-tensor", ""))
    if "exps" in override and "CPU" in override:
        return 1.0
    layers = int(args.get("n-cpu-moe", 0))
    return min(layers / max(shape.moe_layers, 1), 1.0)


def fit(tier: TierEntry, node_name: str, node: NodeType, place: Placement) -> int:
    """Replicas a node holds; `PlanError` where one does not fit at all."""
    where = f"{tier.name} on {node_name}"
    if place.kv_tokens < tier.max_context:
        raise PlanError(
            f"{where}: max_context {tier.max_context} is more than the {place.kv_tokens}"
            " tokens its KV cache holds"
        )
    if place.gpus > node.gpus:
        raise PlanError(f"{where}: needs {place.gpus} GPUs a replica; the node has {node.gpus}")
    if place.gpus and place.gpu_need > node.gpu_memory_gb * GB:
        short = place.gpu_need / GB - node.gpu_memory_gb
        raise PlanError(
            f"{where}: needs {place.gpu_need / GB:.0f} GB a GPU; the node's GPUs have"
            f" {node.gpu_memory_gb:.0f} GB (short by {short:.0f} GB)"
        )
    if place.host_need > node.host_ram_gb * GB:
        short = place.host_need / GB - node.host_ram_gb
        raise PlanError(
            f"{where}: needs {place.host_need / GB:.0f} GB of host RAM a replica; the node"
            f" has {node.host_ram_gb:.0f} GB (short by {short:.0f} GB)"
        )
    by_ram = int(node.host_ram_gb * GB // place.host_need)
    by_gpu = node.gpus // place.gpus if place.gpus else by_ram
    return max(1, min(by_ram, by_gpu))


def flops(node: NodeType, gpus: int, on_gpu: bool) -> float:
    peak = node.gpu_tflops * gpus if on_gpu else node.host_tflops
    return peak * 1e12 * MFU


def decode_step(
    node: NodeType,
    shape: ModelShape,
    place: Placement,
    other: float,
    expert: float,
    max_context: int,
    on_gpu: bool,
):
    """Seconds one decode step of `batch` sequences takes, as a function."""
    gpu_bw = node.gpu_bandwidth_gbs * GB * max(place.gpus, 1)
    host_bw = node.host_bandwidth_gbs * GB
    compute = flops(node, place.gpus, on_gpu)

    def seconds(batch: int) -> float:
        touched = 1 - (1 - shape.active_experts / shape.experts) ** batch
        experts_read = expert * touched
        kv_read = batch * min(max_context, DECODE_CONTEXT) * place.kv_bytes
        host = experts_read * place.experts_in_host
        device = other + experts_read - host + kv_read
        if not on_gpu:
            host, device = host + device, 0.0
        memory = (device / gpu_bw if device else 0.0) + host / host_bw
        return max(memory, batch * 2 * shape.active_params / compute, 1e-9)

    return seconds


def gb(value: float) -> str:
    """Sizes from a tiny model's megabytes to a real one's hundreds of gigabytes."""
    if value >= 10:
        return f"{value:,.0f}"
    return f"{value:.2f}" if value >= 0.1 else f"{value * 1000:.1f}M"


def table(plans: list[TierPlan]) -> str:
    """The plan for people: one row a tier."""
    head = (
        "tier | node | artifact GB | experts/other GB | GPUs | GB a GPU (need/has)"
        " | host GB (need/has) | KV B/token | KV tokens (context) | seqs | replicas/node"
        " | decode tok/s (1 / full) | prefill tok/s | $/1M out (cost / price)"
    )
    rows = [head, "-" * len(head)]
    for p in plans:
        rows.append(
            f"{p.tier} | {p.node_type} | {gb(p.artifact_gb)}"
            f" | {gb(p.expert_gb)}/{gb(p.other_gb)}"
            f" | {p.gpus_per_replica} | {gb(p.gpu_gb_needed)}/{gb(p.gpu_gb)}"
            f" | {gb(p.host_gb_needed)}/{gb(p.host_gb)} | {p.kv_bytes_per_token:,}"
            f" | {p.kv_tokens:,} ({p.max_context:,}) | {p.sequences} | {p.replicas_per_node}"
            f" | {p.decode_tps_one:,.0f} / {p.decode_tps_full:,.0f} | {p.prefill_tps:,.0f}"
            f" | {p.usd_per_mtok_out:,.2f} / {p.price_per_mtok_out:,.2f}"
        )
    notes = [
        f"- {p.tier}: costs {p.usd_per_mtok_out:,.2f} $/1M output tokens at full load, above"
        f" its price of {p.price_per_mtok_out:,.2f}"
        for p in plans
        if p.usd_per_mtok_out > p.price_per_mtok_out
    ]
    return "\n".join(
        [
            *rows,
            "",
            "decode and prefill are roofline bounds (memory bandwidth, compute), not measurements",
            *(["price below cost:", *notes] if notes else []),
            "assumptions:",
            *(f"- {a}" for a in ASSUMPTIONS),
        ]
    )
