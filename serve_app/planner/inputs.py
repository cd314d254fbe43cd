"""What the planner reads: node types (cluster/node_types.yaml) and each tier's artifact
size and model shape, from files where they are here, else from published figures."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from deployments.spec import TierSpec
from serve_app.planner.model import KIMI_K25_TEXT, KIMI_K25_VISION_PARAMS, ModelShape

NODE_TYPES = Path(__file__).resolve().parents[2] / "cluster" / "node_types.yaml"
GB = 1e9

# Published sizes of the named artifacts (bytes), used where the files are not on this
# machine: the Hugging Face repo's safetensors, and unsloth's GGUF quants (all shards).
KNOWN_SIZES: dict[str, float] = {
    "moonshotai/Kimi-K2.5": 555 * GB,
    "UD-Q4_K_XL": 620 * GB,
    "UD-Q2_K_XL": 375 * GB,
}
MMPROJ_F16 = 2 * KIMI_K25_VISION_PARAMS  # bytes: the vision tower in F16


class NodeType(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gpus: int = Field(ge=0)
    gpu_memory_gb: float = Field(ge=0)
    gpu_bandwidth_gbs: float = Field(ge=0)
    gpu_tflops: float = Field(ge=0, description="dense BF16, per GPU")
    host_ram_gb: float = Field(gt=0)
    host_bandwidth_gbs: float = Field(gt=0)
    host_tflops: float = Field(1.0, gt=0, description="the CPUs' dense compute")
    nvme_tb: float = Field(ge=0)
    usd_per_hour: float = Field(ge=0)


def node_types(path: Path = NODE_TYPES) -> dict[str, NodeType]:
    raw = yaml.safe_load(path.read_text()) or {}
    return {name: NodeType.model_validate(spec) for name, spec in raw.items()}


class Sized(BaseModel):
    """An artifact's bytes and where the figure comes from."""

    bytes: float
    source: str


def artifact_size(tier: TierSpec) -> Sized:
    artifact = tier.artifact
    if artifact.kind == "embedded":
        from deployments.artifacts.resolve import resolve_artifact

        return on_disk(Path(resolve_artifact(artifact)))
    if artifact.kind == "path" and artifact.path is not None and artifact.path.exists():
        return on_disk(artifact.path)
    name = str(artifact.path or f"{artifact.repo}/{artifact.file or ''}")
    for label, size in KNOWN_SIZES.items():
        if label in name:
            return Sized(bytes=size, source=f"published size of {label}")
    raise ValueError(f"tier {tier.name!r}: no size known for {name!r} and no file here")


def on_disk(path: Path) -> Sized:
    """A directory's safetensors, or a GGUF file with all the shards of its split."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        return Sized(bytes=sum(f.stat().st_size for f in files), source=f"{len(files)} files")
    split = re.match(r"(.*)-\d{5}-of-(\d{5})\.gguf$", path.name)
    files = (
        sorted(path.parent.glob(f"{split.group(1)}-*-of-{split.group(2)}.gguf"))
        if split
        else [path]
    )
    return Sized(bytes=sum(f.stat().st_size for f in files), source=f"{len(files)} file(s)")


def mmproj_size(tier: TierSpec) -> float:
    """The vision projector a GGUF tier loads beside its weights (0 without vision)."""
    if tier.engine != "llama.cpp" or not tier.capabilities.vision:
        return 0.0
    from deployments.artifacts.resolve import resolve_mmproj

    if tier.artifact.kind == "embedded" or (tier.artifact.mmproj and tier.artifact.mmproj.exists()):
        found = resolve_mmproj(tier)
        if found is not None and Path(found).exists():
            return float(Path(found).stat().st_size)
    return MMPROJ_F16


def model_shape(tier: TierSpec) -> ModelShape:
    if tier.artifact.kind == "embedded":
        from deployments.artifacts.tiny_model import ensure_tiny_model

        return ModelShape.from_dir(ensure_tiny_model())
    return ModelShape.from_config(KIMI_K25_TEXT)
